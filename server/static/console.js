// The console: reads the service's REST API (the routes scripts use) and shows jobs, quarantine,
// watch folders, storage, the last integrity check and health, every few seconds. Actions
// (retry, cancel) are the same API calls. With auth on, the token typed in is kept in
// sessionStorage (this tab only) and sent as a Bearer header. Data goes into the page as text
// only (textContent), never as HTML.
"use strict";

(function () {
  const TOKEN_KEY = "wsi-console-token";
  const REFRESH_MS = Math.max(1, Number(document.body.dataset.refresh) || 5) * 1000;
  const $ = (id) => document.getElementById(id);
  let timer = null;
  let busy = false;
  let actionError = "";

  class ApiError extends Error {
    constructor(status, message, body) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  function node(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k.startsWith("data-")) e.setAttribute(k, v);
      else e[k] = v;
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === "") continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  async function api(method, path) {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    let response;
    try {
      response = await fetch(path, { method, headers, cache: "no-store" });
    } catch (err) {
      throw new ApiError(0, "the service cannot be reached", null);
    }
    let body = null;
    try {
      body = await response.json();
    } catch (err) {
      body = null;
    }
    if (!response.ok) {
      const message = (body && body.error) || response.statusText || "error";
      throw new ApiError(response.status, message, body);
    }
    return body;
  }

  function bytes(n) {
    if (typeof n !== "number") return "?";
    const units = ["B", "KB", "MB", "GB", "TB", "PB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
  }

  function when(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString();
  }

  function badge(state) {
    return node("span", { class: "badge " + state }, state);
  }

  function fill(id, ...content) {
    const body = $(id).querySelector(".body");
    body.replaceChildren(...content.flat(Infinity).filter((c) => c !== null && c !== undefined));
  }

  function message(text, kind) {
    return node("p", { class: "message " + (kind || "") }, text);
  }

  function table(headers, rows) {
    return node(
      "table",
      {},
      node("thead", {}, node("tr", {}, headers.map((h) => node("th", { scope: "col" }, h)))),
      node(
        "tbody",
        {},
        rows.map((cells) =>
          node(
            "tr",
            {},
            cells.map((c, i) => node("td", { "data-label": headers[i] }, c)),
          ),
        ),
      ),
    );
  }

  function button(label, action, target, title) {
    return node(
      "button",
      { type: "button", class: "action", "data-action": action, "data-target": target, title },
      label,
    );
  }

  // -- panels ------------------------------------------------------------------------------

  function renderHealth(result) {
    const doc = result.ok ? result.value : result.error.body;
    if (!doc || !doc.store) {
      fill("health", message("Health unknown: " + result.error.message, "error"));
      return;
    }
    const items = [
      ["Store", doc.store, doc.store === "reachable"],
      ["Job table", doc.job_table, doc.job_table !== "unavailable"],
      [
        "Ingest loops",
        doc.down && doc.down.length ? "down: " + doc.down.join(", ") : "all running",
        !(doc.down && doc.down.length),
      ],
    ];
    fill(
      "health",
      node(
        "dl",
        { class: "health" },
        items.map(([k, v, good]) => [
          node("dt", {}, k),
          node("dd", { class: good ? "good" : "bad" }, v),
        ]),
      ),
    );
  }

  function jobName(job, names) {
    return (job.slide_id && names[job.slide_id]) || job.name || job.slide_id || job.id;
  }

  function renderJobs(result, names) {
    if (!result.ok) {
      const e = result.error;
      // A 404 is the service's own sentence ("ingest is not enabled (start with --watch ...)"):
      // shown as it is, capitalised, not after a heading that said the same words again.
      const text = e.status === 404 ? e.message.charAt(0).toUpperCase() + e.message.slice(1) + "." : "Jobs unavailable: " + e.message;
      fill("jobs", message(text, e.status === 404 ? "" : "error"));
      return;
    }
    const jobs = result.value.jobs;
    if (!jobs.length) {
      fill("jobs", message("No jobs yet."));
      return;
    }
    const counts = {};
    for (const j of jobs) counts[j.state] = (counts[j.state] || 0) + 1;
    const summary = node(
      "p",
      { class: "summary" },
      Object.entries(counts).map(([s, n]) => [badge(s), " " + n + " "]),
    );
    const rows = jobs.map((j) => {
      const actions = [];
      if (j.state === "failed" || j.state === "cancelled") {
        actions.push(button("Retry", "retry-job", j.id, "Run this job again"));
      }
      if (j.state === "queued" || j.state === "running") {
        actions.push(button("Cancel", "cancel-job", j.id, "Cancel this job"));
      }
      const progress = node("progress", { max: 100, value: j.progress });
      return [
        node("span", { class: "name", "data-job": j.id }, jobName(j, names)),
        badge(j.state),
        node("span", { class: "progress" }, progress, " " + Math.round(j.progress) + "%"),
        String(j.attempts),
        node("span", { class: "error-text" }, [j.error || "", j.warning ? " ⚠ " + j.warning : ""].join("")),
        when(j.updated),
        node("span", { class: "actions" }, actions),
      ];
    });
    fill(
      "jobs",
      summary,
      table(["Slide", "State", "Progress", "Attempts", "Error", "Updated", ""], rows),
    );
  }

  function renderQuarantine(result) {
    if (!result.ok) {
      fill("quarantine", message("Quarantine unavailable: " + result.error.message, "error"));
      return;
    }
    const entries = result.value.quarantined;
    if (!entries.length) {
      fill("quarantine", message("Nothing in quarantine."));
      return;
    }
    const rows = entries.map((q) => [
      node("span", { class: "name", "data-ref": q.ref }, q.name || "Slide " + q.ref),
      node("span", { class: "error-text" }, q.reason || "no reason recorded"),
      when(q.quarantined),
      node("span", { class: "size" }, bytes(q.bytes)),
      button("Retry", "retry-quarantined", q.ref, "Move it back into the watch folder and convert it again"),
    ]);
    fill("quarantine", table(["Slide", "Reason", "Quarantined", "Size", ""], rows));
  }

  function renderWatch(result) {
    if (!result.ok) {
      fill("watch", message("Watch folders unavailable: " + result.error.message, "error"));
      return;
    }
    const folders = result.value.folders;
    if (!folders.length) {
      fill("watch", message("No watch folder is configured."));
      return;
    }
    const parts = folders.map((f) => {
      const head = node("h3", {}, "Folder " + f.index + ": " + f.folder);
      if (!f.available) return [head, message(f.error || "unavailable", "error")];
      const open = f.slides.filter((s) => !s.job || s.job.state !== "done");
      if (!open.length) return [head, message("Nothing waiting.")];
      const rows = open.map((s) => {
        let state;
        if (!s.complete) state = [badge("incomplete"), " " + s.pending.join("; ")];
        else if (s.job) state = badge(s.job.state);
        else state = [badge("waiting"), " complete; waiting " + result.value.quiet_seconds + " s quiet"];
        return [
          node("span", { class: "name" }, s.name),
          node("span", {}, state),
          String(s.files),
          node("span", { class: "size" }, bytes(s.bytes)),
        ];
      });
      return [head, table(["Slide", "State", "Files", "Size"], rows)];
    });
    fill("watch", parts);
  }

  function renderStorage(result) {
    if (!result.ok) {
      fill("storage", message("Storage unavailable: " + result.error.message, "error"));
      return;
    }
    const doc = result.value;
    const total = node(
      "p",
      { class: "summary" },
      node("strong", { id: "storage-total" }, bytes(doc.total_bytes)),
      " in " + doc.count + " published slide" + (doc.count === 1 ? "" : "s"),
      doc.unreadable ? " (" + doc.unreadable + " unreadable)" : "",
    );
    if (!doc.slides.length) {
      fill("storage", total);
      return;
    }
    const rows = doc.slides.map((s) => {
      const share = doc.total_bytes ? (100 * s.stored_bytes) / doc.total_bytes : 0;
      const source = s.source_bytes
        ? bytes(s.source_bytes) + " (stored " + ((100 * s.stored_bytes) / s.source_bytes).toFixed(0) + "%)"
        : "";
      return [
        node("span", { class: "name", title: s.id }, s.name),
        s.case || "",
        node("span", { class: "size" }, bytes(s.stored_bytes)),
        source,
        node("meter", { min: 0, max: 100, value: share, title: share.toFixed(1) + "% of the total" }),
      ];
    });
    fill("storage", total, table(["Slide", "Case", "Stored", "Source", "Share"], rows));
  }

  function renderIntegrity(result) {
    if (!result.ok) {
      const e = result.error;
      fill("integrity", message(e.status === 404 ? "Never run." : "Unavailable: " + e.message, e.status === 404 ? "" : "error"));
      return;
    }
    const doc = result.value || {};
    if (!doc.last_run && !doc.running) {
      fill("integrity", message("Never run."));
      return;
    }
    const damaged = doc.damaged || [];
    const items = [
      ["Last run", doc.last_run ? when(doc.last_run) : "never"],
      ["Running now", doc.running ? "yes" : "no"],
      ["Slides checked", String(doc.slides_checked ?? "?")],
      ["Bytes read", bytes(doc.bytes_read)],
      ["Damaged", damaged.length ? String(damaged.length) : "none"],
    ];
    const list = damaged.map((d) =>
      node("li", {}, typeof d === "string" ? d : d.name || d.slide_id || d.id || JSON.stringify(d)),
    );
    fill(
      "integrity",
      node("dl", { class: "health" }, items.map(([k, v]) => [node("dt", {}, k), node("dd", { class: k === "Damaged" && damaged.length ? "bad" : "" }, v)])),
      list.length ? node("ul", { class: "damaged" }, list) : null,
    );
  }

  // -- refresh, login, actions -------------------------------------------------------------

  function settle(promise) {
    return promise.then(
      (value) => ({ ok: true, value }),
      (error) => ({ ok: false, error }),
    );
  }

  function showProblem(text) {
    const p = $("problem");
    p.textContent = text || "";
    p.hidden = !text;
  }

  function showLogin(refused) {
    $("panels").hidden = true;
    $("login").hidden = false;
    $("forget").hidden = true;
    const label = $("login").querySelector("label");
    label.textContent = refused
      ? "The service refused this token. API token:"
      : "This service requires a token. API token:";
    $("token").focus();
  }

  async function refresh() {
    if (busy) return;
    busy = true;
    clearTimeout(timer);
    try {
      const [health, jobs, quarantine, watch, storage, integrity] = await Promise.all([
        settle(api("GET", "/readyz")),
        settle(api("GET", "/jobs?limit=100")),
        settle(api("GET", "/quarantine")),
        settle(api("GET", "/watch")),
        settle(api("GET", "/storage")),
        settle(api("GET", "/integrity")),
      ]);
      const results = [jobs, quarantine, watch, storage, integrity];
      if (results.some((r) => !r.ok && r.error.status === 401)) {
        showLogin(Boolean(sessionStorage.getItem(TOKEN_KEY)));
        showProblem("");
        return;
      }
      $("login").hidden = true;
      $("panels").hidden = false;
      $("forget").hidden = !sessionStorage.getItem(TOKEN_KEY);
      const names = {};
      if (storage.ok) for (const s of storage.value.slides) names[s.id] = s.name;
      renderHealth(health);
      renderJobs(jobs, names);
      renderQuarantine(quarantine);
      renderWatch(watch);
      renderStorage(storage);
      renderIntegrity(integrity);
      const failed = [health, ...results].filter(
        (r) => !r.ok && (r.error.status === 503 || r.error.status === 0),
      );
      if (failed.length) {
        const e = failed[0].error;
        showProblem(
          (e.status === 0
            ? "The service cannot be reached."
            : "The service is unavailable (HTTP 503: " + e.message + ").") +
            " What is shown may be incomplete; the console tries again every " +
            REFRESH_MS / 1000 + " s.",
        );
      } else {
        showProblem(actionError);
      }
      $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
      document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
    } finally {
      busy = false;
      timer = setTimeout(refresh, REFRESH_MS);
    }
  }

  const ACTIONS = {
    "retry-job": (id) => api("POST", "/jobs/" + encodeURIComponent(id) + "/retry"),
    "cancel-job": (id) => api("DELETE", "/jobs/" + encodeURIComponent(id)),
    "retry-quarantined": (ref) => api("POST", "/quarantine/" + encodeURIComponent(ref) + "/retry"),
  };

  document.addEventListener("click", async (event) => {
    const target = event.target.closest("button.action");
    if (!target) return;
    const act = ACTIONS[target.dataset.action];
    if (!act) return;
    target.disabled = true;
    try {
      await act(target.dataset.target);
      actionError = "";
    } catch (err) {
      actionError = "Could not " + target.textContent.toLowerCase() + ": " + err.message;
      showProblem(actionError);
      target.disabled = false;
      return;
    }
    while (busy) await new Promise((r) => setTimeout(r, 50));
    await refresh();
  });

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    refresh();
  });

  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    refresh();
  });

  refresh();
})();
