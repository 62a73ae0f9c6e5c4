// wsistore viewer: one slide in OpenSeadragon from our DeepZoom tiles, with a scale bar.
// The page carries the slide's geometry in <script id="slide-config"> (see server/routes_viewer.py).
// #viewer's data-state goes loading -> open -> loaded (every tile in view drawn), or error.
"use strict";

(function () {
  const root = document.getElementById("viewer");
  const notice = document.getElementById("notice");
  const config = JSON.parse(document.getElementById("slide-config").textContent);

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

  const suffix = config.query ? "?" + config.query : "";
  const viewer = window.OpenSeadragon({
    element: root,
    prefixUrl: config.osdPrefix,
    showNavigator: true,
    navigatorPosition: "TOP_RIGHT",
    maxZoomPixelRatio: 2,
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

  // Scale bar: the longest 1, 2 or 5 x 10^n length that fits in MAX_BAR_PX screen pixels.
  const MAX_BAR_PX = 160;
  const scalebar = document.getElementById("scalebar");
  const bar = scalebar.querySelector(".bar");
  const label = scalebar.querySelector(".label");

  function niceLength(maxMicrons) {
    const power = Math.pow(10, Math.floor(Math.log10(maxMicrons)));
    for (const m of [5, 2, 1]) {
      if (m * power <= maxMicrons) {
        return m * power;
      }
    }
    return power;
  }

  function formatLength(microns) {
    const round = (v) => Number(v.toPrecision(3));
    if (microns >= 1000) {
      return round(microns / 1000) + " mm";
    }
    if (microns >= 1) {
      return round(microns) + " µm";
    }
    return round(microns * 1000) + " nm";
  }

  function updateScalebar() {
    const item = viewer.world.getItemAt(0);
    if (!config.mppX || !item) {
      return;
    }
    // Screen (CSS) pixels per level-0 pixel at the current zoom.
    const zoom = item.viewportToImageZoom(viewer.viewport.getZoom(true));
    const micronsPerPx = config.mppX / zoom;
    const microns = niceLength(MAX_BAR_PX * micronsPerPx);
    bar.style.width = (microns / micronsPerPx).toFixed(1) + "px";
    label.textContent = formatLength(microns);
    scalebar.hidden = false;
  }

  let failedTiles = 0;
  viewer.addHandler("open", function () {
    root.dataset.state = "open";
    const item = viewer.world.getItemAt(0);
    const loaded = function () {
      root.dataset.state = "loaded";
    };
    if (item.getFullyLoaded()) {
      loaded();
    }
    item.addHandler("fully-loaded-change", function (event) {
      if (event.fullyLoaded) {
        loaded();
      }
    });
    updateScalebar();
  });
  viewer.addHandler("update-viewport", updateScalebar);
  viewer.addHandler("open-failed", function (event) {
    fail("The slide could not be opened: " + (event.message || "unknown error"));
  });
  viewer.addHandler("tile-load-failed", function () {
    failedTiles += 1;
    notice.textContent =
      failedTiles +
      " tile(s) could not be loaded. If this page has been open for long, its link may have " +
      "expired: reload it.";
    notice.hidden = false;
  });
  if (!config.mppX) {
    scalebar.hidden = false;
    label.textContent = "no scale (MPP unknown)";
  }
})();
