// wsistore viewer: one slide in OpenSeadragon from our DeepZoom tiles, with a navigator, the
// current magnification and buttons to go to one, rotation, a ruler, keyboard shortcuts, a link
// that reopens the same view, and the progress of a slide still converting.
// The page carries what it needs in <script id="slide-config"> (see server/api/viewer.py).
// #viewer's data-state goes loading -> open -> loaded (every tile in view drawn), or error.
//
// Magnification: `config.magnification` is the slide's magnification at one screen (CSS) pixel
// per level-0 pixel (its objective power, else 10 µm / MPP: 40x ~ 0.25 µm/px, 20x ~ 0.5 µm/px);
// at any zoom it is that times the screen pixels per level-0 pixel.
"use strict";

import { Ruler, formatLength } from "./ruler.js";

const MAX_BAR_PX = 160;
const POLL_MS = 2000;
const PAN_STEP = 0.125; // of the visible width or height, per arrow key press
const ZOOM_STEP = 1.5;
const MIN_PIXEL_SLACK = 1.02;

const $ = (id) => document.getElementById(id);

function main() {
  const root = $("viewer");
  const notice = $("notice");
  const config = JSON.parse($("slide-config").textContent);

  function fail(message) {
    root.dataset.state = "error";
    notice.textContent = message;
    notice.hidden = false;
  }

  if (typeof window.OpenSeadragon !== "function") {
    fail(
      "The viewer cannot start: OpenSeadragon is not installed on this server " +
        "(node_modules is missing). Run `npm ci` in the wsistore checkout, then restart the server."
    );
    return;
  }

  document.body.classList.add("scripted");
  // The tools show before the viewer opens, so that its home view fits the space left.
  $("toolbar").hidden = false;

  // ---- the properties panel ----
  const panelButton = $("panel-button");
  function togglePanel(show) {
    const open = show === undefined ? !document.body.classList.contains("panel-open") : show;
    document.body.classList.toggle("panel-open", open);
    panelButton.setAttribute("aria-expanded", String(open));
  }
  panelButton.addEventListener("click", () => togglePanel());
  // Open beside the slide on wide screens, closed over it on phones; set before the viewer
  // opens, so that its home view fits the space the slide really has.
  togglePanel(window.matchMedia("(min-width: 900px)").matches);

  const suffix = config.query ? "?" + config.query : "";
  const viewer = window.OpenSeadragon({
    element: root,
    prefixUrl: config.osdPrefix,
    showNavigator: true,
    navigatorPosition: "TOP_RIGHT",
    showRotationControl: false,
    keyboardNavEnabled: false, // our shortcuts (below) work wherever the focus is
    maxZoomPixelRatio: 2,
    minZoomImageRatio: 0.1, // low magnifications (1x) of a small slide stay reachable
    preserveImageSizeOnResize: true, // opening the panel keeps the magnification
    // The level whose pixels are just finer than the screen's (device) pixels, with 2% of
    // slack: at 20x a 40x slide shows its 20x level, not four times as many 40x tiles.
    minPixelRatio: (0.5 * MIN_PIXEL_SLACK) / (window.devicePixelRatio || 1),
    visibilityRatio: 0.5,
    crossOriginPolicy: false,
    tileSources: {
      width: config.width,
      height: config.height,
      tileSize: config.tileSize,
      tileOverlap: 0,
      minLevel: 0,
      maxLevel: config.maxLevel,
      getTileUrl: function (level, x, y) {
        return config.tilesUrl + level + "/" + x + "_" + y + ".jpeg" + suffix;
      },
    },
  });
  window.wsiViewer = viewer; // for scripts and tests that drive the page

  const item = () => viewer.world.getItemAt(0);
  // Screen (CSS) pixels per level-0 pixel.
  const imageZoom = (current) => item().viewportToImageZoom(viewer.viewport.getZoom(current));
  const zoomToImage = (zoom, immediately) =>
    viewer.viewport.zoomTo(item().imageToViewportZoom(zoom), null, immediately);

  // ---- magnification ----
  const magnification = $("magnification");
  const magButtons = Array.from(document.querySelectorAll("#toolbar [data-mag]"));

  function showMagnification() {
    if (!item()) {
      return;
    }
    const zoom = imageZoom(true);
    if (config.magnification) {
      const mag = config.magnification * zoom;
      magnification.textContent = Number(mag.toPrecision(mag < 10 ? 2 : 3)) + "x";
      root.dataset.magnification = mag.toFixed(3);
    } else {
      magnification.textContent = Number((zoom * 100).toPrecision(3)) + "%";
      magnification.title = "Magnification unknown (the slide has no MPP): zoom in percent";
    }
  }

  function goToMagnification(which) {
    if (!item()) {
      return;
    }
    if (which === "native") {
      zoomToImage(1);
    } else if (config.magnification) {
      zoomToImage(Number(which) / config.magnification);
    }
  }

  for (const button of magButtons) {
    const mag = button.dataset.mag;
    if (mag !== "native") {
      const beyond = !config.magnification || Number(mag) > config.magnification * 1.001;
      button.disabled = beyond;
      if (beyond) {
        const native = config.magnification && Number(config.magnification.toPrecision(3));
        button.title = native
          ? "Beyond the slide's native resolution (" + native + "x)"
          : "Magnification unknown (the slide has no MPP)";
      }
    }
    button.addEventListener("click", () => goToMagnification(mag));
  }

  // ---- rotation ----
  function rotate(degrees) {
    if (!item()) {
      return;
    }
    const next = (((viewer.viewport.getRotation() + degrees) % 360) + 360) % 360;
    viewer.viewport.setRotation(next);
    root.dataset.rotation = String(next);
  }
  $("rotate-left").addEventListener("click", () => rotate(-90));
  $("rotate-right").addEventListener("click", () => rotate(90));

  // ---- scale bar: the longest 1, 2 or 5 x 10^n length that fits in MAX_BAR_PX ----
  const scalebar = $("scalebar");
  const bar = scalebar.querySelector(".bar");
  const barLabel = scalebar.querySelector(".label");

  function niceLength(maxMicrons) {
    const power = Math.pow(10, Math.floor(Math.log10(maxMicrons)));
    for (const m of [5, 2, 1]) {
      if (m * power <= maxMicrons) {
        return m * power;
      }
    }
    return power;
  }

  function updateScalebar() {
    if (!config.mppX || !item()) {
      return;
    }
    const micronsPerPx = config.mppX / imageZoom(true);
    const microns = niceLength(MAX_BAR_PX * micronsPerPx);
    bar.style.width = (microns / micronsPerPx).toFixed(1) + "px";
    barLabel.textContent = formatLength(microns, 3);
    scalebar.hidden = false;
  }
  if (!config.mppX) {
    scalebar.hidden = false;
    barLabel.textContent = "no scale (MPP unknown)";
  }

  // ---- ruler ----
  const ruler = new Ruler(
    viewer,
    $("ruler-layer"),
    $("ruler-label"),
    config.mppX ? [config.mppX, config.mppY] : null
  );
  const rulerButton = $("ruler-button");
  ruler.onchange = () => {
    rulerButton.setAttribute("aria-pressed", String(ruler.active));
    root.classList.toggle("measuring", ruler.active);
  };
  rulerButton.title = "Measure: drag a line over the slide (M)";
  rulerButton.addEventListener("click", () => ruler.setActive(!ruler.active));

  // ---- the link to this view ----
  // The fragment never reaches the server, so it never touches the signed query: x, y = the
  // centre in level-0 pixels, mag = magnification (zoom = screen px per level-0 px when the
  // magnification is unknown), rot = rotation in degrees.
  function viewState() {
    const centre = item().viewportToImageCoordinates(viewer.viewport.getCenter(true));
    const zoom = imageZoom(true);
    const params = new URLSearchParams();
    params.set("x", String(Math.round(centre.x)));
    params.set("y", String(Math.round(centre.y)));
    if (config.magnification) {
      params.set("mag", String(Number((config.magnification * zoom).toPrecision(5))));
    } else {
      params.set("zoom", String(Number(zoom.toPrecision(5))));
    }
    params.set("rot", String(viewer.viewport.getRotation()));
    return "#" + params.toString();
  }

  function restoreView(hash) {
    const params = new URLSearchParams(hash.replace(/^#/, ""));
    const number = (name) => {
      const value = params.get(name);
      return value !== null && isFinite(Number(value)) ? Number(value) : null;
    };
    const x = number("x");
    const y = number("y");
    const rot = number("rot");
    let zoom = number("zoom");
    if (number("mag") !== null && config.magnification) {
      zoom = number("mag") / config.magnification;
    }
    if (rot !== null) {
      viewer.viewport.setRotation(((rot % 360) + 360) % 360, true);
      root.dataset.rotation = String(viewer.viewport.getRotation());
    }
    // A link may name any numbers (one made for a larger version of the slide, or mistyped):
    // held to the zooms the viewer allows and to a centre on the slide, else it opened on
    // blank screen past the slide's edge, or at 100000x, and never finished loading.
    const clamp = (value, low, high) => Math.min(Math.max(value, low), high);
    if (zoom !== null && zoom > 0) {
      const limit = (z) => item().viewportToImageZoom(z);
      zoomToImage(
        clamp(zoom, limit(viewer.viewport.getMinZoom()), limit(viewer.viewport.getMaxZoom())),
        true
      );
    }
    if (x !== null && y !== null) {
      const centre = [clamp(x, 0, config.width), clamp(y, 0, config.height)];
      viewer.viewport.panTo(item().imageToViewportCoordinates(...centre), true);
    }
  }

  const linkBox = $("link-box");
  const linkOutput = $("link-output");
  const linkStatus = $("link-status");

  async function copyLink() {
    if (!item()) {
      return;
    }
    const link = new URL(config.viewUrl + viewState(), window.location.href).href;
    linkOutput.value = link;
    linkBox.hidden = false;
    linkOutput.select();
    let text = "Select the link and copy it.";
    try {
      await navigator.clipboard.writeText(link);
      text = "Copied.";
    } catch (error) {
      // No clipboard outside a secure context (plain http off localhost): the field is selected.
    }
    if (config.linkExpires) {
      const until = new Date(config.linkExpires * 1000);
      text += " It opens this view until " + until.toLocaleString() + ", then asks for a new link.";
    }
    linkStatus.textContent = text;
  }
  $("link-button").addEventListener("click", copyLink);
  $("link-close").addEventListener("click", () => {
    linkBox.hidden = true;
  });

  // A link to this slide opened in the tab that shows it changes only the fragment: the
  // browser loads nothing, so the view moves here (replaceState below fires no hashchange).
  window.addEventListener("hashchange", () => {
    if (item()) {
      restoreView(window.location.hash);
    }
  });

  // Keep the address bar on the current view, so a reload or a bookmark comes back to it.
  viewer.addHandler("animation-finish", () => {
    if (item()) {
      window.history.replaceState(null, "", viewState());
    }
  });

  // ---- keyboard shortcuts: one table, which the help dialog shows ----
  const help = $("help");
  const MAG_KEYS = { 1: "1", 2: "5", 3: "10", 4: "20", 5: "40" };
  const PAN_KEYS = {
    ArrowLeft: [-1, 0], a: [-1, 0], ArrowRight: [1, 0], d: [1, 0],
    ArrowUp: [0, -1], w: [0, -1], ArrowDown: [0, 1], s: [0, 1],
  };

  function pan(key) {
    const bounds = viewer.viewport.getBounds(true);
    const [dx, dy] = PAN_KEYS[key];
    const step = new window.OpenSeadragon.Point(
      dx * bounds.width * PAN_STEP,
      dy * bounds.height * PAN_STEP
    );
    // On screen: a rotated slide moves the way the arrow points.
    viewer.viewport.panBy(step.rotate(-viewer.viewport.getRotation()));
    // OpenSeadragon constrains only its own gestures: without this, held arrows carry the
    // slide off the screen (a blank viewer) and + zooms past the deepest level, without end.
    viewer.viewport.applyConstraints();
  }

  function zoomBy(key) {
    viewer.viewport.zoomBy("+=".includes(key) ? ZOOM_STEP : 1 / ZOOM_STEP);
    viewer.viewport.applyConstraints(); // as pan: at most maxZoomPixelRatio, at least the minimum
  }

  function escape() {
    ruler.clear();
    ruler.setActive(false);
    linkBox.hidden = true;
  }

  const SHORTCUTS = [
    {
      label: "1 2 3 4 5",
      what: "1x, 5x, 10x, 20x, 40x",
      keys: Object.keys(MAG_KEYS),
      run: (key) => {
        const button = magButtons.find((b) => b.dataset.mag === MAG_KEYS[key]);
        if (!button.disabled) {
          goToMagnification(MAG_KEYS[key]);
        }
      },
    },
    { label: "n", what: "1:1 (one screen pixel per slide pixel)", keys: ["n"],
      run: () => goToMagnification("native") },
    { label: "+ / -", what: "zoom in / out", keys: ["+", "=", "-", "_"],
      run: zoomBy },
    { label: "← ↑ → ↓ or W A S D", what: "pan", keys: Object.keys(PAN_KEYS), run: pan },
    { label: "0 or h", what: "whole slide", keys: ["0", "h"],
      run: () => viewer.viewport.goHome() },
    { label: "r / R", what: "rotate right / left by 90°", keys: ["r", "R"],
      run: (key) => rotate(key === "r" ? 90 : -90) },
    { label: "m", what: "ruler on / off (drag over the slide to measure)", keys: ["m"],
      run: () => ruler.setActive(!ruler.active) },
    { label: "Esc", what: "clear the measurement, close the link box", keys: ["Escape"],
      run: escape },
    { label: "l", what: "link to this view", keys: ["l"], run: copyLink },
    { label: "i", what: "properties and label panel", keys: ["i"], run: () => togglePanel() },
    { label: "?", what: "this list", keys: ["?"], run: () => help.showModal() },
  ];
  const actions = new Map();
  const shortcutList = $("shortcuts");
  for (const shortcut of SHORTCUTS) {
    shortcut.keys.forEach((key) => actions.set(key, shortcut.run));
    const dt = document.createElement("dt");
    dt.textContent = shortcut.label;
    const dd = document.createElement("dd");
    dd.textContent = shortcut.what;
    shortcutList.append(dt, dd);
  }
  $("help-button").addEventListener("click", () => help.showModal());

  document.addEventListener("keydown", (event) => {
    const target = event.target;
    // The link box's field is read-only and holds the focus once *Link* selected it: keys
    // there are shortcuts (Esc closes the box), else every shortcut died until a click.
    const typing =
      target instanceof HTMLElement && target.matches("input:not([readonly]), textarea, select");
    const run = actions.get(event.key);
    if (!run || typing || help.open || !item() || event.ctrlKey || event.metaKey || event.altKey) {
      return;
    }
    event.preventDefault();
    run(event.key);
  });

  // ---- a slide still converting: its progress, then the published pyramid ----
  const progress = $("progress");
  const progressText = progress.querySelector(".text");
  const progressBar = progress.querySelector("progress");

  function showProgress(job) {
    progress.hidden = false;
    if (job && job.state === "running") {
      progressText.textContent =
        "Converting: " + Math.round(job.progress) + "%. Shown from the original file meanwhile; " +
        "the view switches to the converted slide when it is published.";
      progressBar.value = job.progress;
      progressBar.hidden = false;
    } else {
      progressText.textContent = job
        ? "Waiting to be converted (queued). Shown from the original file meanwhile."
        : "Not converted yet. Shown from the original file meanwhile.";
      progressBar.hidden = true;
    }
  }

  async function slideStatus() {
    const response = await fetch(config.statusUrl, { cache: "no-store" });
    if (!response.ok) {
      throw new Error("HTTP " + response.status);
    }
    if ((response.headers.get("Content-Type") || "").includes("json")) {
      return response.json();
    }
    // A page opened through a signed link reads its own page, which says the same.
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    return JSON.parse(page.getElementById("slide-config").textContent);
  }

  async function poll() {
    try {
      const doc = await slideStatus();
      if (doc.status === "ready") {
        // Published: reload on the published pyramid (new version, new tile URLs), same view.
        root.dataset.state = "published";
        window.history.replaceState(null, "", viewState());
        window.location.reload();
        return;
      }
      showProgress(doc.job);
    } catch (error) {
      progressText.textContent = "Converting (progress unavailable: " + error.message + ").";
    }
    window.setTimeout(poll, POLL_MS);
  }

  // ---- the slide opens ----
  let failedTiles = 0;
  viewer.addHandler("open", function () {
    if (window.location.hash) {
      restoreView(window.location.hash);
    }
    root.dataset.state = "open";
    const loaded = () => {
      root.dataset.state = "loaded";
    };
    if (item().getFullyLoaded()) {
      loaded();
    }
    item().addHandler("fully-loaded-change", (event) => {
      if (event.fullyLoaded) {
        loaded();
      }
    });
    updateScalebar();
    showMagnification();
    if (config.status !== "ready") {
      showProgress(config.job);
      window.setTimeout(poll, POLL_MS);
    }
  });
  viewer.addHandler("update-viewport", () => {
    updateScalebar();
    showMagnification();
  });
  viewer.addHandler("open-failed", (event) => {
    fail("The slide could not be opened: " + (event.message || "unknown error"));
  });
  // ---- tiles that fail: say why, from what the service says of this page now ----
  // A tile error carries no HTTP status, and the reasons need different actions: a shared link
  // past its expiry (reloading it is a 401: ask for a new link), a slide deleted from the
  // store (nothing to reload), a slide re-published meanwhile (new tiles, maybe a new geometry:
  // the old page's tile URLs give misplaced tiles or errors, so reload at the same view), or a
  // service in trouble (a reload, which keeps the view, asks for them again).
  const sharedLink = new URLSearchParams(window.location.search).has("sig");
  let diagnosing = false;
  let lastDiagnosis = 0;

  function versionOf(query) {
    return new URLSearchParams(query || "").get("v");
  }

  async function failureCause() {
    const expired = config.linkExpires && Date.now() / 1000 >= config.linkExpires;
    if (expired) {
      const until = new Date(config.linkExpires * 1000).toLocaleString();
      return sharedLink
        ? ["expired", "This shared link expired on " + until + ": tiles no longer load, and " +
            "reloading it will not help. Ask whoever shared it for a new link."]
        : ["expired", "This page's tile links expired on " + until + ": reload the page."];
    }
    let response;
    try {
      response = await fetch(config.viewUrl, { cache: "no-store" });
    } catch (error) {
      return ["unreachable", "The service cannot be reached: check the network, then reload " +
        "the page (same view)."];
    }
    if (response.status === 404) {
      return ["deleted", "This slide is no longer in the store (deleted or moved): what is " +
        "already shown is all that can be." + (sharedLink ? "" : " Go back to the slide list.")];
    }
    if (response.ok) {
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const now = page.getElementById("slide-config");
      if (now && versionOf(JSON.parse(now.textContent).query) !== versionOf(config.query)) {
        return ["republished", ""];
      }
    }
    return ["failing", "the service answered " + response.status];
  }

  async function explainFailures() {
    if (diagnosing || Date.now() - lastDiagnosis < POLL_MS) {
      return;
    }
    diagnosing = true;
    try {
      const [cause, text] = await failureCause();
      root.dataset.failure = cause;
      if (cause === "republished") {
        // Converted again since this page was made: its tiles now, at the same view.
        window.history.replaceState(null, "", viewState());
        window.location.reload();
        return;
      }
      notice.textContent =
        cause === "failing"
          ? failedTiles + " tile(s) could not be loaded (" + text + "); OpenSeadragon does not " +
            "ask for a failed tile again: reload the page (same view) to try them again."
          : text;
      notice.hidden = false;
    } finally {
      diagnosing = false;
      lastDiagnosis = Date.now();
    }
  }

  viewer.addHandler("tile-load-failed", () => {
    failedTiles += 1;
    explainFailures();
  });
}

main();
