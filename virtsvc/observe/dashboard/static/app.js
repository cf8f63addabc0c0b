// The virtsvc dashboard. Plain JavaScript, no libraries: the page follows the server-sent events of
// /api/events (a snapshot, then the calls as they finish and the figures twice a second) and fetches one
// call's whole record from /api/calls/SEQ when it is clicked. Everything a call carries is shown as text
// (textContent), never as markup.
"use strict";

const MAX_CALLS = 1000; // calls kept in the page
const MAX_ROWS = 300; // rows drawn in the tail
const SVG = "http://www.w3.org/2000/svg";

const state = {
  calls: [], // summaries, oldest first
  figures: null,
  scenarios: [],
  unmatched: [],
  server: {},
  selected: null,
  paused: false,
  pending: [], // calls that arrived while paused
};

// -- small helpers --------------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const $ = (id) => document.getElementById(id);

function clock(epochSeconds) {
  const d = new Date(epochSeconds * 1000);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function ms(value) {
  if (value === null || value === undefined) return "–";
  return value >= 100 ? value.toFixed(0) : value >= 10 ? value.toFixed(1) : value.toFixed(2);
}

function pct(part, whole) {
  return whole ? `${((100 * part) / whole).toFixed(part === whole || part === 0 ? 0 : 1)}%` : "–";
}

function json(value) {
  return JSON.stringify(value, null, 2);
}

function firstLine(text) {
  return (text || "").split("\n").slice(0, 2).join(" ").trim();
}

let drawQueued = false;
function redraw() {
  if (drawQueued) return;
  drawQueued = true;
  requestAnimationFrame(() => {
    drawQueued = false;
    drawFilters();
    drawTail();
    drawCharts();
    drawUnmatched();
    drawScenarios();
    drawCounts();
  });
}

// -- filters (kept in the address, so a filtered view can be shared) ---------------------------------------

const filterIds = { scenario: "f-scenario", session: "f-session", method: "f-method", text: "f-text" };

function filters() {
  return {
    scenario: $("f-scenario").value,
    session: $("f-session").value,
    method: $("f-method").value,
    text: $("f-text").value.trim().toLowerCase(),
    errors: $("f-errors").checked,
    unmatched: $("f-unmatched").checked,
  };
}

function admits(call, f) {
  if (f.scenario && call.scenario !== f.scenario) return false;
  if (f.session && call.session !== f.session) return false;
  if (f.method && call.method !== f.method) return false;
  if (f.errors && call.code === "OK") return false;
  if (f.unmatched && call.near_miss === null) return false;
  if (f.text) {
    const hay = [call.method, call.code, call.message, call.rule, call.near_miss, call.session, call.scenario, call.forwarded]
      .join(" ")
      .toLowerCase();
    if (!hay.includes(f.text)) return false;
  }
  return true;
}

function setOptions(select, values, wanted) {
  const current = select.value || wanted || "";
  const have = Array.from(select.options).map((o) => o.value);
  const next = ["", ...values];
  if (have.length === next.length && have.every((v, i) => v === next[i])) return;
  select.replaceChildren(...next.map((v) => el("option", { value: v }, v === "" ? "all" : v)));
  if (next.includes(current)) select.value = current;
  else if (current) {
    select.append(el("option", { value: current }, current));
    select.value = current;
  }
}

function drawFilters() {
  const f = filters();
  const sessions = new Set();
  const methods = new Set();
  const scenarios = new Set(state.scenarios.map((s) => s.name));
  for (const s of (state.figures && state.figures.sessions) || []) {
    scenarios.add(s.scenario);
    if (!f.scenario || s.scenario === f.scenario) sessions.add(s.session);
  }
  for (const m of (state.figures && state.figures.methods) || []) {
    if (!f.scenario || m.scenario === f.scenario) methods.add(m.method);
  }
  setOptions($("f-scenario"), [...scenarios].sort());
  setOptions($("f-session"), [...sessions].sort());
  setOptions($("f-method"), [...methods].sort());
}

function readAddress() {
  const params = new URLSearchParams(location.search);
  for (const [key, id] of Object.entries(filterIds)) {
    const value = params.get(key);
    if (value === null) continue;
    const input = $(id);
    if (input.tagName === "SELECT") {
      input.append(el("option", { value }, value));
    }
    input.value = value;
  }
  $("f-errors").checked = params.get("errors") === "1";
  $("f-unmatched").checked = params.get("unmatched") === "1";
}

function writeAddress() {
  const f = filters();
  const params = new URLSearchParams();
  for (const key of Object.keys(filterIds)) if (f[key]) params.set(key, $(filterIds[key]).value);
  if (f.errors) params.set("errors", "1");
  if (f.unmatched) params.set("unmatched", "1");
  const query = params.toString();
  history.replaceState(null, "", query ? `?${query}` : location.pathname);
}

// -- the tail ---------------------------------------------------------------------------------------------

function drawTail() {
  const f = filters();
  const shown = [];
  for (let i = state.calls.length - 1; i >= 0 && shown.length < MAX_ROWS; i--) {
    if (admits(state.calls[i], f)) shown.push(state.calls[i]);
  }
  const rows = shown.map((call) => {
    const failed = call.code !== "OK";
    const why = call.near_miss !== null
      ? el("span", { class: "miss" }, firstLine(call.near_miss))
      : [call.rule || "", call.forwarded ? ` → ${call.forwarded}` : ""].join("");
    return el(
      "tr",
      {
        "data-seq": call.seq,
        class: call.seq === state.selected ? "selected" : null,
        title: call.message || null,
        onclick: () => select(call.seq),
      },
      el("td", { class: "mono" }, clock(call.started_at)),
      el("td", {}, call.scenario),
      el("td", {}, call.session),
      el("td", { class: "mono", title: call.method }, call.method.slice(call.method.lastIndexOf(".") + 1)),
      el("td", { class: failed ? "code-err" : "code-OK" }, call.code),
      el("td", { class: "num" }, ms(call.duration_ms)),
      el("td", { class: "mono" }, why),
    );
  });
  $("tail").tBodies[0].replaceChildren(...rows);
  $("tail-empty").hidden = shown.length > 0;
  const total = state.calls.filter((c) => admits(c, f)).length;
  $("tail-count").textContent = `${total} shown of the last ${state.calls.length}` +
    (state.paused ? ` (paused, ${state.pending.length} waiting)` : "");
}

function addCalls(calls) {
  if (state.paused) {
    state.pending.push(...calls);
    if (state.pending.length > MAX_CALLS) state.pending.splice(0, state.pending.length - MAX_CALLS);
    return;
  }
  state.calls.push(...calls);
  if (state.calls.length > MAX_CALLS) state.calls.splice(0, state.calls.length - MAX_CALLS);
  for (const call of calls) if (call.near_miss !== null) state.unmatched.push(call);
  if (state.unmatched.length > 100) state.unmatched.splice(0, state.unmatched.length - 100);
}

// -- a call's details -------------------------------------------------------------------------------------

function kv(pairs) {
  const entries = Object.entries(pairs || {});
  if (!entries.length) return el("p", { class: "muted" }, "none");
  return el("dl", { class: "kv" }, entries.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function block(title, value, id) {
  return [el("h3", {}, title), el("pre", { id }, json(value))];
}

async function select(seq) {
  state.selected = seq;
  for (const row of $("tail").tBodies[0].rows) row.classList.toggle("selected", Number(row.dataset.seq) === seq);
  const box = $("details");
  box.replaceChildren(el("p", { class: "muted" }, `loading call ${seq}...`));
  let record;
  try {
    const answer = await fetch(`/api/calls/${seq}`, { credentials: "same-origin" });
    record = await answer.json();
    if (!answer.ok) throw new Error(record.error || answer.statusText);
  } catch (err) {
    box.replaceChildren(el("p", { class: "problem" }, String(err.message || err)));
    return;
  }
  if (state.selected !== seq) return;
  box.replaceChildren(...details(record));
}

function details(r) {
  const failed = r.code !== "OK";
  const out = [
    el("dl", { class: "kv", id: "details-summary" },
      el("dt", {}, "call"), el("dd", {}, `#${r.seq} ${r.method} (${r.kind})`),
      el("dt", {}, "scenario"), el("dd", {}, r.scenario_version === null ? r.scenario : `${r.scenario} v${r.scenario_version}`),
      el("dt", {}, "session"), el("dd", {}, r.session),
      el("dt", {}, "status"), el("dd", { class: failed ? "code-err" : "code-OK" }, r.message ? `${r.code}: ${r.message}` : r.code),
    ),
    el("h3", {}, "Timing"),
    el("dl", { class: "kv", id: "details-timing" },
      el("dt", {}, "started"), el("dd", {}, r.started_at),
      el("dt", {}, "total"), el("dd", {}, `${ms(r.duration_ms)} ms`),
      el("dt", {}, "simulated delay"), el("dd", {}, `${ms(r.delay_ms)} ms`),
      el("dt", {}, "virtsvc's own time"), el("dd", {}, `${ms(r.overhead_ms)} ms`),
    ),
  ];
  if (r.near_miss !== null) {
    out.push(el("h3", {}, "Near miss (no rule answered)"), el("pre", { id: "details-near-miss", class: "miss" }, r.near_miss));
  } else if (r.rule) {
    out.push(el("h3", {}, "Rule that answered"),
      el("p", { id: "details-rule", class: "mono" }, r.rule, r.rule_answers ? el("span", { class: "muted" }, ` (${r.rule_answers})`) : null));
  }
  if (r.forwarded) {
    out.push(el("p", { id: "details-forwarded" }, "Forwarded to the real service ", el("code", {}, r.forwarded), ": the reply below is its answer."));
  }
  out.push(...block(r.requests.length > 1 ? `Requests (${r.requests.length})` : "Request",
    r.requests.length > 1 ? r.requests : r.request, "details-request"));
  out.push(...block(r.replies.length > 1 ? `Replies (${r.replies.length})` : "Reply",
    r.replies.length > 1 ? r.replies : r.reply, "details-reply"));
  if (r.details && r.details.length) out.push(...block("Status details", r.details, "details-status-details"));
  out.push(el("h3", {}, "Metadata received"), kv(r.metadata));
  out.push(el("h3", {}, "Headers sent"), kv(r.headers));
  out.push(el("h3", {}, "Trailers sent"), kv(r.trailers));
  return out;
}

// -- charts ---------------------------------------------------------------------------------------------

function bucketLabel(bounds, i) {
  if (i === bounds.length) return `>${bounds[i - 1] >= 1000 ? bounds[i - 1] / 1000 + "s" : bounds[i - 1]}`;
  const b = bounds[i];
  return b >= 1000 ? `${b / 1000}s` : `${b}`;
}

function merged(methods) {
  // Figures of one method over the scenarios in view (the server counts per scenario and method).
  const byMethod = new Map();
  for (const m of methods) {
    const have = byMethod.get(m.method);
    if (!have) {
      byMethod.set(m.method, { ...m, buckets: [...m.buckets], parts: 1 });
      continue;
    }
    have.calls += m.calls;
    have.errors += m.errors;
    have.unmatched += m.unmatched;
    m.buckets.forEach((n, i) => (have.buckets[i] += n));
    have.p50_ms = have.p90_ms = have.p99_ms = null; // percentiles do not add up: shown per scenario only
    have.parts += 1;
  }
  return [...byMethod.values()];
}

function percentileFromBuckets(bounds, buckets, p) {
  const total = buckets.reduce((a, b) => a + b, 0);
  if (!total) return null;
  let seen = 0;
  for (let i = 0; i < buckets.length; i++) {
    seen += buckets[i];
    if (seen >= p * total) return i < bounds.length ? `≤${bounds[i]}` : `>${bounds[bounds.length - 1]}`;
  }
  return null;
}

function histogram(bounds, buckets) {
  const width = 300, height = 90, left = 4, bottom = 14;
  const n = buckets.length;
  const slot = (width - left) / n;
  const top = Math.max(1, ...buckets);
  const bars = buckets.map((count, i) => {
    const h = count ? Math.max(1, ((height - bottom - 4) * count) / top) : 0;
    return svg("rect", { class: "bar", x: left + i * slot + 1, y: height - bottom - h, width: slot - 2, height: h },
      svg("title", {}, `${bucketLabel(bounds, i)} ms: ${count} call${count === 1 ? "" : "s"}`));
  });
  const labels = buckets.map((_, i) =>
    i % 2 === 0 && i < n - 1
      ? svg("text", { class: "axis", x: left + i * slot + slot / 2, y: height - 3, "text-anchor": "middle" }, bucketLabel(bounds, i))
      : null);
  return svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "latency histogram (ms)" },
    svg("text", { class: "axis", x: width - 2, y: 9, "text-anchor": "end" }, `max ${top}`), bars, labels);
}

function rateBar(m) {
  const width = 300, height = 12;
  const errors = m.calls ? (width * m.errors) / m.calls : 0;
  const miss = m.calls ? (width * m.unmatched) / m.calls : 0;
  return svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "error rate" },
    svg("rect", { class: "rate-bg", x: 0, y: 0, width, height }),
    svg("rect", { class: "rate-err", x: 0, y: 0, width: errors, height }, svg("title", {}, `${m.errors} errors`)),
    svg("rect", { class: "rate-miss", x: 0, y: 0, width: miss, height }, svg("title", {}, `${m.unmatched} unmatched`)));
}

function drawCharts() {
  const fig = state.figures;
  const box = $("charts");
  if (!fig || !fig.methods.length) {
    box.replaceChildren(el("p", { class: "muted" }, "No calls counted yet."));
    return;
  }
  const f = filters();
  const inView = fig.methods.filter((m) => (!f.scenario || m.scenario === f.scenario) && (!f.method || m.method === f.method));
  const methods = merged(inView).sort((a, b) => b.calls - a.calls || a.method.localeCompare(b.method));
  $("charts-scope").textContent = `${f.scenario ? `scenario ${f.scenario}` : "all scenarios"}, all sessions, since the server started`;
  box.replaceChildren(...methods.map((m) => {
    const p50 = m.p50_ms !== null ? ms(m.p50_ms) : percentileFromBuckets(fig.buckets_ms, m.buckets, 0.5);
    const p99 = m.p99_ms !== null ? ms(m.p99_ms) : percentileFromBuckets(fig.buckets_ms, m.buckets, 0.99);
    return el("div", { class: "chart", "data-method": m.method },
      el("h3", {}, m.method),
      histogram(fig.buckets_ms, m.buckets),
      el("div", { class: "figures" },
        `${m.calls} call${m.calls === 1 ? "" : "s"} · p50 ${p50} ms · p99 ${p99} ms · `,
        el("span", { class: m.errors ? "code-err" : "" }, `errors ${m.errors} (${pct(m.errors, m.calls)})`),
        m.unmatched ? el("span", { class: "miss" }, ` · unmatched ${m.unmatched}`) : null),
      rateBar(m));
  }));
}

// -- unmatched calls and scenarios ------------------------------------------------------------------------

function drawUnmatched() {
  const f = filters();
  const items = state.unmatched.filter((c) => (!f.scenario || c.scenario === f.scenario) && (!f.session || c.session === f.session));
  $("unmatched-count").textContent = items.length ? `${items.length} (the most recent first)` : "";
  if (!items.length) {
    $("unmatched").replaceChildren(el("p", { class: "muted" }, "None: every call was answered by a rule."));
    return;
  }
  $("unmatched").replaceChildren(...items.slice().reverse().slice(0, 30).map((c) =>
    el("div", { class: "unmatched-item" },
      el("div", {}, el("a", { href: "#", onclick: (e) => { e.preventDefault(); select(c.seq); } }, `#${c.seq}`),
        ` ${clock(c.started_at)} ${c.method} · ${c.scenario} / ${c.session} · ${c.code}`),
      el("pre", {}, c.near_miss))));
}

let scenariosDrawn = null;
function drawScenarios() {
  const uses = (state.figures && state.figures.rules) || {};
  const key = JSON.stringify([state.scenarios.map((s) => s.name + s.source + s.rules.length), uses]);
  if (key === scenariosDrawn) return;
  scenariosDrawn = key;
  const open = new Set(Array.from(document.querySelectorAll("details.scenario[open]")).map((d) => d.dataset.name));
  const known = new Set();
  const parts = state.scenarios.map((s) => {
    const used = s.rules.reduce((n, r) => n + (uses[r.where] || 0), 0);
    const rows = s.rules.map((r) => {
      known.add(r.where);
      const n = uses[r.where] || 0;
      return el("tr", { class: n ? null : "unused" },
        el("td", { class: "mono" }, r.where), el("td", { class: "mono" }, r.method), el("td", {}, r.answers),
        el("td", { class: "uses" }, n));
    });
    const title = [s.name, s.version !== null ? ` v${s.version}` : "", ` · ${s.rules.length} rule${s.rules.length === 1 ? "" : "s"}`,
      ` · ${used} call${used === 1 ? "" : "s"}`, s.extends ? ` · extends ${s.extends}` : ""].join("");
    return el("details", { class: "scenario", "data-name": s.name, open: open.has(s.name) || state.scenarios.length <= 6 },
      el("summary", {}, title, el("span", { class: "muted" }, ` ${s.source}`)),
      el("table", { class: "rules" },
        el("thead", {}, el("tr", {}, el("th", {}, "rule"), el("th", {}, "method"), el("th", {}, "answers"), el("th", { class: "num" }, "uses"))),
        el("tbody", {}, rows)));
  });
  const others = Object.entries(uses).filter(([where]) => !known.has(where));
  if (others.length) {
    parts.push(el("details", { class: "scenario", open: true },
      el("summary", {}, "Other rules (a session's own, or no longer loaded)"),
      el("table", { class: "rules" }, el("tbody", {}, others.map(([where, n]) =>
        el("tr", {}, el("td", { class: "mono" }, where), el("td", { class: "uses" }, n)))))));
  }
  $("scenarios").replaceChildren(...(parts.length ? parts : [el("p", { class: "muted" }, "No scenarios loaded.")]));
}

function drawCounts() {
  const fig = state.figures;
  if (!fig) return;
  const missed = fig.missed ? ` · ${fig.missed} not counted (the dashboard fell behind)` : "";
  $("counts").textContent = `${fig.seen} call${fig.seen === 1 ? "" : "s"} seen${missed}`;
}

// -- trends from the run history ----------------------------------------------------------------------------

function sparkline(values, cls) {
  const points = values.map((v, i) => [i, v]).filter(([, v]) => v !== null && v !== undefined);
  const width = 160, height = 32;
  if (!points.length) return el("span", { class: "muted" }, "–");
  const top = Math.max(...points.map(([, v]) => v)) || 1;
  const step = values.length > 1 ? width / (values.length - 1) : 0;
  const coords = points.map(([i, v]) => `${(i * step).toFixed(1)},${(height - 2 - ((height - 4) * v) / top).toFixed(1)}`);
  const dots = coords.map((c) => {
    const [x, y] = c.split(",");
    return svg("circle", { class: cls || "", cx: x, cy: y, r: 1.8 });
  });
  return svg("svg", { viewBox: `-3 0 ${width + 6} ${height}`, role: "img" },
    svg("polyline", { class: cls || "", points: coords.join(" ") }), dots);
}

function trendTable(title, label, rows) {
  return [el("h3", {}, title),
    el("table", { class: "trends" },
      el("thead", {}, el("tr", {}, el("th", {}, label), el("th", {}, "error rate"), el("th", {}, "p99 (ms)"), el("th", {}, "last run"))),
      el("tbody", {}, rows.map((row) => {
        const rate = row.error_rate[row.error_rate.length - 1];
        const p99 = row.p99_ms[row.p99_ms.length - 1];
        return el("tr", { class: row.flaky ? "trend flaky" : "trend" },
          el("td", { class: "mono" }, row.name, row.flaky ? el("span", { class: "code-err" }, " flaky") : null),
          el("td", {}, sparkline(row.error_rate, "err")),
          el("td", {}, sparkline(row.p99_ms)),
          el("td", {}, rate === null || rate === undefined ? "no calls" : `${pct(Math.round(rate * 1e4), 1e4)} · p99 ${ms(p99)} ms`));
      })))];
}

async function loadTrends() {
  const section = $("trends-section");
  if (!state.server.history) return;
  section.hidden = false;
  $("trends-source").textContent = state.server.history;
  let data;
  try {
    const answer = await fetch("/api/history", { credentials: "same-origin" });
    data = await answer.json();
  } catch (err) {
    $("trends").replaceChildren(el("p", { class: "problem" }, String(err)));
    return;
  }
  if (!data.available) {
    $("trends").replaceChildren(el("p", { class: "muted", id: "trends-reason" }, data.reason));
    return;
  }
  if (!data.runs.length) {
    $("trends").replaceChildren(el("p", { class: "muted" }, "The history holds no runs yet."));
    return;
  }
  const first = data.runs[0], last = data.runs[data.runs.length - 1];
  const parts = [el("p", { class: "muted" }, `${data.runs.length} run${data.runs.length === 1 ? "" : "s"}, ${first.at} to ${last.at}`)];
  if (data.flaky.length) {
    parts.push(el("h3", {}, "Flaky tests: their answers changed between runs on the same scenario versions"),
      el("div", { id: "trends-flaky" }, data.flaky.map((f) => el("div", { class: "unmatched-item" },
        el("div", { class: "mono" }, `${f.test} · changed ${f.times} time${f.times === 1 ? "" : "s"} · runs ${f.before} → ${f.after}`),
        el("pre", {}, f.changes.join("\n"))))));
  }
  if (data.tests.length) {
    parts.push(...trendTable("Per test", "test", data.tests.map((t) => ({ ...t, name: t.test }))));
  }
  if (data.methods.length) {
    parts.push(...trendTable("Per method", "scenario · method", data.methods.map((m) => ({ ...m, name: `${m.scenario} · ${m.method}` }))));
  }
  $("trends").replaceChildren(...parts);
}

// -- the live stream ----------------------------------------------------------------------------------------

function live(on, text) {
  const badge = $("live");
  badge.className = `live ${on ? "on" : "off"}`;
  badge.textContent = text;
}

function connect() {
  const events = new EventSource("/api/events", { withCredentials: true });
  events.addEventListener("snapshot", (e) => {
    const snap = JSON.parse(e.data);
    const first = !state.server.address && !state.server.history;
    state.server = snap.server || {};
    state.calls = snap.calls;
    state.pending = [];
    state.unmatched = snap.unmatched;
    state.figures = snap.figures;
    state.scenarios = snap.scenarios.list;
    const bits = [state.server.address ? `gRPC ${state.server.address}` : "", state.server.default_scenario ? `default scenario ${state.server.default_scenario}` : ""];
    $("server").textContent = bits.filter(Boolean).join(" · ");
    live(true, "live");
    if (first) loadTrends();
    redraw();
  });
  events.addEventListener("calls", (e) => {
    addCalls(JSON.parse(e.data));
    redraw();
  });
  events.addEventListener("figures", (e) => {
    state.figures = JSON.parse(e.data);
    redraw();
  });
  events.addEventListener("scenarios", (e) => {
    state.scenarios = JSON.parse(e.data).list;
    redraw();
  });
  events.onerror = () => live(false, events.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting");
}

function init() {
  readAddress();
  for (const id of ["f-scenario", "f-session", "f-method", "f-errors", "f-unmatched"]) {
    $(id).addEventListener("change", () => { writeAddress(); redraw(); });
  }
  $("f-text").addEventListener("input", () => { writeAddress(); redraw(); });
  $("pause").addEventListener("click", () => {
    state.paused = !state.paused;
    $("pause").textContent = state.paused ? "Resume" : "Pause";
    if (!state.paused) {
      const pending = state.pending;
      state.pending = [];
      addCalls(pending);
    }
    redraw();
  });
  $("trends-refresh").addEventListener("click", loadTrends);
  connect();
}

document.addEventListener("DOMContentLoaded", init);
