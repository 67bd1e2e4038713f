// fleetban dashboard: polls the REST API with the token kept in session
// storage. Every value from the API is inserted with textContent, never as
// HTML: log lines and names come from the outside world.
"use strict";

const TOKEN_KEY = "fleetban_token";
const POLL_MS = 2000;
const CHART_POINTS = 90;
const rates = [];
const seenEvents = new Set();
const seenBlocks = new Set();
let timer = null;
let firstPoll = true;

const $ = (id) => document.getElementById(id);

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(method, path) {
  const response = await fetch(path, { method, headers: { Authorization: "Bearer " + token() } });
  if (response.status === 401) { signOut("The token was refused."); throw new Error("unauthorized"); }
  if (!response.ok && response.status !== 204) {
    let message = response.status + " " + response.statusText;
    try { const body = await response.json(); if (body.error) message = body.error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response.status === 204 ? null : response.json();
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function ago(iso) {
  if (!iso) return "never";
  const secs = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (secs < 60) return secs + " s ago";
  if (secs < 3600) return Math.round(secs / 60) + " min ago";
  if (secs < 86400) return Math.round(secs / 3600) + " h ago";
  return Math.round(secs / 86400) + " d ago";
}

function until(iso) {
  if (!iso) return "permanent";
  const secs = Math.round((Date.parse(iso) - Date.now()) / 1000);
  if (secs <= 0) return "expiring";
  if (secs < 3600) return "in " + Math.ceil(secs / 60) + " min";
  if (secs < 86400) return "in " + Math.round(secs / 3600) + " h";
  return "in " + Math.round(secs / 86400) + " d";
}

function fill(tableId, rows, render) {
  const body = $(tableId).querySelector("tbody");
  const fresh = document.createElement("tbody");
  for (const item of rows) fresh.appendChild(render(item));
  body.replaceWith(fresh);
}

function renderAgent(agent) {
  const tr = document.createElement("tr");
  tr.dataset.agentId = agent.id;
  cell(tr, agent.name);
  cell(tr, agent.hostname);
  const state = agent.revoked_at ? "revoked" : agent.connected ? "online" : "offline";
  cell(tr, state, agent.connected ? "online" : "offline");
  cell(tr, agent.version);
  cell(tr, agent.blocklist_version);
  cell(tr, ago(agent.last_seen));
  return tr;
}

function renderBlock(block) {
  const tr = document.createElement("tr");
  tr.dataset.blockId = block.id;
  cell(tr, block.id);
  cell(tr, block.cidr);
  cell(tr, block.source);
  cell(tr, block.reason);
  cell(tr, block.evidence.agents);
  cell(tr, block.evidence.events);
  cell(tr, until(block.expires_at));
  const td = cell(tr, "");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "unblock";
  button.dataset.id = block.id;
  button.textContent = "Unblock";
  button.addEventListener("click", () => unblock(block.id, button));
  td.appendChild(button);
  return tr;
}

function renderAttacker(a) {
  const tr = document.createElement("tr");
  cell(tr, a.ip);
  cell(tr, a.hosts);
  cell(tr, a.events);
  cell(tr, a.kinds.join(", "));
  cell(tr, a.asn ? "AS" + a.asn.asn + " " + a.asn.name + (a.asn.country ? " (" + a.asn.country + ")" : "") : "");
  cell(tr, a.blocked ? "yes" : "no", a.blocked ? "online" : "");
  return tr;
}

function renderShadow(d) {
  const tr = document.createElement("tr");
  const ev = d.evidence || {};
  cell(tr, ago(d.decided_at));
  cell(tr, d.cidr);
  cell(tr, d.rule);
  cell(tr, d.source);
  cell(tr, ev.verdict || (ev.local && ev.local.evidence) || "");
  return tr;
}

function feed(text) {
  const li = document.createElement("li");
  li.textContent = text;
  const list = $("feed");
  list.insertBefore(li, list.firstChild);
  while (list.childNodes.length > 200) list.removeChild(list.lastChild);
}

async function unblock(id, button) {
  button.disabled = true;
  $("block-error").textContent = "";
  try {
    await api("DELETE", "/api/v1/blocks/" + encodeURIComponent(id));
    feed(new Date().toISOString() + "  unblocked #" + id);
    await refresh();
  } catch (error) {
    $("block-error").textContent = "Unblock failed: " + error.message;
    button.disabled = false;
  }
}

function drawChart() {
  const canvas = $("rate-chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const max = Math.max(1, ...rates);
  ctx.strokeStyle = "#26313c";
  ctx.beginPath(); ctx.moveTo(0, h - 1); ctx.lineTo(w, h - 1); ctx.stroke();
  ctx.fillStyle = "#8a96a3";
  ctx.font = "11px sans-serif";
  ctx.fillText(max.toFixed(2) + " /s", 4, 12);
  if (rates.length < 2) return;
  ctx.strokeStyle = "#4fa3ff";
  ctx.lineWidth = 2;
  ctx.beginPath();
  rates.forEach((r, i) => {
    const x = (i / (CHART_POINTS - 1)) * w;
    const y = h - 4 - (r / max) * (h - 20);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

async function refresh() {
  const [stats, agents, blocks, attackers, events, shadow] = await Promise.all([
    api("GET", "/api/v1/stats"),
    api("GET", "/api/v1/agents"),
    api("GET", "/api/v1/blocks?active=true&limit=200"),
    api("GET", "/api/v1/attackers?since=24h&limit=10"),
    api("GET", "/api/v1/events?limit=25"),
    api("GET", "/api/v1/shadow?since=24h&limit=50"),
  ]);
  $("stat-rate").textContent = stats.events_per_sec_1m.toFixed(2);
  $("stat-blocks").textContent = stats.active_blocks;
  $("stat-agents").textContent = stats.agents_connected + " / " + stats.agents_total;
  $("stat-lag").textContent = stats.propagation_lag_secs.toFixed(1) + " s";
  rates.push(stats.events_per_sec_1m);
  while (rates.length > CHART_POINTS) rates.shift();
  drawChart();
  fill("agents", agents, renderAgent);
  fill("blocks", blocks, renderBlock);
  fill("attackers", attackers, renderAttacker);
  fill("shadow", shadow, renderShadow);
  for (const e of events.slice().reverse()) {
    if (seenEvents.has(e.id)) continue;
    seenEvents.add(e.id);
    if (!firstPoll || seenEvents.size <= 25) feed(e.time + "  " + e.agent + "  " + e.kind + "  " + e.remote + (e.raw ? "\n    " + e.raw : ""));
  }
  for (const b of blocks.slice().reverse()) {
    if (seenBlocks.has(b.id)) continue;
    seenBlocks.add(b.id);
    feed(b.created_at + "  block #" + b.id + " " + b.cidr + " (" + b.source + ": " + b.reason + ")");
  }
  firstPoll = false;
  $("status").textContent = "updated " + new Date().toLocaleTimeString();
}

async function poll() {
  try { await refresh(); } catch (error) { $("status").textContent = "error: " + error.message; }
  if (token()) timer = setTimeout(poll, POLL_MS);
}

function showMain() {
  $("login-panel").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
  if (timer === null) poll();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (timer !== null) { clearTimeout(timer); timer = null; }
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login-panel").hidden = false;
  $("login-error").textContent = message || "";
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const value = $("token").value.trim();
  if (!value) return;
  const response = await fetch("/api/v1/stats", { headers: { Authorization: "Bearer " + value } });
  if (!response.ok) { $("login-error").textContent = "The token was refused (" + response.status + ")."; return; }
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token").value = "";
  $("login-error").textContent = "";
  showMain();
});
$("logout").addEventListener("click", () => signOut(""));

if (token()) showMain(); else signOut("");
