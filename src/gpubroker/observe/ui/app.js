// gpubroker dashboard: reads GET / (the status JSON) every 2 s and at once after a swap or lease
// event on /events, and calls the admin verbs. Vanilla ES2020, no dependencies. Every string
// from the broker reaches the DOM through textContent or an attribute, never as HTML.
"use strict";

(() => {
  // ?poll=<ms> (a test hook): how often GET / is polled, 500..60000, default 2000
  const POLL_MS = pollMs(new URLSearchParams(location.search).get("poll"));
  const FETCH_TIMEOUT_MS = 5000; // a GET nobody answers ends here, so the page can say "stale"
  const ACTION_TIMEOUT_MS = 120000; // an admin verb waits for its swap to finish
  const DEBOUNCE_MS = 100;
  const HISTORY_MS = 5 * 60 * 1000;
  const LOG_LINES = 40;
  const TOKEN_KEY = "gpubroker.adminToken";
  const SVG = "http://www.w3.org/2000/svg";
  const DASH = "–";
  const PALETTE = ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000"];
  const HOLDS_VRAM = new Set(["unknown", "loading", "resident", "draining", "unloading"]);
  const PHASE_OF = {
    swap_started: "draining", draining: "draining", unloading: "unloading", sleeping: "unloading",
    freed: "unloading", unload_failed: "unloading", loading: "loading", waking: "loading",
  };
  const SWAP_END = new Set(["swapped", "swap_failed", "swap_abandoned", "load_failed"]);
  const REFRESH_ON = [
    "queued", "admitted", "refused", "released", "left", "first_byte", "jobs", "reconciled",
    "swap_started", "draining", "unloading", "sleeping", "freed", "unload_failed", "loading",
    "waking", "load_failed", "swap_failed", "swap_abandoned", "swapped", "warning",
    "warning_cleared", "worker_starting", "worker_ready", "worker_failed", "worker_exited",
    "worker_crashed", "worker_stopping", "worker_stopped", "worker_adopted",
  ];

  // the test hooks (docs: notes/ui_contract.md)
  const G = { ready: false, status: null, renders: 0, connected: false, errors: [] };
  window.gpubroker = G;

  const history = new Map(); // gpu key -> [{t, vram %, util %}]
  const swaps = new Map(); // swap id -> {target, phase, requests: Set}
  const owners = new Map(); // owner name -> colour, stable for the page's life
  let pollTimer = null;
  let refreshTimer = null;
  let events = null;
  let workersAdmin = false;
  let lastGood = null; // Date.now() of the last status that rendered
  const started = Date.now();

  function pollMs(raw) {
    const n = Number(raw);
    if (raw === null || raw === "" || !Number.isFinite(n)) return 2000;
    return Math.min(60000, Math.max(500, Math.round(n)));
  }

  // --- small helpers ----------------------------------------------------------------------

  const $ = (sel, root = document) => root.querySelector(sel);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c);
    return node;
  }

  function svg(tag, attrs = {}) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    return node;
  }

  function setText(node, text) {
    const value = text === null || text === undefined ? DASH : String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  function setAttr(node, name, value) {
    if (node.getAttribute(name) !== String(value)) node.setAttribute(name, String(value));
  }

  function field(root, name) {
    return root.querySelector(`[data-field="${name}"]`);
  }

  function gib(bytes) {
    return typeof bytes === "number" ? `${(bytes / 2 ** 30).toFixed(1)} GiB` : DASH;
  }

  function num(value, unit, digits = 0) {
    return typeof value === "number" ? `${value.toFixed(digits)}${unit}` : DASH;
  }

  function duration(ms) {
    if (typeof ms !== "number") return DASH;
    if (ms < 1000) return `${Math.round(ms)} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
    const s = Math.round(ms / 1000);
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function clock(iso) {
    if (!iso) return DASH;
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleTimeString();
  }

  function noteError(text) {
    G.errors.push(text);
    if (G.errors.length > 100) G.errors.splice(0, G.errors.length - 100);
  }

  function badge(node, word) {
    const text = word || "unknown";
    setText(node, text);
    const cls = `badge state-${text.replace(/[^a-z0-9_-]/gi, "")}`;
    if (node.className !== cls) node.className = cls;
  }

  function colourOf(owner) {
    if (!owners.has(owner)) owners.set(owner, PALETTE[owners.size % PALETTE.length]);
    return owners.get(owner);
  }

  // Keep `parent`'s keyed children in the order of `items`, creating and removing as needed;
  // existing nodes are updated in place (and moved only when out of place, so focus stays).
  function keyed(parent, items, keyOf, attr, create, update) {
    const seen = new Set();
    let ref = parent.firstElementChild;
    for (const item of items) {
      const key = String(keyOf(item));
      seen.add(key);
      let node = null;
      for (const c of parent.children) {
        if (c.getAttribute(attr) === key) { node = c; break; }
      }
      if (node === null) {
        node = create(item, key);
        node.setAttribute(attr, key);
      }
      if (node !== ref) parent.insertBefore(node, ref);
      else ref = ref.nextElementSibling;
      update(node, item);
    }
    for (const c of [...parent.children]) {
      if (c.hasAttribute(attr) && !seen.has(c.getAttribute(attr))) c.remove();
    }
  }

  function headers(json) {
    const h = { Accept: "application/json" };
    if (json) h["Content-Type"] = "application/json";
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) h.Authorization = `Bearer ${token}`;
    return h;
  }

  // a signal that aborts the fetch after `ms` (a request nobody answers must end)
  function deadline(ms) {
    const c = new AbortController();
    setTimeout(() => c.abort(new Error(`no answer in ${ms / 1000} s`)), ms);
    return c.signal;
  }

  async function getJson(url, auth = false) {
    const r = await fetch(url, {
      headers: auth ? headers(false) : { Accept: "application/json" },
      cache: "no-store",
      credentials: "same-origin",
      signal: deadline(FETCH_TIMEOUT_MS),
    });
    let body = null;
    try { body = await r.json(); } catch (_) { body = null; }
    return { status: r.status, ok: r.ok, body };
  }

  // --- polling ----------------------------------------------------------------------------

  async function refresh() {
    clearTimeout(pollTimer);
    try {
      const asked = Date.now();
      const r = await getJson("/");
      if (!r.ok || r.body === null) throw new Error(`GET / answered ${r.status}`);
      G.status = r.body;
      render(r.body, asked);
      lastGood = Date.now();
      showNotice(null);
    } catch (err) {
      noteError(`status: ${err.message || err}`);
      showNotice(`the broker does not answer; retrying every ${duration(POLL_MS)}`);
    }
    showConnection();
    await refreshWorkers();
    pollTimer = setTimeout(refresh, POLL_MS);
  }

  function refreshSoon() {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refresh, DEBOUNCE_MS);
  }

  function showNotice(text) {
    const node = $("#notice");
    node.hidden = !text;
    setText(node, text || "");
  }

  // --- the event stream -------------------------------------------------------------------

  function setConnected(live) {
    G.connected = live;
    showConnection();
  }

  // "stale" (no status rendered for 2 polls) wins over "live": an open stream with a status
  // app that stopped answering is not live data
  function showConnection() {
    const node = $("#connection");
    const since = lastGood ?? started;
    const age = Date.now() - since;
    let state = G.connected ? "live" : "reconnecting";
    let text = G.connected ? "live" : "reconnecting…";
    let title = G.connected ? "the /events stream is open" : "the /events stream is down; reconnecting by itself";
    if (age > 2 * POLL_MS && !document.hidden) {
      state = "stale";
      text = `stale — no answer for ${Math.round(age / 1000)} s`;
      title = lastGood === null ? "no status has arrived yet" : `the last status arrived at ${new Date(lastGood).toLocaleTimeString()}`;
      showNotice(`the data shown is stale: the broker has not answered for ${Math.round(age / 1000)} s`);
    }
    setText(node, text);
    setAttr(node, "data-state", state);
    setAttr(node, "title", title);
  }

  function connect() {
    if (events !== null || document.hidden) return;
    const source = new EventSource("/events");
    events = source;
    source.onopen = () => { setConnected(true); refreshSoon(); };
    source.onerror = () => {
      if (events !== source) return;
      setConnected(false);
      if (source.readyState === EventSource.CLOSED) { // refused outright: try again ourselves
        events = null;
        setTimeout(connect, POLL_MS);
      }
    };
    for (const kind of REFRESH_ON) source.addEventListener(kind, onEvent);
    source.addEventListener("shutting_down", () => {
      setConnected(false);
      showNotice("the broker is shutting down; this page reconnects when it is back");
    });
  }

  // a hidden tab lets go of its stream (browsers allow 6 connections per host: six open tabs
  // would use them all) and takes it up again when shown
  function onVisibility() {
    if (document.hidden) {
      if (events !== null) { events.close(); events = null; }
      setConnected(false);
    } else {
      connect();
      refreshSoon();
    }
  }

  function onEvent(message) {
    let data = null;
    try { data = JSON.parse(message.data); } catch (_) { return; }
    trackSwap(message.type, data);
    refreshSoon();
  }

  function trackSwap(kind, data) {
    if (typeof data.swap !== "number") return;
    if (SWAP_END.has(kind)) { swaps.delete(data.swap); return; }
    const phase = PHASE_OF[kind];
    if (!phase) return;
    let s = swaps.get(data.swap);
    if (!s) {
      s = { target: null, phase, requests: new Set(), at: 0 };
      swaps.set(data.swap, s);
    }
    s.at = Date.now();
    if (kind === "swap_started") {
      s.target = data.backend;
      for (const r of data.requests || []) s.requests.add(String(r));
      if (!(data.victims || []).length) s.phase = "loading";
    } else {
      s.phase = phase;
    }
  }

  // The phase of the swap a queued request waits on, read from the status itself: its unit
  // loading, else a victim draining or unloading; the events' word where the status has none.
  function phaseFor(entry, st) {
    if (st && st.swapping) {
      const target = entry.unit || entry.backend;
      const states = [];
      for (const [name, b] of Object.entries(st.backends || {})) {
        for (const u of b.units || []) states.push([u.name || name, u.state]);
        if (!(b.units || []).length) states.push([name, b.state]);
      }
      const mine = states.filter(([n]) => n === target || n === entry.backend).map(([, state]) => state);
      const all = states.map(([, state]) => state);
      if (mine.includes("loading") || mine.includes("waking")) return "loading";
      if (all.includes("draining")) return "draining"; // its own unit may be the victim
      if (all.includes("unloading")) return "unloading";
    }
    for (const s of swaps.values()) {
      if (s.requests.has(String(entry.id)) || (s.target && s.target === entry.backend)) return s.phase;
    }
    return null;
  }

  // --- rendering --------------------------------------------------------------------------

  function render(st, asked) {
    setText($("#owner"), st.vramOwner || "none");
    setText($("#policy"), st.policy);
    setText($("#swap-count"), st.swapCount);
    setText($("#uptime"), duration((st.uptime || 0) * 1000));
    // a status asked for before an event arrived does not undo what that event said
    if (!st.swapping) for (const [id, s] of swaps) if (s.at < asked) swaps.delete(id);
    renderGpus(st);
    renderBackends(st);
    renderQueue(st);
    renderSwaps(st);
    renderWarnings(st);
    G.renders += 1;
    G.ready = true;
  }

  function gpuKeys(st) {
    const keys = (st.gpuPlan || []).map((p) => String(p.gpu));
    for (const g of st.gpus || []) if (!keys.includes(String(g.index))) keys.push(String(g.index));
    return keys;
  }

  function segments(st, key, plan, gpu, total) {
    const out = [];
    for (const [name, b] of Object.entries(st.backends || {})) {
      if (!(b.gpus || []).map(String).includes(key)) continue;
      const share = Math.max(1, (b.gpus || []).length);
      for (const u of b.units || []) {
        if (!HOLDS_VRAM.has(u.state)) continue;
        let bytes = null;
        if (u.model === null && share > 1 && b.measuredByGpu) bytes = b.measuredByGpu[key];
        else if (typeof u.measuredBytes === "number") bytes = u.measuredBytes / share; // telemetry's word
        else if (typeof u.vramBytes === "number") bytes = u.vramBytes / share;
        if (typeof bytes === "number" && bytes > 0) out.push({ owner: u.name || name, bytes });
        // nobody knows its size (the whole GPU, or telemetry is off): it is drawn across the
        // rest of the bar, its size shown as "–", never as 0
        else if (typeof bytes !== "number" && u.state !== "unknown") out.push({ owner: u.name || name, bytes: null });
      }
    }
    let unmanaged = plan && typeof plan.unmanagedBytes === "number" ? plan.unmanagedBytes : null;
    if (unmanaged === null && gpu) {
      unmanaged = (gpu.processes || []).filter((p) => !p.owner).reduce((a, p) => a + (p.usedBytes || 0), 0);
    }
    if (unmanaged) out.push({ owner: "unmanaged", bytes: unmanaged });
    const taken = out.reduce((a, s) => a + (s.bytes || 0), 0);
    const unknown = out.some((s) => s.bytes === null);
    if (typeof total === "number" && !unknown) out.push({ owner: "free", bytes: Math.max(0, total - taken) });
    return out;
  }

  function renderGpus(st) {
    const root = $("#gpus");
    const plans = new Map((st.gpuPlan || []).map((p) => [String(p.gpu), p]));
    const tele = new Map((st.gpus || []).map((g) => [String(g.index), g]));
    const keys = gpuKeys(st);
    const empty = root.querySelector(".empty");
    setText(empty, "no GPUs known"); // said once a status came: "waiting" was before it
    empty.hidden = keys.length > 0;
    keyed(root, keys, (k) => k, "data-gpu", makeGpu, (node, key) => {
      updateGpu(node, st, key, plans.get(key), tele.get(key));
    });
  }

  function makeGpu() {
    const bar = svg("svg", { class: "bar", viewBox: "0 0 1000 28", preserveAspectRatio: "none", role: "img" });
    const defs = svg("defs");
    const pat = svg("pattern", { id: `hatch-${Math.random().toString(36).slice(2)}`, width: 8, height: 8, patternUnits: "userSpaceOnUse", patternTransform: "rotate(45)" });
    pat.append(svg("rect", { width: 8, height: 8, fill: "#8c8c8c" }), svg("line", { x1: 0, y1: 0, x2: 0, y2: 8, stroke: "#ffffff", "stroke-width": 4 }));
    defs.append(pat);
    bar.append(defs, svg("g", { class: "segs" }));
    const chart = svg("svg", { class: "chart", viewBox: "0 0 300 70", preserveAspectRatio: "none", "data-chart": "vram", role: "img", "aria-label": "VRAM and utilisation over the last 5 minutes" });
    chart.append(
      svg("rect", { x: 0, y: 0, width: 300, height: 70, fill: "#f6f6f6" }),
      svg("polyline", { class: "vram", fill: "none", stroke: "#0072b2", "stroke-width": 2, "vector-effect": "non-scaling-stroke", points: "" }),
      svg("polyline", { class: "util", fill: "none", stroke: "#e69f00", "stroke-width": 2, "stroke-dasharray": "5 3", "vector-effect": "non-scaling-stroke", points: "" }),
    );
    const facts = el("dl", { class: "facts" });
    for (const [name, label] of [["used", "used"], ["total", "total"], ["util", "util"], ["power", "power"], ["temp", "temp"], ["clocks", "clocks"]]) {
      facts.append(el("div", {}, el("dt", { text: label }), el("dd", { "data-field": name, text: DASH })));
    }
    return el("article", { class: "gpu" },
      el("h3", { "data-field": "name", text: "GPU" }), el("p", { class: "notice", "data-field": "notice", hidden: "" }), bar, el("ul", { class: "owners" }), facts, chart,
      el("p", { class: "chart-legend" }, el("span", { class: "l-vram", text: "── VRAM %" }), " ", el("span", { class: "l-util", text: "- - utilisation %" }), " · last 5 minutes"));
  }

  function updateGpu(node, st, key, plan, gpu) {
    const total = gpu && typeof gpu.memoryTotal === "number" ? gpu.memoryTotal : plan ? plan.capacityBytes : null;
    const segs = segments(st, key, plan, gpu, total);
    const held = segs.filter((s) => s.owner !== "free");
    const taken = held.some((s) => s.bytes === null) ? null : held.reduce((a, s) => a + s.bytes, 0);
    let used = taken;
    if (gpu && typeof gpu.memoryUsed === "number") used = gpu.memoryUsed;
    else if (plan) used = typeof plan.plannedBytes === "number" ? Math.min(plan.plannedBytes, total ?? Infinity) : null;
    const tele = st.telemetry || {};
    const notice = field(node, "notice");
    setText(notice, tele.notice || tele.error || "");
    notice.hidden = !(tele.notice || tele.error);
    setText(field(node, "name"), gpu ? `GPU ${key}: ${gpu.name}` : `GPU ${key}`);
    setText(field(node, "used"), gib(used));
    setText(field(node, "total"), gib(total));
    setText(field(node, "util"), gpu ? num(gpu.utilization, " %") : DASH);
    const power = gpu && typeof gpu.powerDraw === "number" ? `${gpu.powerDraw.toFixed(0)} W${typeof gpu.powerLimit === "number" ? ` / ${gpu.powerLimit.toFixed(0)} W` : ""}` : DASH;
    setText(field(node, "power"), power);
    setText(field(node, "temp"), gpu ? num(gpu.temperature, " °C") : DASH);
    const clocks = gpu && (typeof gpu.smClock === "number" || typeof gpu.memClock === "number") ? `${gpu.smClock ?? DASH} / ${gpu.memClock ?? DASH} MHz` : DASH;
    setText(field(node, "clocks"), clocks);
    drawBar(node, segs, total);
    pushHistory(key, used, total, gpu ? gpu.utilization : null);
    drawChart(node, key);
  }

  function drawBar(node, segs, total) {
    const bar = node.querySelector("svg.bar");
    const group = bar.querySelector("g.segs");
    const hatch = bar.querySelector("pattern").id;
    const known = segs.filter((s) => s.bytes !== null);
    const unknown = segs.length - known.length;
    const hasTotal = typeof total === "number" && total > 0;
    const sum = hasTotal ? total : known.reduce((a, s) => a + s.bytes, 0) || 1;
    // sizes nobody knows share what the known ones leave (with no total either: equal parts)
    const even = unknown > 0 && !hasTotal;
    const knownW = even ? 0 : Math.min(1000, known.reduce((a, s) => a + (s.bytes / sum) * 1000, 0));
    const restW = unknown > 0 ? (1000 - knownW) / unknown : 0;
    let x = 0;
    const placed = segs.map((s) => {
      const w = even ? 1000 / segs.length : s.bytes === null ? restW : Math.max(0, (s.bytes / sum) * 1000);
      const out = { ...s, x, w };
      x += w;
      return out;
    });
    keyed(group, placed, (s) => s.owner, "data-owner", () => svg("rect", { y: 0, height: 28 }).appendChild(svg("title")).parentNode, (rect, s) => {
      const fill = s.owner === "free" ? "#ffffff" : s.owner === "unmanaged" ? `url(#${hatch})` : colourOf(s.owner);
      setAttr(rect, "x", s.x.toFixed(1));
      setAttr(rect, "width", s.w.toFixed(1));
      setAttr(rect, "fill", fill);
      setAttr(rect, "stroke", "#767676");
      setAttr(rect, "stroke-width", "1");
      setAttr(rect, "vector-effect", "non-scaling-stroke");
      const label = `${s.owner}: ${gib(s.bytes)}`;
      setAttr(rect, "aria-label", label);
      setText(rect.firstChild, label);
    });
    setAttr(bar, "aria-label", `VRAM: ${placed.map((s) => `${s.owner} ${gib(s.bytes)}`).join(", ")}`);
    keyed(node.querySelector(".owners"), placed, (s) => s.owner, "data-legend", (s) => {
      const sw = svg("svg", { viewBox: "0 0 12 12", "aria-hidden": "true" });
      sw.append(svg("rect", { width: 12, height: 12, stroke: "#767676" }));
      return el("li", {}, sw, el("span"));
    }, (li, s) => {
      const fill = s.owner === "free" ? "#ffffff" : s.owner === "unmanaged" ? "#8c8c8c" : colourOf(s.owner);
      setAttr(li.querySelector("rect"), "fill", fill);
      setText(li.querySelector("span"), `${s.owner} ${gib(s.bytes)}`);
    });
  }

  function pushHistory(key, used, total, util) {
    const now = Date.now();
    const list = history.get(key) || [];
    const vram = typeof used === "number" && typeof total === "number" && total > 0 ? (100 * used) / total : null;
    list.push({ t: now, vram, util: typeof util === "number" ? util : null });
    while (list.length && list[0].t < now - HISTORY_MS) list.shift();
    history.set(key, list);
  }

  function drawChart(node, key) {
    const chart = node.querySelector('svg[data-chart="vram"]');
    const list = history.get(key) || [];
    const now = Date.now();
    const points = (prop) => list.filter((p) => p[prop] !== null)
      .map((p) => `${(300 - ((now - p.t) / HISTORY_MS) * 300).toFixed(1)},${(70 - (p[prop] / 100) * 68 - 1).toFixed(1)}`).join(" ");
    setAttr(chart.querySelector(".vram"), "points", points("vram"));
    setAttr(chart.querySelector(".util"), "points", points("util"));
    const last = list[list.length - 1];
    setAttr(chart, "aria-label", `VRAM ${last && last.vram !== null ? last.vram.toFixed(0) : DASH} %, utilisation ${last && last.util !== null ? last.util.toFixed(0) : DASH} % (last 5 minutes)`);
  }

  // backends and their units, in one table body
  function renderBackends(st) {
    const body = $("#backends tbody");
    const rows = [];
    for (const [name, b] of Object.entries(st.backends || {})) {
      rows.push({ key: `b:${name}`, name, b });
      for (const u of b.units || []) rows.push({ key: `u:${u.name}`, name, u });
    }
    keyed(body, rows, (r) => r.key, "data-row", makeBackendRow, updateBackendRow);
    $("#backends-empty").hidden = rows.length > 0;
  }

  function cell(name, label) {
    return el("td", { "data-field": name, "data-label": label, text: DASH });
  }

  function makeBackendRow(row) {
    if (row.u) {
      const tr = el("tr", { "data-unit": row.u.name },
        cell("name", "unit"), el("td", { "data-label": "state" }, el("span", { "data-field": "state", class: "badge" })),
        cell("size", "size"), cell("measured", "measured"), cell("source", "source"), cell("active", "active"), cell("queued", "queued"), el("td"));
      if (row.u.model) {
        tr.lastChild.append(actionButton("swap", { "data-unit": row.u.name }, "make owner", () => ({ url: "/api/swap", body: { backend: row.u.name } })));
      }
      return tr;
    }
    const name = row.name;
    const actions = el("td", { "data-label": "actions" },
      actionButton("unload", { "data-backend": name }, "unload", () => ({ url: "/api/unload", body: { backend: name } })),
      actionButton("swap", { "data-backend": name }, "make owner", () => ({ url: "/api/swap", body: { backend: name } })));
    return el("tr", { "data-backend": name },
      el("td", { "data-label": "backend" }, el("strong", { "data-field": "name" }), el("span", { "data-field": "owner" })),
      el("td", { "data-field": "state", "data-label": "state" }, el("span", { class: "badge" })),
      cell("declared", "declared"), cell("measured", "measured"), cell("health", "health"),
      cell("gpu", "GPU requests"), cell("passthrough", "passthrough"), actions);
  }

  function updateBackendRow(tr, row) {
    if (row.u) {
      const u = row.u;
      setText(field(tr, "name"), u.model || u.name);
      badge(field(tr, "state"), u.state);
      setText(field(tr, "size"), u.vramBytes === null ? "whole GPU" : gib(u.vramBytes));
      setText(field(tr, "measured"), gib(u.measuredBytes));
      setText(field(tr, "source"), u.vramSource);
      setText(field(tr, "active"), `${u.active} active`);
      setText(field(tr, "queued"), `${u.queued} queued`);
      return;
    }
    const b = row.b;
    setText(field(tr, "name"), row.name);
    setText(field(tr, "owner"), b.owner ? " (owner)" : "");
    // a per-model backend (its units are models) is made owner model by model, on its unit
    // rows: the API refuses the backend itself (400)
    const swap = tr.querySelector('button[data-action="swap"]');
    const perModel = (b.units || []).some((u) => u.model);
    if (swap.hidden !== perModel) swap.hidden = perModel;
    badge(tr.querySelector('[data-field="state"] .badge'), b.state);
    setText(field(tr, "declared"), b.declaredVram === null ? "not declared" : gib(b.declaredVram));
    setText(field(tr, "measured"), gib(b.measuredVram));
    const h = b.health || { status: "unknown" };
    const latency = typeof h.latencyMs === "number" ? `, ${h.latencyMs.toFixed(1)} ms` : "";
    setText(field(tr, "health"), `${h.status}${latency}${h.error ? ` (${h.error})` : ""}`);
    setText(field(tr, "gpu"), b.gpuRequests);
    setText(field(tr, "passthrough"), b.passthroughRequests);
  }

  function renderQueue(st) {
    const body = $("#queue tbody");
    const positions = new Map((st.queue || []).map((q) => [String(q.id), q]));
    const rows = [];
    const seen = new Set();
    for (const e of st.liveRequests || []) {
      seen.add(String(e.id));
      rows.push({ ...e, position: positions.has(String(e.id)) ? positions.get(String(e.id)).position : null });
    }
    for (const q of st.queue || []) {
      if (!seen.has(String(q.id))) rows.push({ id: q.id, backend: q.backend, unit: q.unit, state: "queued", position: q.position, queuedMs: q.waitedMs, kind: "lease" });
    }
    rows.sort((a, b) => (a.position ?? -1) - (b.position ?? -1));
    keyed(body, rows, (r) => r.id, "data-lease", () => el("tr", {},
      cell("position", "position"), el("td", { "data-label": "state" }, el("span", { "data-field": "state", class: "badge" })),
      cell("caller", "caller"), cell("unit", "backend / unit"), cell("request", "request"), cell("elapsed", "elapsed"), cell("phase", "swap phase")), updateQueueRow);
    $("#queue-empty").hidden = rows.length > 0;
  }

  function updateQueueRow(tr, e) {
    setText(field(tr, "position"), e.position ?? DASH);
    badge(field(tr, "state"), e.state);
    setText(field(tr, "caller"), e.caller ?? (e.kind === "job" ? "(the service's own job)" : DASH));
    setText(field(tr, "unit"), e.unit && e.unit !== e.backend ? `${e.backend} / ${e.unit}` : e.backend);
    setText(field(tr, "request"), e.method ? `${e.method} ${e.path || e.url || ""}` : DASH);
    setText(field(tr, "elapsed"), duration(e.elapsedMs ?? e.queuedMs));
    const phase = e.state === "queued" ? phaseFor(e, G.status) : null;
    setText(field(tr, "phase"), phase || (e.state === "queued" && G.status && G.status.swapping ? "swapping" : DASH));
  }

  function renderSwaps(st) {
    const list = [...(st.swaps || [])].sort((a, b) => String(b.at).localeCompare(String(a.at)));
    const longest = Math.max(1, ...list.map((s) => s.totalMs || 0));
    keyed($("#swaps"), list, (s) => `${s.at}|${s.to}`, "data-swap", () => el("li", {},
      el("div", { class: "phases", role: "img" },
        el("span", { "data-phase": "drain" }), el("span", { "data-phase": "unload" }), el("span", { "data-phase": "load" })),
      el("div", { class: "text" })), (li, s) => {
      const parts = [["drain", s.drainMs], ["unload", s.unloadMs], ["load", s.loadMs]];
      for (const [phase, ms] of parts) {
        const bar = li.querySelector(`[data-phase="${phase}"]`);
        const width = `${((100 * (ms || 0)) / longest).toFixed(2)}%`;
        if (bar.style.width !== width) bar.style.width = width;
        setAttr(bar, "title", `${phase} ${Math.round(ms || 0)} ms`);
      }
      setAttr(li.firstChild, "aria-label", parts.map(([p, ms]) => `${p} ${Math.round(ms || 0)} ms`).join(", "));
      const evicted = (s.evicted || []).join(", ") || "nothing";
      const failed = (s.failures || []).length ? `; failed: ${s.failures.join("; ")}` : "";
      setText(li.lastChild, `evicted ${evicted} → ${s.to ?? DASH}, ${Math.round(s.totalMs || 0)} ms (${s.reason})${failed} · ${clock(s.at)}`);
    });
    $("#swaps-empty").hidden = list.length > 0;
  }

  function renderWarnings(st) {
    const list = st.warnings || [];
    keyed($("#warnings"), list, (w) => `${w.code}|${w.subject}`, "data-key", (w) => el("li", { "data-code": w.code },
      el("code", { text: w.code }), " ", el("span", { class: "msg" }), " ", el("small", { class: "since" })), (li, w) => {
      setText(li.querySelector(".msg"), w.message);
      setText(li.querySelector(".since"), `since ${clock(w.since)}`);
    });
    $("#warnings-empty").hidden = list.length > 0;
  }

  // --- workers ----------------------------------------------------------------------------

  async function refreshWorkers() {
    let r;
    try {
      r = await getJson("/api/workers", true);
      if (!r.ok || r.body === null) throw new Error(`GET /api/workers answered ${r.status}`);
    } catch (err) {
      noteError(`workers: ${err.message || err}`);
      return;
    }
    workersAdmin = Boolean(r.body.admin);
    const list = r.body.workers || [];
    keyed($("#workers tbody"), list, (w) => w.name, "data-worker", makeWorkerRow, updateWorkerRow);
    $("#workers-empty").hidden = list.length > 0;
    await Promise.all(list.map((w) => refreshLog(w.name)));
  }

  function makeWorkerRow(w) {
    const name = w.name;
    const verb = (v) => actionButton(v, { "data-worker": name }, v, () => ({ url: `/api/workers/${v}`, body: { name } }));
    return el("tr", {},
      cell("name", "worker"), el("td", { "data-label": "state" }, el("span", { "data-field": "state", class: "badge" })),
      cell("pid", "pid"), cell("restarts", "restarts"),
      el("td", { "data-label": "actions" }, verb("start"), verb("stop"), verb("restart")),
      el("td", { "data-label": "log" }, el("pre", { "data-field": "log", tabindex: "0", "aria-label": `${name} log tail` })));
  }

  function updateWorkerRow(tr, w) {
    setText(field(tr, "name"), w.error ? `${w.name} (${w.error})` : w.name);
    badge(field(tr, "state"), w.state);
    setText(field(tr, "pid"), w.pid ?? DASH);
    setText(field(tr, "restarts"), w.restarts);
  }

  async function refreshLog(name) {
    const pre = $(`#workers tr[data-worker="${CSS.escape(name)}"] pre[data-field="log"]`);
    if (!pre) return;
    if (!workersAdmin) {
      setText(pre, "the log needs the admin token (any action here asks for it)");
      return;
    }
    try {
      const r = await getJson(`/api/workers/${encodeURIComponent(name)}/logs?limit=${LOG_LINES}`, true);
      if (!r.ok || r.body === null) throw new Error(r.body && r.body.message ? r.body.message : `answered ${r.status}`);
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      setText(pre, (r.body.lines || []).join("\n") || "(no output yet)");
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    } catch (err) {
      noteError(`log ${name}: ${err.message || err}`);
      setText(pre, `log unavailable: ${err.message || err}`);
    }
  }

  // --- actions ----------------------------------------------------------------------------

  function actionButton(action, attrs, label, request) {
    const b = el("button", { type: "button", "data-action": action, ...attrs, text: label });
    const target = attrs["data-backend"] || attrs["data-worker"] || attrs["data-unit"];
    b.setAttribute("aria-label", `${label}: ${target}`);
    b.addEventListener("click", () => runAction(b, `${action} ${target}`, request()));
    return b;
  }

  async function runAction(button, what, req) {
    button.disabled = true;
    showResult(null, `${what}…`);
    try {
      let r = await post(req);
      // 401: a token would help, so ask; 403: no token can (e.g. the verbs are off), so the
      // API's message shows in #action-result below
      if (r.status === 401) {
        const token = await askToken(r.body && r.body.message);
        if (token !== null) r = await post(req);
      }
      const ok = r.ok && !(r.body && r.body.ok === false);
      const text = describe(what, r);
      if (!ok) noteError(`${what}: ${text}`);
      showResult(ok, text);
    } catch (err) {
      noteError(`${what}: ${err.message || err}`);
      showResult(false, `${what}: ${err.message || err}`);
    } finally {
      button.disabled = false;
      refreshSoon();
    }
  }

  async function post(req) {
    const r = await fetch(req.url, {
      method: "POST",
      headers: headers(true),
      body: JSON.stringify(req.body),
      cache: "no-store",
      credentials: "same-origin",
      signal: deadline(ACTION_TIMEOUT_MS),
    });
    let body = null;
    try { body = await r.json(); } catch (_) { body = null; }
    return { status: r.status, ok: r.ok, body };
  }

  function describe(what, r) {
    const b = r.body;
    if (b === null) return `${what}: HTTP ${r.status}`;
    if (!r.ok) return `${what}: ${b.message || b.error || `HTTP ${r.status}`}${b.error ? ` (${b.error})` : ""}`;
    if (Array.isArray(b.results)) return b.results.map((x) => x.message).join("; ");
    if (b.message) return `${what}: ${b.message}`;
    if (Array.isArray(b.unloaded)) {
      const failed = (b.failures || []).length ? `; failures: ${b.failures.join("; ")}` : "";
      return `unloaded ${b.unloaded.join(", ") || "nothing"} in ${b.ms} ms${failed}`;
    }
    if ("owner" in b) {
      const ev = (b.evicted || []).length ? `, evicted ${b.evicted.join(", ")}` : "";
      return `${b.owner ?? "nobody"} owns the GPU${ev} (${b.ms} ms)`;
    }
    return `${what}: done`;
  }

  function showResult(ok, text) {
    const node = $("#action-result");
    setAttr(node, "data-ok", ok === null ? "" : ok ? "true" : "false");
    setText(node, text);
  }

  function askToken(reason) {
    const dialog = $("#token-dialog");
    const input = $("#token-input");
    const form = $("#token-form");
    const cancel = $("#token-cancel");
    const note = dialog.querySelector("p");
    if (reason) setText(note, `${reason}. The token is kept for this tab only.`);
    input.value = "";
    return new Promise((resolve) => {
      const done = (value) => {
        form.removeEventListener("submit", onSubmit);
        cancel.removeEventListener("click", onCancel);
        dialog.removeEventListener("cancel", onCancel);
        if (dialog.open) dialog.close();
        resolve(value);
      };
      const onSubmit = (ev) => {
        ev.preventDefault();
        const token = input.value.trim();
        if (!token) return;
        sessionStorage.setItem(TOKEN_KEY, token);
        done(token);
      };
      const onCancel = (ev) => { ev.preventDefault(); done(null); };
      form.addEventListener("submit", onSubmit);
      cancel.addEventListener("click", onCancel);
      dialog.addEventListener("cancel", onCancel);
      dialog.showModal();
      input.focus();
    });
  }

  // --- start ------------------------------------------------------------------------------

  function start() {
    setConnected(false);
    document.addEventListener("visibilitychange", onVisibility);
    setInterval(showConnection, 1000);
    connect();
    refresh();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
