// fleetban dashboard: a single page over the REST API, with the token kept
// in session storage. Pages are chosen by the URL fragment (#/overview,
// #/hosts, #/blocks, #/shadow, #/live, #/attacker/<address or range>), so a
// reload or a shared link shows the same page; the chosen chart range is
// kept in local storage. Every value from the API is inserted with
// textContent or as an SVG attribute, never as HTML: log lines and names
// come from the outside world. Write controls are only built for tokens
// whose role may write (GET /api/v1/whoami).
"use strict";

const TOKEN_KEY = "fleetban_token";
const RANGE_KEY = "fleetban_range";
const SPLIT_KEY = "fleetban_split";
const POLL_MS = 5000;
const SVG_NS = "http://www.w3.org/2000/svg";
const RANGES = ["1h", "24h", "7d", "30d"];
const PALETTE = ["#4fa3ff", "#ff6b6b", "#f5b942", "#5fd38d", "#c17bff", "#42d4f5", "#ff9f6b", "#9aa5b1",
  "#e86bb5", "#b5d44f"];
const BLOCK_COLOURS = { made: "#ff6b6b", expired: "#9aa5b1", revoked: "#4fa3ff" };
const VIEWS = ["overview", "hosts", "blocks", "shadow", "live", "attacker"];

const state = {
  me: null,           // {name, role, can_write}
  timer: null,
  view: null,
  arg: "",
  seenEvents: new Set(),
  agents: [],
  stats: null,
  charts: new Map(),  // container id -> the arguments it was last drawn with
};

const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem(TOKEN_KEY); }
function canWrite() { return Boolean(state.me && state.me.can_write); }

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, accept) {
  const response = await fetch(path, { method, headers: { Authorization: "Bearer " + token() } });
  if (response.status === 401) { signOut("The token was refused."); throw new ApiError(401, "unauthorized"); }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { const body = await response.json(); if (body.error) message = body.error.message; } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, message);
  }
  if (response.status === 204) return null;
  return accept === "text" ? response.text() : response.json();
}

// ---- small DOM helpers ----------------------------------------------------

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function cell(row, text, cls) {
  const td = el("td", text === null || text === undefined ? "" : text, cls);
  row.appendChild(td);
  return td;
}

function link(href, text) {
  const a = el("a", text);
  a.href = href;
  return a;
}

function attackerLink(target) { return link("#/attacker/" + encodeURIComponent(target), target); }

function svg(tag, attrs) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

function fill(tableId, rows, render, empty) {
  const table = $(tableId);
  const fresh = document.createElement("tbody");
  for (const item of rows) fresh.appendChild(render(item));
  if (rows.length === 0 && empty) {
    const tr = el("tr", null, "empty");
    const td = cell(tr, empty);
    td.colSpan = table.querySelectorAll("thead th").length;
    fresh.appendChild(tr);
  }
  table.querySelector("tbody").replaceWith(fresh);
}

function replaceChildren(parent, children) {
  while (parent.firstChild) parent.removeChild(parent.firstChild);
  for (const c of children) parent.appendChild(c);
}

// ---- time formatting ------------------------------------------------------

function ago(iso) {
  if (!iso) return "never";
  const secs = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (secs < 60) return secs + " s ago";
  if (secs < 3600) return Math.round(secs / 60) + " min ago";
  if (secs < 86400) return Math.round(secs / 3600) + " h ago";
  return Math.round(secs / 86400) + " d ago";
}

function until(iso, active) {
  if (!iso) return active ? "permanent" : "";
  const secs = Math.round((Date.parse(iso) - Date.now()) / 1000);
  if (secs <= 0) return "ended " + ago(iso);
  if (secs < 3600) return "in " + Math.ceil(secs / 60) + " min";
  if (secs < 86400) return "in " + Math.round(secs / 3600) + " h";
  return "in " + Math.round(secs / 86400) + " d";
}

function secs(n) {
  if (n < 60) return n.toFixed(1) + " s";
  if (n < 3600) return Math.round(n / 60) + " min";
  return Math.round(n / 3600) + " h";
}

function clock(iso, stepSecs) {
  const d = new Date(iso);
  const two = (n) => String(n).padStart(2, "0");
  const hm = two(d.getHours()) + ":" + two(d.getMinutes());
  if (stepSecs >= 3600) return (d.getMonth() + 1) + "/" + d.getDate() + " " + hm;
  return hm;
}

// Colours of a chart's series: a key gets the same colour on every page
// load (a hash of its name), moved to the next free one when another key of
// the same chart already has it.
function colours(doc) {
  const out = new Map();
  const used = new Set();
  for (const line of doc.series) {
    if (BLOCK_COLOURS[line.key]) { out.set(line.key, BLOCK_COLOURS[line.key]); continue; }
    let h = 0;
    for (const c of line.key) h = (h * 31 + c.codePointAt(0)) >>> 0;
    let i = h % PALETTE.length;
    for (let n = 0; n < PALETTE.length && used.has(i); n++) i = (i + 1) % PALETTE.length;
    used.add(i);
    out.set(line.key, PALETTE[i]);
  }
  return out;
}

// ---- charts (inline SVG) --------------------------------------------------

// A stacked bar chart of a series document {buckets, step_secs, series}.
// Each non-zero value is a <rect class="bar"> carrying data-key, data-bucket
// and data-value, with a <title> for pointer users; the chart as a whole is
// an image with a text summary for screen readers.
// Drawn at the container's pixel width (redrawn when the window is resized),
// so that text is never stretched.
function stackedChart(container, doc, label, height) {
  state.charts.set(container.id, [doc, label, height]);
  const W = Math.max(200, container.clientWidth || 900), H = height, left = 44, bottom = 18, top = 8;
  const n = doc.buckets.length;
  const totals = new Array(n).fill(0);
  for (const line of doc.series) line.values.forEach((v, i) => { totals[i] += v; });
  const max = Math.max(1, ...totals);
  const sum = totals.reduce((a, b) => a + b, 0);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
    "aria-label": label + ": " + sum + " in all", class: "svg-chart", "data-total": sum, "data-buckets": n });
  const plotH = H - bottom - top;
  const bw = (W - left) / n;
  chart.appendChild(svg("line", { x1: left, y1: top + plotH, x2: W, y2: top + plotH, class: "axis" }));
  const yMax = svg("text", { x: left - 4, y: top + 10, "text-anchor": "end", class: "tick" });
  yMax.textContent = String(max);
  chart.appendChild(yMax);
  const y0 = svg("text", { x: left - 4, y: top + plotH, "text-anchor": "end", class: "tick" });
  y0.textContent = "0";
  chart.appendChild(y0);
  for (const i of [0, Math.floor(n / 2), n - 1]) {
    if (i < 0 || i >= n) continue;
    const t = svg("text", { x: left + i * bw + bw / 2, y: H - 4, "text-anchor": i === 0 ? "start" : i === n - 1 ? "end" : "middle", class: "tick" });
    t.textContent = clock(doc.buckets[i], doc.step_secs);
    chart.appendChild(t);
  }
  const base = new Array(n).fill(0);
  const colour = colours(doc);
  for (const line of doc.series) {
    line.values.forEach((v, i) => {
      if (v <= 0) return;
      const h = (v / max) * plotH;
      const y = top + plotH - ((base[i] + v) / max) * plotH;
      base[i] += v;
      const rect = svg("rect", { x: left + i * bw + 0.5, y, width: Math.max(1, bw - 1), height: Math.max(0.5, h),
        fill: colour.get(line.key), class: "bar", "data-key": line.key, "data-bucket": doc.buckets[i], "data-value": v });
      const title = svg("title");
      title.textContent = line.key + ": " + v + " at " + clock(doc.buckets[i], doc.step_secs);
      rect.appendChild(title);
      chart.appendChild(rect);
    });
  }
  replaceChildren(container, [chart]);
}

function legend(listId, doc) {
  const colour = colours(doc);
  replaceChildren($(listId), doc.series.map((line) => {
    const li = el("li");
    const swatch = el("span", null, "swatch");
    swatch.setAttribute("aria-hidden", "true");
    // A presentation attribute on an SVG element: allowed by the CSP.
    const box = svg("svg", { width: 10, height: 10, viewBox: "0 0 10 10" });
    box.appendChild(svg("rect", { width: 10, height: 10, fill: colour.get(line.key) }));
    swatch.appendChild(box);
    li.appendChild(swatch);
    li.appendChild(el("span", line.key + " " + line.total));
    li.dataset.key = line.key;
    return li;
  }));
}

function sparkline(values, ceiling) {
  const W = 300, H = 40;
  const max = Math.max(1, ceiling || 0, ...values);
  const n = values.length;
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "spark", preserveAspectRatio: "none", "aria-hidden": "true" });
  if (ceiling) {
    const y = H - (ceiling / max) * (H - 2);
    s.appendChild(svg("line", { x1: 0, y1: y, x2: W, y2: y, class: "ceiling", "vector-effect": "non-scaling-stroke" }));
  }
  const points = values.map((v, i) => `${(i / Math.max(1, n - 1)) * W},${H - (v / max) * (H - 2)}`).join(" ");
  s.appendChild(svg("polyline", { points, class: "usage", "vector-effect": "non-scaling-stroke" }));
  return s;
}

// ---- pages ----------------------------------------------------------------

function currentRange() {
  const r = localStorage.getItem(RANGE_KEY);
  return RANGES.includes(r) ? r : "24h";
}

async function loadStats() {
  const stats = await api("GET", "/api/v1/stats");
  state.stats = stats;
  $("stat-blocks").textContent = stats.active_blocks;
  $("stat-agents").textContent = stats.agents_connected + " / " + stats.agents_total;
  $("stat-version").textContent = stats.blocklist_version;
  $("stat-lag").textContent = stats.propagation_lag_secs.toFixed(1) + " s";
}

function currentSplit() {
  return localStorage.getItem(SPLIT_KEY) === "host" ? "host" : "kind";
}

async function showOverview() {
  const range = currentRange();
  const split = currentSplit();
  for (const input of document.querySelectorAll('#range-picker input')) input.checked = input.value === range;
  $("split").value = split;
  $("abuse-table-key").textContent = split;
  const [abuse, blocks, slots, attackers] = await Promise.all([
    api("GET", "/api/v1/timeseries/abuse?range=" + range + "&by=" + split),
    api("GET", "/api/v1/timeseries/blocks?range=" + range),
    api("GET", "/api/v1/timeseries/slots?range=" + range),
    api("GET", "/api/v1/attackers?since=24h&limit=10"),
    loadStats(),
  ]);
  const total = abuse.series.reduce((a, l) => a + l.total, 0);
  $("attacks-summary").textContent = total === 0
    ? "No abuse in the last " + range + "."
    : total + " abuse events in the last " + range + " (" + abuse.series.length + (split === "host" ? " hosts" : " kinds") + ", one bar per " +
      Math.round(abuse.step_secs / 60) + " min).";
  stackedChart($("abuse-chart"), abuse, "Abuse events per " + Math.round(abuse.step_secs / 60) + " min, last " + range, 220);
  legend("abuse-legend", abuse);
  fill("abuse-table", abuse.series, (line) => {
    const tr = el("tr");
    cell(tr, line.key);
    cell(tr, line.total);
    const peak = Math.max(...line.values);
    const at = line.values.indexOf(peak);
    cell(tr, peak + " at " + clock(abuse.buckets[at], abuse.step_secs));
    return tr;
  }, "no abuse");
  stackedChart($("blocks-chart"), blocks, "Blocks made, expired and revoked, last " + range, 120);
  legend("blocks-legend", blocks);
  replaceChildren($("slots"), slots.hosts.length === 0 ? [el("li", "No host reported connection counts in this range.", "muted")]
    : slots.hosts.map((h) => {
      const li = el("li");
      const peak = Math.max(...h.max_connections);
      const refused = h.refused_full.reduce((a, b) => a + b, 0);
      const ceiling = h.smtp_accept_max;
      const full = ceiling && peak >= ceiling;
      li.dataset.agent = h.agent;
      li.appendChild(el("span", h.agent, "host"));
      li.appendChild(el("span", "peak " + peak + (ceiling ? " / " + ceiling : "") + (refused ? ", " + refused + " refused while full" : ""),
        full ? "bad" : "muted"));
      li.appendChild(sparkline(h.max_connections, ceiling));
      return li;
    }));
  fill("attackers", attackers, (a) => {
    const tr = el("tr");
    cell(tr, "").appendChild(attackerLink(a.ip));
    cell(tr, a.hosts);
    cell(tr, a.events);
    cell(tr, a.kinds.join(", "));
    cell(tr, asText(a.asn));
    cell(tr, a.blocked ? "yes" : "no", a.blocked ? "ok" : "");
    return tr;
  }, "no attackers in 24 h");
}

function asText(asn) {
  return asn ? "AS" + asn.asn + " " + asn.name + (asn.country ? " (" + asn.country + ")" : "") : "";
}

async function loadAgents() {
  state.agents = await api("GET", "/api/v1/agents");
  const select = $("f-host");
  const chosen = select.value;
  const options = [el("option", "any")];
  options[0].value = "";
  for (const a of state.agents) {
    const o = el("option", a.name);
    o.value = a.id;
    options.push(o);
  }
  replaceChildren(select, options);
  select.value = chosen;
}

async function showHosts() {
  await Promise.all([loadAgents(), loadStats()]);
  const version = state.stats.blocklist_version;
  const online = state.agents.filter((a) => a.connected).length;
  const behind = state.agents.filter((a) => a.connected && a.blocklist_version < version).length;
  $("hosts-summary").textContent = online + " of " + state.agents.length + " hosts online; " +
    (behind === 0 ? "every online host has blocklist version " + version + "." : behind + " online hosts behind version " + version + ".");
  replaceChildren($("hostmap"), state.agents.map((a) => {
    const li = el("li", null, "host-card");
    li.dataset.agentId = a.id;
    const status = a.revoked_at ? "revoked" : a.connected ? "online" : "offline";
    li.classList.add("host-" + status);
    li.appendChild(el("h3", a.name));
    const dl = el("dl");
    const row = (k, v, cls) => { dl.appendChild(el("dt", k)); dl.appendChild(el("dd", v, cls)); };
    row("state", status, status === "online" ? "ok" : "bad");
    row("host", a.hostname);
    const lag = version - a.blocklist_version;
    row("blocklist", lag <= 0 ? "in sync (v" + a.blocklist_version + ")" : lag + " versions behind (v" + a.blocklist_version + ")",
      lag <= 0 ? "ok" : "bad");
    row("lag", a.lag_secs > 0 ? "oldest change waiting " + secs(a.lag_secs) : "none", a.lag_secs > 5 ? "bad" : "ok");
    row("firewall entries", a.firewall_entries);
    row("last seen", ago(a.last_seen));
    row("version", a.version);
    li.appendChild(dl);
    return li;
  }));
}

function blockRow(b, withActions) {
  const tr = el("tr");
  tr.dataset.blockId = b.id;
  cell(tr, b.id);
  cell(tr, "").appendChild(attackerLink(b.cidr));
  cell(tr, b.source);
  cell(tr, b.why, "why");
  cell(tr, b.evidence.agents);
  cell(tr, b.evidence.events);
  cell(tr, b.evidence.kinds.join(", "));
  cell(tr, ago(b.created_at));
  cell(tr, b.active ? until(b.expires_at, true) : "ended " + ago(b.revoked_at || b.expires_at));
  const td = cell(tr, "");
  if (withActions && b.active && canWrite()) td.appendChild(unblockButton(b));
  return tr;
}

function unblockButton(b) {
  const button = el("button", "Unblock", "unblock");
  button.type = "button";
  button.dataset.id = b.id;
  button.setAttribute("aria-label", "Unblock " + b.cidr);
  button.addEventListener("click", () => unblock(b, button));
  return button;
}

async function showBlocks() {
  if (state.agents.length === 0) await loadAgents();
  const f = (id) => $(id).value;
  const params = new URLSearchParams({ limit: "200", active: f("f-state") === "active" ? "true" : "false" });
  if (f("f-source")) params.set("source", f("f-source"));
  if (f("f-rule")) params.set("rule", f("f-rule"));
  if (f("f-host")) params.set("agent", f("f-host"));
  let blocks = await api("GET", "/api/v1/blocks?" + params);
  if (f("f-state") === "ended") blocks = blocks.filter((b) => !b.active);
  fill("blocks", blocks, (b) => blockRow(b, true), "no blocks match");
}

async function showShadow() {
  const decisions = await api("GET", "/api/v1/shadow?since=7d&limit=200");
  fill("shadow", decisions, (d) => {
    const tr = el("tr");
    const ev = d.evidence || {};
    cell(tr, ago(d.decided_at));
    cell(tr, "").appendChild(attackerLink(d.cidr));
    cell(tr, d.rule);
    cell(tr, d.source);
    cell(tr, ev.verdict || (ev.local && (ev.local.reason + ": " + ev.local.evidence)) || "", "why");
    return tr;
  }, "no shadow decisions");
}

// The service an event's line came from: `smtp` for Exim's (and for events
// stored before services were recorded), `imap`, `pop3`, ... for Dovecot's.
function serviceOf(e) { return e.service || "smtp"; }

// "auth_failed · IMAP": the kind and the service, on every event shown.
function kindAndService(e) { return e.kind + " \u00b7 " + serviceOf(e).toUpperCase(); }

async function showLive() {
  const all = $("feed-all").checked;
  // Bounded to a day: with no abuse for a while, an unbounded search would
  // read back through every stored day on each poll.
  const events = await api("GET", "/api/v1/events?limit=50&since=24h" + (all ? "" : "&abuse=true"));
  const list = $("feed");
  for (const e of events.slice().reverse()) {
    if (state.seenEvents.has(e.id)) continue;
    state.seenEvents.add(e.id);
    const li = el("li");
    li.dataset.kind = e.kind;
    li.dataset.service = serviceOf(e);
    li.appendChild(el("span", new Date(e.time).toLocaleTimeString() + "  " + e.agent + "  ", "muted"));
    li.appendChild(el("strong", kindAndService(e)));
    li.appendChild(document.createTextNode("  "));
    li.appendChild(attackerLink(e.remote.replace(/\/(32|128)$/, "")));
    if (e.raw) li.appendChild(el("div", e.raw, "raw"));
    list.insertBefore(li, list.firstChild);
  }
  while (list.childNodes.length > 200) list.removeChild(list.lastChild);
  if (list.childNodes.length === 0) list.appendChild(el("li", all ? "No events yet." : "No abuse yet.", "muted empty"));
  else for (const e of list.querySelectorAll(".empty")) e.remove();
}

function isRange(target) {
  const m = target.match(/\/(\d+)$/);
  if (!m) return false;
  const bits = Number(m[1]);
  return !(bits === 32 && !target.includes(":")) && bits !== 128;
}

async function showAttacker(target) {
  $("h-attacker").textContent = (isRange(target) ? "Range " : "Address ") + target;
  $("attacker-error").textContent = "";
  $("attacker-report").hidden = true;
  $("report-load").dataset.target = target;
  if (isRange(target)) return showRange(target);
  $("range-panel").hidden = true;
  const address = target.replace(/\/(32|128)$/, "");
  let detail;
  try {
    detail = await api("GET", "/api/v1/attackers/" + encodeURIComponent(address));
  } catch (error) {
    if (error.status === 404 || error.status === 400) {
      clearAttacker();
      $("attacker-error").textContent = error.status === 404 ? "Nothing is known about " + address + "." : error.message;
      return;
    }
    throw error;
  }
  const shadow = await api("GET", "/api/v1/shadow?since=30d&limit=20&contains=" + encodeURIComponent(address));
  const s = detail.summary;
  const card = (label, value) => {
    const d = el("div", null, "card");
    d.appendChild(el("span", label, "label"));
    d.appendChild(el("span", value, "value"));
    return d;
  };
  replaceChildren($("attacker-cards"), [
    card("hosts", s ? s.hosts : 0),
    card("abuse events", s ? s.events : 0),
    card("last seen", s ? ago(s.last_seen) : "–"),
    card("network", asText(detail.asn) || "unknown"),
  ]);
  const live = detail.blocks.find((b) => b.active);
  const latest = live || detail.blocks[0];
  const lines = [];
  if (live) lines.push("Blocked (block #" + live.id + ", " + live.cidr + "): " + live.why);
  else if (latest) lines.push("Not blocked now. It was blocked (block #" + latest.id + ", " + latest.cidr + "): " + latest.why);
  else lines.push("Not blocked." + (s ? " " + s.events + " abuse events from " + s.hosts + " hosts (" + s.kinds.join(", ") + ") did not meet a rule." : ""));
  for (const d of shadow) lines.push("Shadow rule " + d.rule + " would have blocked " + d.cidr + " " + ago(d.decided_at) + ": " + ((d.evidence && d.evidence.verdict) || "") );
  replaceChildren($("attacker-why"), lines.map((l) => el("span", l, "line")));
  fill("attacker-blocks", detail.blocks, (b) => {
    const tr = el("tr");
    tr.dataset.blockId = b.id;
    cell(tr, b.id);
    cell(tr, b.cidr);
    cell(tr, b.active ? "active, ends " + until(b.expires_at, true) : "ended", b.active ? "bad" : "muted");
    cell(tr, b.why, "why");
    cell(tr, ago(b.created_at));
    const td = cell(tr, "");
    if (b.active && canWrite()) td.appendChild(unblockButton(b));
    return tr;
  }, "never blocked");
  fill("attacker-hosts", detail.hosts, (h) => {
    const tr = el("tr");
    cell(tr, h.agent + (h.hostname && h.hostname !== h.agent ? " (" + h.hostname + ")" : ""));
    cell(tr, h.kind);
    cell(tr, h.events);
    cell(tr, ago(h.first_seen));
    cell(tr, ago(h.last_seen));
    cell(tr, h.sample_raw || "", "raw");
    return tr;
  }, "no abuse recorded");
  const byHost = new Map();
  for (const e of detail.timeline) {
    if (!byHost.has(e.agent)) byHost.set(e.agent, []);
    byHost.get(e.agent).push(e);
  }
  replaceChildren($("attacker-timeline"), detail.timeline.length === 0 ? [el("li", "No stored events.", "muted")]
    : [...byHost.entries()].map(([agent, events]) => {
      const li = el("li");
      li.appendChild(el("h4", agent + " — " + events.length + " events"));
      const ol = el("ol");
      for (const e of events) {
        const item = el("li");
        item.dataset.kind = e.kind;
        item.dataset.service = serviceOf(e);
        item.appendChild(el("time", new Date(e.time).toLocaleString()));
        item.appendChild(el("strong", " " + kindAndService(e) + " "));
        if (e.raw) item.appendChild(el("span", e.raw, "raw"));
        ol.appendChild(item);
      }
      li.appendChild(ol);
      return li;
    }));
}

function clearAttacker() {
  replaceChildren($("attacker-cards"), []);
  replaceChildren($("attacker-why"), []);
  fill("attacker-blocks", [], () => null);
  fill("attacker-hosts", [], () => null);
  replaceChildren($("attacker-timeline"), []);
}

async function showRange(target) {
  clearAttacker();
  $("range-panel").hidden = false;
  let attackers, blocks;
  try {
    [attackers, blocks] = await Promise.all([
      api("GET", "/api/v1/attackers?since=7d&limit=200&within=" + encodeURIComponent(target)),
      api("GET", "/api/v1/blocks?active=false&limit=50&contains=" + encodeURIComponent(target)),
    ]);
  } catch (error) {
    if (error.status === 400) { $("attacker-error").textContent = error.message; return; }
    throw error;
  }
  const live = blocks.find((b) => b.active);
  replaceChildren($("attacker-why"), [el("span", live ? "Covered by block #" + live.id + " (" + live.cidr + "): " + live.why
    : attackers.length + " addresses in the range showed abuse in 7 days; no block covers the whole range.", "line")]);
  fill("attacker-blocks", blocks, (b) => {
    const tr = el("tr");
    tr.dataset.blockId = b.id;
    cell(tr, b.id);
    cell(tr, b.cidr);
    cell(tr, b.active ? "active" : "ended", b.active ? "bad" : "muted");
    cell(tr, b.why, "why");
    cell(tr, ago(b.created_at));
    const td = cell(tr, "");
    if (b.active && canWrite()) td.appendChild(unblockButton(b));
    return tr;
  }, "no block covers the range");
  fill("range-attackers", attackers, (a) => {
    const tr = el("tr");
    cell(tr, "").appendChild(attackerLink(a.ip));
    cell(tr, a.hosts);
    cell(tr, a.events);
    cell(tr, a.kinds.join(", "));
    cell(tr, a.blocked ? "yes" : "no");
    return tr;
  }, "no abuse from the range in 7 days");
}

// ---- actions --------------------------------------------------------------

// Asks in a modal dialog; resolves true only when the operator confirms.
function confirmAction(text) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.returnValue = "cancel";
    dialog.showModal();
    $("confirm-cancel").focus();
  });
}

async function unblock(block, button) {
  $("block-error").textContent = "";
  const ok = await confirmAction("Unblock " + block.cidr + " (block #" + block.id + ") on every host? " +
    "Its evidence from before now will not block it again.");
  button.focus();
  if (!ok) { setStatus("Unblock of " + block.cidr + " cancelled."); return; }
  button.disabled = true;
  try {
    await api("DELETE", "/api/v1/blocks/" + encodeURIComponent(block.id));
    setStatus("Unblocked " + block.cidr + ".");
    await render();
  } catch (error) {
    const target = state.view === "attacker" ? $("attacker-error") : $("block-error");
    target.textContent = "Unblock failed: " + error.message;
    button.disabled = false;
  }
}

// ---- routing and polling --------------------------------------------------

function setStatus(text) { $("status").textContent = text; }

function parseHash() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [view, ...rest] = hash.split("/");
  if (view === "attacker" && rest.length > 0) return ["attacker", decodeURIComponent(rest.join("/"))];
  return [VIEWS.includes(view) && view !== "attacker" ? view : "overview", ""];
}

async function render() {
  const [view, arg] = [state.view, state.arg];
  switch (view) {
    case "overview": return showOverview();
    case "hosts": return showHosts();
    case "blocks": return showBlocks();
    case "shadow": return showShadow();
    case "live": return showLive();
    case "attacker": return showAttacker(arg);
    default: return undefined;
  }
}

async function tick() {
  if (state.timer !== null) { clearTimeout(state.timer); state.timer = null; }
  try {
    await render();
    $("content").dataset.loaded = state.view;
    setStatusTime();
  } catch (error) {
    if (error.status !== 401) setStatus("error: " + error.message);
  }
  // The attacker page is a report, not a monitor: it is not polled.
  if (token() && state.view !== "attacker") state.timer = setTimeout(tick, POLL_MS);
}

function setStatusTime() {
  const text = $("status").textContent;
  if (!text.startsWith("Unblock")) setStatus("updated " + new Date().toLocaleTimeString());
}

function route() {
  if (!token()) return;
  const [view, arg] = parseHash();
  const changed = view !== state.view || arg !== state.arg;
  state.view = view;
  state.arg = arg;
  delete $("content").dataset.loaded;
  for (const v of VIEWS) $("view-" + v).hidden = v !== view;
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  if (view === "attacker") $("search").value = arg;
  if (changed) {
    const heading = $("view-" + view).querySelector("h2");
    if (heading && document.activeElement && document.activeElement.id !== "search") {
      heading.setAttribute("tabindex", "-1");
      heading.focus({ preventScroll: true });
    }
  }
  tick();
}

async function showMain() {
  try {
    state.me = await api("GET", "/api/v1/whoami");
  } catch (error) {
    if (error.status !== 401) signOut("Cannot reach the server: " + error.message);
    return;
  }
  document.body.dataset.role = state.me.role;
  $("whoami").textContent = state.me.name + " (" + (state.me.can_write ? "admin" : "read only") + ")";
  $("login-panel").hidden = true;
  $("content").hidden = false;
  $("nav").hidden = false;
  $("search-form").hidden = false;
  $("logout").hidden = false;
  route();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (state.timer !== null) { clearTimeout(state.timer); state.timer = null; }
  state.me = null;
  state.view = null;
  delete document.body.dataset.role;
  $("whoami").textContent = "";
  $("content").hidden = true;
  $("nav").hidden = true;
  $("search-form").hidden = true;
  $("logout").hidden = true;
  $("login-panel").hidden = false;
  $("login-error").textContent = message || "";
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const value = $("token").value.trim();
  if (!value) return;
  const response = await fetch("/api/v1/whoami", { headers: { Authorization: "Bearer " + value } });
  if (!response.ok) { $("login-error").textContent = "The token was refused (" + response.status + ")."; return; }
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token").value = "";
  $("login-error").textContent = "";
  showMain();
});
$("logout").addEventListener("click", () => signOut(""));
$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const q = $("search").value.trim();
  if (!q) return;
  location.hash = "#/attacker/" + encodeURIComponent(q);
});
for (const input of document.querySelectorAll("#range-picker input")) {
  input.addEventListener("change", () => { localStorage.setItem(RANGE_KEY, input.value); tick(); });
}
$("split").addEventListener("change", () => { localStorage.setItem(SPLIT_KEY, $("split").value); tick(); });
for (const id of ["f-state", "f-source", "f-rule", "f-host"]) $(id).addEventListener("change", () => tick());
$("feed-all").addEventListener("change", () => {
  replaceChildren($("feed"), []);
  state.seenEvents.clear();
  tick();
});
$("report-load").addEventListener("click", async () => {
  const pre = $("attacker-report");
  try {
    pre.textContent = await api("GET", "/api/v1/reports/abuse?target=" + encodeURIComponent($("report-load").dataset.target), "text");
  } catch (error) {
    pre.textContent = "No report: " + error.message;
  }
  pre.hidden = false;
});
window.addEventListener("hashchange", route);
let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => {
    for (const [id, [doc, label, height]] of state.charts) {
      const container = $(id);
      if (container && container.offsetParent !== null) stackedChart(container, doc, label, height);
    }
  }, 150);
});

if (token()) showMain(); else signOut("");
