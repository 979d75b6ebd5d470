// shipyard dashboard: plain JS over the /v1 API. The bearer token lives in sessionStorage only.
// Pages: /ui (job list) and /ui/jobs/<id> (one job); both poll while something can change.
"use strict";
(function () {
  const TOKEN_KEY = "shipyard.token";
  const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
  const POLL_MS = 3000;
  const app = document.getElementById("app");
  let timer = null;
  const charts = {};

  // -- DOM helpers (text is always set as text: job names and logs are user data) --
  function el(tag, attrs, ...kids) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") n.className = v; else if (k === "text") n.textContent = v;
      else if (k === "style") n.style.cssText = v; else n.setAttribute(k, v);
    }
    for (const k of kids.flat()) if (k !== null && k !== undefined) n.append(k instanceof Node ? k : String(k));
    return n;
  }
  const fmt = (v) => v === null || v === undefined ? "" : (typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(4) : String(v));
  function age(iso) {
    if (!iso) return "";
    const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 90) return Math.round(s) + "s"; if (s < 5400) return Math.round(s / 60) + "m";
    if (s < 172800) return Math.round(s / 3600) + "h"; return Math.round(s / 86400) + "d";
  }
  function bar(progress) {
    const p = progress === null || progress === undefined ? null : Math.round(progress * 100);
    return el("span", {}, el("span", {class: "bar", title: p === null ? "unknown" : p + "%"},
      el("span", {style: "width:" + (p || 0) + "%"})), " ", p === null ? "" : p + "%");
  }
  const state = (s) => el("span", {class: "state state-" + s, "data-state": s}, s);

  // -- API --
  class AuthNeeded extends Error {}
  async function api(path, asText) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const r = await fetch(path, {headers: token ? {Authorization: "Bearer " + token} : {}});
    if (r.status === 401) throw new AuthNeeded((await r.json()).error.message);
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    return asText ? r.text() : r.json();
  }

  function login(message) {
    clearTimeout(timer);
    sessionStorage.removeItem(TOKEN_KEY);
    app.replaceChildren(document.getElementById("login").content.cloneNode(true));
    if (message && sessionStorage.getItem("shipyard.tried")) document.getElementById("login-error").textContent = message;
    document.getElementById("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
      sessionStorage.setItem("shipyard.tried", "1");
      route();
    });
  }

  async function guarded(render) {
    try { await render(); }
    catch (e) {
      if (e instanceof AuthNeeded) return login(e.message);
      app.replaceChildren(el("p", {class: "error", id: "page-error"}, "error: " + e.message));
    }
  }

  // -- job list --
  async function listPage() {
    document.title = "shipyard: jobs";
    const page = await api("/v1/jobs?limit=200");
    const rows = page.items.map((j) => el("tr", {"data-job": j.id},
      el("td", {}, el("a", {href: "/ui/jobs/" + encodeURIComponent(j.id)}, j.id)), el("td", {}, j.name),
      el("td", {}, j.tenant), el("td", {}, state(j.state)), el("td", {}, bar(j.progress)),
      el("td", {}, j.total_steps ? (j.step || 0) + "/" + j.total_steps : fmt(j.step)),
      el("td", {title: j.submitted_at}, age(j.submitted_at)), el("td", {class: "muted"}, j.waiting || j.message || "")));
    app.replaceChildren(el("h1", {}, "Jobs"), el("table", {id: "jobs"},
      el("thead", {}, el("tr", {}, ["id", "name", "tenant", "state", "progress", "step", "age", "note"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", {colspan: 8, class: "muted"}, "no jobs yet")))));
    timer = setTimeout(() => guarded(listPage), POLL_MS * 2);
  }

  // -- one job --
  function series(points) {
    // {name: [[steps], [values]]} plus steps/s derived from the report times (throughput
    // even when the job reports no samples/s of its own).
    const out = {};
    for (const p of points) for (const [k, v] of Object.entries(p.values)) {
      (out[k] = out[k] || [[], []]); out[k][0].push(p.step); out[k][1].push(v);
    }
    const rate = [[], []];
    for (let i = 1; i < points.length; i++) {
      const dt = (Date.parse(points[i].at) - Date.parse(points[i - 1].at)) / 1000, ds = points[i].step - points[i - 1].step;
      if (dt > 0 && ds > 0) { rate[0].push(points[i].step); rate[1].push(ds / dt); }
    }
    if (rate[0].length) out["steps/s"] = rate;
    return out;
  }

  function chart(box, name, data) {
    const width = Math.max(300, box.clientWidth - 20);
    const opts = {width, height: 220, scales: {x: {time: false}}, legend: {show: true},
      axes: [{label: "step"}, {}], series: [{label: "step"}, {label: name, stroke: name === "loss" ? "#dc2626" : "#2563eb",
        width: 1.5, spanGaps: false, points: {show: data[0].length < 60}}]};
    if (charts[name] && charts[name].root.isConnected) charts[name].setData(data);
    else { if (charts[name]) charts[name].destroy(); charts[name] = new uPlot(opts, data, box); }
    // What the chart holds, for people and tests: its point count, last step and last value.
    const card = box.parentNode, n = data[0].length;
    card.setAttribute("data-points", String(n));
    card.setAttribute("data-last-step", n ? String(data[0][n - 1]) : "");
    card.setAttribute("data-last-value", n && data[1][n - 1] !== null ? String(data[1][n - 1]) : "");
  }

  function timeline(attempts, job) {
    if (!attempts.length) return el("p", {class: "muted"}, "no attempts yet");
    const t0 = Date.parse(attempts[0].started_at);
    const ends = attempts.map((a) => a.ended_at ? Date.parse(a.ended_at) : Date.now());
    const span = Math.max(1, Math.max(...ends) - t0);
    const bars = attempts.map((a, i) => {
      const kind = a.kind || (a.ended_at ? "failed" : "running");
      const left = (Date.parse(a.started_at) - t0) / span * 100, width = (ends[i] - Date.parse(a.started_at)) / span * 100;
      const label = "#" + a.number + " " + kind + (a.cause && a.cause !== kind ? ": " + a.cause : "");
      return el("div", {class: "attempt kind-" + kind, "data-kind": kind, "data-cause": a.cause || "",
        style: "left:" + left + "%;width:" + Math.max(width, 0.5) + "%", title: label}, label);
    });
    const rows = attempts.map((a) => {
      const kind = a.kind || (a.ended_at ? "" : "running");
      return el("tr", {class: "attempt-row", "data-kind": kind},
        el("td", {}, a.number), el("td", {}, (a.start_step || 0) + " → " + fmt(a.last_step)),
        el("td", {}, el("span", {class: "state kind-" + kind, style: "color:#fff"}, kind)), el("td", {class: "cause"}, a.cause || ""),
        el("td", {}, fmt(a.committed_step)), el("td", {}, fmt(a.steps_lost)),
        el("td", {}, a.recovery_s === null || a.recovery_s === undefined ? "" : a.recovery_s.toFixed(1) + "s"),
        el("td", {title: a.started_at}, age(a.started_at) + " ago"),
        el("td", {class: "muted", title: a.run || ""}, a.run_number ? "run " + a.run_number : ""));
    });
    const failures = attempts.filter((a) => a.kind && a.kind !== "finished").length;
    const lost = attempts.reduce((n, a) => n + (a.steps_lost || 0), 0);
    const runs = (job.runs || []).length;
    return el("div", {id: "attempts", "data-attempts": attempts.length, "data-failures": failures, "data-runs": runs},
      el("p", {class: "muted"}, (runs > 1 ? runs + " runs, " : "") + attempts.length + " attempt(s), " + failures +
        " interrupted, " + lost + " steps lost"),
      el("div", {class: "timeline"}, bars),
      el("table", {}, el("thead", {}, el("tr", {}, ["#", "steps", "ended", "cause", "committed", "lost", "recovery", "started", "run"]
        .map((h) => el("th", {}, h)))), el("tbody", {}, rows)));
  }

  function checkpoints(job) {
    if (job.checkpoints_error) return el("p", {class: "error"}, job.checkpoints_error);
    if (!job.checkpoints.length) return el("p", {class: "muted"}, job.checkpoint ? "latest: " + job.checkpoint : "no checkpoints");
    return el("table", {id: "checkpoints"}, el("thead", {}, el("tr", {}, ["step", "committed", "epoch", "saved", "size", "uri"].map((h) => el("th", {}, h)))),
      el("tbody", {}, job.checkpoints.slice().reverse().map((c) => el("tr", {},
        el("td", {}, c.step), el("td", {}, c.committed ? "yes" : "no"), el("td", {}, fmt(c.epoch)),
        el("td", {}, c.time ? new Date(c.time * 1000).toLocaleString() : ""),
        el("td", {}, c.bytes ? (c.bytes / 1048576).toFixed(1) + " MiB" : ""), el("td", {}, el("code", {}, c.uri))))));
  }

  async function jobPage(id) {
    const path = "/v1/jobs/" + encodeURIComponent(id);
    const [job, metrics, logs] = await Promise.all([api(path), api(path + "/metrics"), api(path + "/logs?tail=500", true)]);
    document.title = "shipyard: " + job.name;
    let root = document.getElementById("job");
    if (!root || root.dataset.job !== id) {
      root = el("div", {id: "job", "data-job": id},
        el("div", {id: "summary", class: "card"}), el("h2", {}, "Metrics"), el("div", {class: "charts", id: "charts"}),
        el("h2", {}, "Attempts"), el("div", {class: "card", id: "attempts-box"}),
        el("h2", {}, "Checkpoints"), el("div", {class: "card", id: "checkpoints-box"}),
        el("h2", {}, "Events"), el("div", {class: "card", id: "events-box"}),
        el("h2", {}, "Logs"), el("pre", {id: "logs"}));
      app.replaceChildren(el("p", {}, el("a", {href: "/ui"}, "← jobs")), root);
    }
    root.dataset.state = job.state;
    document.getElementById("summary").replaceChildren(
      el("h1", {}, job.name, " ", state(job.state)),
      el("div", {class: "kv"},
        el("div", {}, el("span", {}, "id"), job.id), el("div", {}, el("span", {}, "tenant"), job.tenant),
        el("div", {}, el("span", {}, "priority"), job.priority),
        el("div", {}, el("span", {}, "progress"), bar(job.progress), job.total_steps ? " step " + (job.step || 0) + "/" + job.total_steps : ""),
        el("div", {}, el("span", {}, "submitted"), age(job.submitted_at) + " ago"),
        job.cause ? el("div", {}, el("span", {}, "cause"), job.cause) : null,
        job.message ? el("div", {}, el("span", {}, "message"), job.message) : null,
        job.waiting ? el("div", {}, el("span", {}, "waiting"), job.waiting) : null),
      el("div", {class: "kv muted"}, Object.entries(job.metrics).map(([k, v]) => el("div", {}, el("span", {}, k), fmt(v)))));
    const box = document.getElementById("charts");
    const data = series(metrics.points);
    const names = Object.keys(data).sort((a, b) => (b === "loss") - (a === "loss"));
    if (!names.length) box.replaceChildren(el("p", {class: "muted"}, "no metrics reported yet"));
    for (const name of names) {
      let card = box.querySelector('[data-metric="' + CSS.escape(name) + '"]');
      if (!card) {
        box.querySelector("p.muted")?.remove();
        card = el("div", {class: "card chart", "data-metric": name, id: "chart-" + name.replace(/[^\w-]/g, "_")}, el("h3", {}, name), el("div", {class: "plot"}));
        box.append(card);
      }
      chart(card.querySelector(".plot"), name, data[name]);
    }
    document.getElementById("attempts-box").replaceChildren(timeline(job.attempts, job));
    document.getElementById("checkpoints-box").replaceChildren(checkpoints(job));
    document.getElementById("events-box").replaceChildren(job.events.length
      ? el("table", {}, el("tbody", {}, job.events.slice().sort((a, b) => Date.parse(b.at) - Date.parse(a.at)).map((e) => el("tr", {},
          el("td", {class: "muted", title: e.at}, age(e.at) + " ago"), el("td", {}, e.kind), el("td", {}, e.message)))))
      : el("p", {class: "muted"}, "no events"));
    const pre = document.getElementById("logs");
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 5;
    pre.textContent = logs || "(no output)";
    if (atBottom) pre.scrollTop = pre.scrollHeight;
    if (!TERMINAL.has(job.state)) timer = setTimeout(() => guarded(() => jobPage(id)), POLL_MS);
  }

  function route() {
    clearTimeout(timer);
    document.getElementById("logout").hidden = !sessionStorage.getItem(TOKEN_KEY);
    const m = location.pathname.match(/^\/ui\/jobs\/([^/]+)$/);
    guarded(m ? () => jobPage(decodeURIComponent(m[1])) : listPage);
  }
  document.getElementById("logout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); login(); });
  route();
})();
