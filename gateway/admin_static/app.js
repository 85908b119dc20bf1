// The gateway's routes editor: plain JavaScript, no build step, nothing loaded from elsewhere.
// It talks only to the admin API of the listener that served it, with a session token from
// POST /api/login (kept in sessionStorage, never the admin token itself).
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = {
  session: sessionStorage.getItem("gw-session") || "",
  role: "",
  base: "",          // the version the editor's text is based on (If-Match for apply)
  running: "",
  dirty: false,
  schema: null,
  errors: [],
  validateTimer: 0,
  polling: false,
};

// --- small helpers ---------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function say(text, kind = "") {
  const s = $("#status");
  s.textContent = text;
  s.className = kind;
}

async function api(method, path, { body, headers = {}, raw = false } = {}) {
  const h = { ...headers };
  if (state.session) h.Authorization = "Bearer " + state.session;
  let payload = body;
  if (body !== undefined && typeof body !== "string") {
    payload = JSON.stringify(body);
    h["Content-Type"] = "application/json";
  }
  const resp = await fetch(path, { method, headers: h, body: payload, cache: "no-store" });
  if (resp.status === 401 && path !== "/api/login") {
    logout("Your session ended; log in again.");
    throw new Error("not logged in");
  }
  if (raw) return resp;
  const ctype = resp.headers.get("content-type") || "";
  const data = ctype.includes("json") ? await resp.json() : await resp.text();
  return { status: resp.status, ok: resp.ok, data, etag: (resp.headers.get("etag") || "").replace(/"/g, "") };
}

function detail(data) {
  if (data && typeof data === "object") {
    if (typeof data.detail === "string") return data.detail;
    return JSON.stringify(data.detail || data);
  }
  return String(data);
}

// --- login -------------------------------------------------------------------------------------

async function login(ev) {
  ev.preventDefault();
  const token = $("#token").value.trim();
  const otp = $("#otp").value.trim();
  const r = await api("POST", "/api/login", { body: otp ? { token, otp } : { token } });
  if (r.ok) {
    state.session = r.data.session;
    sessionStorage.setItem("gw-session", state.session);
    $("#token").value = "";
    $("#otp").value = "";
    $("#login-error").textContent = "";
    await enter();
    return;
  }
  if (r.data && r.data.otp_required) $("#otp-label").hidden = false;
  $("#login-error").textContent = detail(r.data);
}

function logout(message) {
  if (state.session) fetch("/api/logout", { method: "POST", headers: { Authorization: "Bearer " + state.session } })
    .catch(() => {});
  state.session = "";
  sessionStorage.removeItem("gw-session");
  $("#app").hidden = true;
  $("#tabs").hidden = true;
  $("#login").hidden = false;
  $("#who").textContent = "";
  if (message) $("#login-error").textContent = message;
}

async function enter() {
  const who = await api("GET", "/api/whoami");
  if (!who.ok) { logout(detail(who.data)); return; }
  state.role = who.data.role;
  $("#who").textContent = `${who.data.name} (${who.data.role})`;
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#tabs").hidden = false;
  $("#apply-btn").disabled = state.role !== "editor";
  await loadRunning();
  if (!state.polling) { state.polling = true; refresh(); }
}

// --- tabs --------------------------------------------------------------------------------------

function showTab(name) {
  for (const b of document.querySelectorAll("button.tab")) b.classList.toggle("active", b.dataset.tab === name);
  for (const p of document.querySelectorAll(".tabpanel")) p.hidden = p.id !== "tab-" + name;
  if (name === "history") loadHistory();
  if (name === "live") loadLive();
}

// --- overview and live counters -----------------------------------------------------------------

async function refresh() {
  if (!state.session) { state.polling = false; return; }
  try {
    const r = await api("GET", "/api/overview");
    if (r.ok) renderOverview(r.data);
    if (!$("#tab-live").hidden) await loadLive();
  } catch (e) { /* shown by api() */ }
  setTimeout(refresh, 1000);
}

function renderOverview(o) {
  state.running = o.version;
  $("#version").textContent = o.version;
  const tbody = $("#routes-table tbody");
  tbody.replaceChildren(...o.routes.map((r) => el("tr", { "data-route": r.name },
    el("td", { text: r.name }), el("td", { text: r.from.join(", ") }), el("td", { text: r.subjects.join(", ") || "*" }),
    el("td", { text: r.mode }), el("td", { text: r.targets.join(", ") }),
    el("td", { class: "num matched", text: r.matched }), el("td", { class: "num delivered", text: r.delivered }),
    el("td", { class: "num failed", text: r.failed }), el("td", { class: "num dead", text: r.dead_lettered }))));
  $("#unmatched").textContent = o.unmatched;
  const ctb = $("#connectors-table tbody");
  ctb.replaceChildren(...Object.entries(o.connectors).map(([name, c]) => el("tr", { "data-connector": name },
    el("td", { text: name }), el("td", { text: c.type }),
    el("td", { class: c.up ? "up" : "down", text: c.up ? "up" : "down " + (c.detail || "") }),
    el("td", { text: c.state }), el("td", { text: c.inbound ? "yes" : "" }),
    el("td", { class: "num", text: c.received }), el("td", { class: "num", text: c.sent }))));
  const lr = o.last_reload;
  $("#last-reload").textContent = `${lr.outcome} ${lr.version} by ${lr.by} at ${new Date(lr.at * 1000).toLocaleTimeString()}`
    + (lr.errors && lr.errors.length ? ` — ${lr.errors.length} error(s)` : "");
}

async function loadLive() {
  const r = await api("GET", "/api/live?limit=20");
  if (!r.ok) return;
  const box = $("#live");
  const sections = Object.entries(r.data.routes).map(([route, items]) => el("div", { class: "live-route", "data-route": route },
    el("h3", { text: route || "(no route matched)" }),
    el("table", {}, el("thead", {}, el("tr", {}, ...["id", "time", "subject", "outcome", "targets", "version"].map((h) => el("th", { text: h })))),
      el("tbody", {}, ...items.map((m) => el("tr", {},
        el("td", { text: m.id }), el("td", { text: m.time.slice(11, 23) }), el("td", { text: m.subject }),
        el("td", { class: "outcome-" + m.outcome, text: m.outcome }), el("td", { text: m.targets.join(", ") }),
        el("td", { text: m.version })))))));
  box.replaceChildren(...(sections.length ? sections : [el("p", { text: "No messages yet." })]));
  const sel = $("#record-select");
  const seen = new Set([...sel.options].map((o) => o.value));
  for (const items of Object.values(r.data.routes)) {
    for (const m of items) {
      if (!seen.has(m.id)) { sel.append(el("option", { value: m.id, text: `${m.time.slice(11, 19)} ${m.source} ${m.subject}` })); seen.add(m.id); }
    }
  }
}

// --- the editor ----------------------------------------------------------------------------------

async function loadRunning() {
  const r = await api("GET", "/api/routes?format=yaml");
  if (!r.ok) { say(detail(r.data), "bad"); return; }
  $("#editor").value = r.data;
  state.base = r.etag;
  state.dirty = false;
  $("#base-version").textContent = state.base;
  setErrors([]);
  $("#validity").textContent = "running version";
  $("#validity").className = "badge valid";
  $("#diff-pane").hidden = true;
}

function renderGutter() {
  const text = $("#editor").value;
  const n = text.split("\n").length;
  const bad = new Map();
  for (const e of state.errors) if (e.line) bad.set(e.line, (bad.get(e.line) ? bad.get(e.line) + "\n" : "") + e.message);
  const spans = [];
  for (let i = 1; i <= n; i++) {
    const s = el("span", { "data-line": i, text: i });
    if (bad.has(i)) { s.className = "err"; s.title = bad.get(i); }
    spans.push(s);
  }
  $("#gutter").replaceChildren(...spans);
  $("#gutter").scrollTop = $("#editor").scrollTop;
}

function setErrors(errors) {
  state.errors = errors;
  $("#errors").replaceChildren(...errors.map((e) => el("li", { "data-line": e.line || "", text:
    `line ${e.line || "?"}: ${e.path ? e.path + ": " : ""}${e.message}` })));
  renderGutter();
}

function goToLine(line) {
  const ta = $("#editor");
  const lines = ta.value.split("\n");
  let pos = 0;
  for (let i = 0; i < line - 1 && i < lines.length; i++) pos += lines[i].length + 1;
  ta.focus();
  ta.setSelectionRange(pos, pos + (lines[line - 1] || "").length);
  ta.scrollTop = Math.max(0, (line - 5) * 18);
}

async function validate() {
  const text = $("#editor").value;
  const r = await api("POST", "/api/routes/validate", { body: text, headers: { "Content-Type": "application/yaml" } });
  if (!r.ok) { say(detail(r.data), "bad"); return null; }
  setErrors(r.data.errors);
  const v = $("#validity");
  v.textContent = r.data.valid ? `valid (${r.data.routes} routes)` : `${r.data.errors.length} error(s)`;
  v.className = "badge " + (r.data.valid ? "valid" : "invalid");
  renderDiff($("#diff"), r.data.diff);
  return r.data;
}

function renderDiff(pre, diff) {
  pre.replaceChildren(...(diff ? diff.split("\n") : ["(no changes)"]).map((line) => el("span", {
    class: line.startsWith("+") && !line.startsWith("+++") ? "add" : line.startsWith("-") && !line.startsWith("---") ? "del"
      : line.startsWith("@@") ? "hunk" : "", text: line + "\n" })));
}

function onEdit() {
  state.dirty = true;
  renderGutter();
  clearTimeout(state.validateTimer);
  state.validateTimer = setTimeout(validate, 400);
}

async function showDiff() {
  const data = await validate();
  if (data) $("#diff-pane").hidden = false;
}

async function apply() {
  const data = await validate();
  if (!data) return;
  if (!data.valid) { say("Fix the errors first: the config was not applied.", "bad"); return; }
  $("#diff-pane").hidden = false;
  const r = await api("PUT", "/api/routes", { body: $("#editor").value,
    headers: { "Content-Type": "application/yaml", "If-Match": `"${state.base}"` } });
  if (r.ok) {
    state.base = r.data.version;
    state.dirty = false;
    $("#base-version").textContent = state.base;
    const extra = ["restarted", "added", "removed"].filter((k) => r.data[k] && r.data[k].length)
      .map((k) => `${k}: ${r.data[k].join(", ")}`).join("; ");
    say(r.data.outcome === "unchanged" ? "No change: nothing applied." : `Applied version ${r.data.version}` + (extra ? ` (${extra})` : ""), "good");
  } else if (r.status === 409) {
    say(`Conflict: ${detail(r.data)} — use "Load running" to start from the running version.`, "bad");
  } else if (r.status === 422) {
    setErrors(r.data.errors || []);
    say(detail(r.data), "bad");
  } else {
    say(`Apply failed (${r.status}): ${detail(r.data)}`, "bad");
  }
}

// --- try it --------------------------------------------------------------------------------------

async function useRecorded() {
  const id = $("#record-select").value;
  if (!id) return;
  const r = await api("GET", `/api/live/${encodeURIComponent(id)}/sample`);
  if (!r.ok) { say(detail(r.data), "bad"); return; }
  $("#sample").value = JSON.stringify(r.data, null, 2);
}

async function tryIt() {
  const r = await api("POST", "/api/routes/test", { body: { config: $("#editor").value, message: $("#sample").value } });
  const out = $("#try-result");
  if (!r.ok) {
    if (r.data.errors) setErrors(r.data.errors);
    out.replaceChildren(el("p", { class: "error", text: detail(r.data) }));
    return;
  }
  const res = r.data.results[0];
  const parts = [el("p", { text: `version ${r.data.version}: ` + (res.unmatched ? `no route matches (policy: ${res.unmatched_policy})`
    : `routes: ${res.routes.map((x) => x.route).join(", ")}`) })];
  for (const route of res.routes) {
    if (route.error) parts.push(el("p", { class: "error", text: `${route.route}: ${route.error}` }));
    for (const t of route.targets) {
      parts.push(el("div", { class: "result" },
        el("strong", { text: `${route.route} → ${t.connector}` }),
        t.error ? el("p", { class: "error", text: t.error })
          : el("pre", { text: `options: ${JSON.stringify(t.options)}\ncontent-type: ${t.content_type}\nheaders: ${JSON.stringify(t.headers)}\n\n${t.body}` })));
    }
  }
  out.replaceChildren(...parts);
}

// --- history -------------------------------------------------------------------------------------

async function loadHistory() {
  const r = await api("GET", "/api/history");
  if (!r.ok) return;
  state.running = r.data.running;
  $("#history-table tbody").replaceChildren(...r.data.entries.map((e, i) => el("tr", { "data-version": e.version },
    el("td", {}, el("code", { text: e.version }), i === 0 && e.version === r.data.running ? " (running)" : ""),
    el("td", { text: new Date(e.applied_at * 1000).toLocaleString() }), el("td", { text: e.by }), el("td", { text: e.note }),
    el("td", {},
      el("button", { class: "history-diff", "data-version": e.version, text: "diff to running" }),
      e.version !== r.data.running && state.role === "editor"
        ? el("button", { class: "history-rollback", "data-version": e.version, text: "roll back to this" }) : ""))));
}

async function historyClick(ev) {
  const b = ev.target.closest("button");
  if (!b) return;
  const v = b.dataset.version;
  if (b.classList.contains("history-diff")) {
    const r = await api("GET", `/api/history/diff?from=${encodeURIComponent(v)}`);
    if (r.ok) { renderDiff($("#history-diff"), r.data.diff); $("#history-diff").hidden = false; }
  } else if (b.classList.contains("history-rollback")) {
    const r = await api("POST", `/api/history/${encodeURIComponent(v)}/rollback`, { headers: { "If-Match": `"${state.running}"` } });
    if (r.ok) {
      say(`Rolled back: version ${r.data.version} is running.`, "good");
      if (!state.dirty) await loadRunning();
    } else {
      say(`Rollback refused (${r.status}): ${detail(r.data)}`, "bad");
    }
    await loadHistory();
  }
}

// --- schema-driven key suggestions ---------------------------------------------------------------

function resolve(node) {
  const seen = new Set();
  while (node && node.$ref && !seen.has(node.$ref)) {
    seen.add(node.$ref);
    node = state.schema.$defs[node.$ref.replace("#/$defs/", "")];
  }
  return node || {};
}

function keysOf(node, typeHint) {
  node = resolve(node);
  let keys = Object.keys(node.properties || {});
  for (const alt of [...(node.anyOf || []), ...(node.oneOf || [])]) {
    const r = resolve(alt);
    if (typeHint && r.properties && r.properties.type && r.properties.type.const && r.properties.type.const !== typeHint) continue;
    keys = keys.concat(keysOf(r));
  }
  return [...new Set(keys)];
}

function child(node, key) {
  node = resolve(node);
  if (key === "[]") {
    const items = node.items || (node.anyOf || []).map(resolve).find((a) => a.items)?.items;
    return items || {};
  }
  if (node.properties && node.properties[key]) return node.properties[key];
  for (const alt of [...(node.anyOf || []), ...(node.oneOf || [])]) {
    const r = resolve(alt);
    if (r.properties && r.properties[key]) return r.properties[key];
    if (key !== "[]" && r.type === "array") continue;
  }
  if (node.additionalProperties && typeof node.additionalProperties === "object") return node.additionalProperties;
  return {};
}

// The YAML path of the line the caret is on, from indentation: ["routes", "[]", "to", "[]"].
function contextPath(text, pos) {
  const lines = text.slice(0, pos).split("\n");
  const current = lines.pop();
  let indent = current.match(/^ */)[0].length;
  if (/^\s*- /.test(current)) indent = current.indexOf("-") + 2;
  const path = [];
  let typeHint = "";
  for (let i = lines.length - 1; i >= 0 && indent > 0; i--) {
    const line = lines[i];
    if (!line.trim() || line.trim().startsWith("#")) continue;
    const ind = line.match(/^ */)[0].length;
    const dash = /^\s*- /.test(line);
    const keyInd = dash ? line.indexOf("-") + 2 : ind;
    if (!typeHint && keyInd === indent) { const m = line.match(/^\s*(?:- )?type:\s*(\S+)/); if (m) typeHint = m[1]; }
    if (dash && keyInd === indent) { path.unshift("[]"); indent = ind; continue; }
    if (ind < indent) {
      const m = line.match(/^\s*(?:- )?([A-Za-z0-9_.-]+):/);
      if (m) {
        if (dash) path.unshift("[]");
        path.unshift(m[1]);
      }
      indent = ind;
    }
  }
  return { path, typeHint };
}

async function suggest() {
  if (!state.schema) {
    const r = await api("GET", "/api/schema");
    if (!r.ok) return;
    state.schema = r.data;
  }
  const ta = $("#editor");
  const { path, typeHint } = contextPath(ta.value, ta.selectionStart);
  let node = state.schema;
  for (const key of path) node = child(node, path[0] === "connectors" && key === path[1] ? "*" : key);
  if (path[0] === "connectors" && path.length === 2) node = state.schema.properties.connectors.additionalProperties;
  const present = new Set();
  const keys = keysOf(node, typeHint).filter((k) => !present.has(k)).sort();
  const box = $("#suggest");
  box.replaceChildren(...keys.map((k, i) => el("li", { class: i === 0 ? "sel" : "", "data-key": k, text: k })));
  box.hidden = keys.length === 0;
  const line = ta.value.slice(0, ta.selectionStart).split("\n").length;
  box.style.top = Math.min(line * 18 - ta.scrollTop + 4, 380) + "px";
  box.style.left = "4rem";
}

function pick(key) {
  const ta = $("#editor");
  const start = ta.selectionStart;
  const before = ta.value.slice(0, start);
  const word = before.match(/[A-Za-z0-9_]*$/)[0];
  ta.value = before.slice(0, before.length - word.length) + key + ": " + ta.value.slice(start);
  const pos = start - word.length + key.length + 2;
  ta.setSelectionRange(pos, pos);
  $("#suggest").hidden = true;
  ta.focus();
  onEdit();
}

function editorKeys(ev) {
  const box = $("#suggest");
  if (ev.ctrlKey && ev.code === "Space") { ev.preventDefault(); suggest(); return; }
  if (!box.hidden) {
    const items = [...box.children];
    const i = items.findIndex((x) => x.classList.contains("sel"));
    if (ev.key === "ArrowDown" || ev.key === "ArrowUp") {
      ev.preventDefault();
      const j = Math.max(0, Math.min(items.length - 1, i + (ev.key === "ArrowDown" ? 1 : -1)));
      items.forEach((x, k) => x.classList.toggle("sel", k === j));
      return;
    }
    if (ev.key === "Enter" || ev.key === "Tab") { ev.preventDefault(); pick(items[Math.max(0, i)].dataset.key); return; }
    if (ev.key === "Escape") { box.hidden = true; return; }
  }
  if (ev.key === "Tab") {  // indent with spaces: YAML has no tabs
    ev.preventDefault();
    const ta = ev.target;
    const s = ta.selectionStart;
    ta.value = ta.value.slice(0, s) + "  " + ta.value.slice(ta.selectionEnd);
    ta.setSelectionRange(s + 2, s + 2);
    onEdit();
  }
}

// --- wiring --------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", login);
  $("#logout-btn").addEventListener("click", () => logout(""));
  for (const b of document.querySelectorAll("button.tab")) b.addEventListener("click", () => showTab(b.dataset.tab));
  const ta = $("#editor");
  ta.addEventListener("input", onEdit);
  ta.addEventListener("scroll", () => { $("#gutter").scrollTop = ta.scrollTop; });
  ta.addEventListener("keydown", editorKeys);
  $("#suggest").addEventListener("mousedown", (ev) => { const li = ev.target.closest("li"); if (li) { ev.preventDefault(); pick(li.dataset.key); } });
  $("#errors").addEventListener("click", (ev) => { const li = ev.target.closest("li"); if (li && li.dataset.line) goToLine(+li.dataset.line); });
  $("#revert-btn").addEventListener("click", loadRunning);
  $("#diff-btn").addEventListener("click", showDiff);
  $("#apply-btn").addEventListener("click", apply);
  $("#try-btn").addEventListener("click", tryIt);
  $("#use-sample-btn").addEventListener("click", useRecorded);
  $("#record-refresh-btn").addEventListener("click", loadLive);
  $("#history-table").addEventListener("click", historyClick);
  if (state.session) enter().catch(() => logout(""));
});
