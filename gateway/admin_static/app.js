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
  checkSeq: 0,       // the newest check of the editor's text; older answers are dropped
  historyBase: "",   // the running version when the History list was loaded (If-Match for rollback)
  graph: null,       // /api/graph of the running version
  editorGraph: null, // the graph of the editor's text (route lines for clicks, changes for the picture)
  samples: [],       // the last few /api/overview answers with their time, for rates
  stats: null,
  lastReload: "",
  file: null,        // GET /api/config/file when the file on disk is not the running version
  dl: { items: [], selected: new Set(), polls: 0 },
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
  for (const b of document.querySelectorAll(".editor-only")) b.hidden = state.role !== "editor";
  await loadRunning();
  await checkFile();
  if (!state.polling) { state.polling = true; refresh(); }
}

// --- tabs --------------------------------------------------------------------------------------

function showTab(name) {
  for (const b of document.querySelectorAll("button.tab")) b.classList.toggle("active", b.dataset.tab === name);
  for (const p of document.querySelectorAll(".tabpanel")) p.hidden = p.id !== "tab-" + name;
  if (name === "history") loadHistory();
  if (name === "live") loadLive();
  if (name === "deadletters") loadDeadLetters();
  if (name === "editor") { checkFile(); drawCandidate(); }
  if (name === "overview") drawRunning();
}

// --- overview and live counters -----------------------------------------------------------------

async function refresh() {
  if (!state.session) { state.polling = false; return; }
  try {
    const r = await api("GET", "/api/overview");
    if (r.ok) {
      renderOverview(r.data);
      await updateFlow(r.data);
    }
    if (!$("#tab-live").hidden) await loadLive();
    if (state.dl.polls++ % 5 === 0) await countDeadLetters();
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
  if (!$("#tab-history").hidden && state.historyBase && o.version !== state.historyBase) $("#history-stale").hidden = false;
  const lr = o.last_reload;
  const seen = `${lr.outcome} ${lr.at}`;
  if (state.lastReload && seen !== state.lastReload && lr.outcome === "invalid") checkFile();
  state.lastReload = seen;
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
  state.checkSeq++;  // answers about the text this replaced are stale
  const g = await api("GET", "/api/graph");
  if (g.ok && g.data.version === state.base) { state.graph = g.data; state.editorGraph = g.data; drawCandidate(); }
}

function lineCount(text) {
  let n = 1;
  for (let i = text.indexOf("\n"); i !== -1; i = text.indexOf("\n", i + 1)) n++;
  return n;
}

// Only what changed: a 10,000-route routes.yaml has 80,000 lines, and making every line number
// again on each keystroke froze the page.
function renderGutter() {
  const gutter = $("#gutter");
  const n = lineCount($("#editor").value);
  if (gutter.childElementCount < n) {
    const more = document.createDocumentFragment();
    for (let i = gutter.childElementCount + 1; i <= n; i++) more.append(el("span", { "data-line": i, text: i }));
    gutter.append(more);
  }
  while (gutter.childElementCount > n) gutter.lastElementChild.remove();
  for (const s of state.marked || []) { s.className = ""; s.removeAttribute("title"); }
  state.marked = [];
  const bad = new Map();
  for (const e of state.errors) if (e.line) bad.set(e.line, (bad.get(e.line) ? bad.get(e.line) + "\n" : "") + e.message);
  for (const [line, message] of bad) {
    const s = gutter.children[line - 1];
    if (s) { s.className = "err"; s.title = message; state.marked.push(s); }
  }
  gutter.scrollTop = $("#editor").scrollTop;
}

function setErrors(errors) {
  state.errors = errors;
  $("#errors").replaceChildren(...errors.map((e) => el("li", { "data-line": e.line || "", text:
    `line ${e.line || "?"}: ${e.path ? e.path + ": " : ""}${e.message}` })));
  renderGutter();
}

function goToLine(line, last = line) {
  const ta = $("#editor");
  const lines = ta.value.split("\n");
  let pos = 0;
  for (let i = 0; i < line - 1 && i < lines.length; i++) pos += lines[i].length + 1;
  let end = pos;
  for (let i = line - 1; i < last && i < lines.length; i++) end += lines[i].length + (i < last - 1 ? 1 : 0);
  ta.focus();
  ta.setSelectionRange(pos, end, "backward");
  ta.scrollTop = Math.max(0, (line - 4) * 18);
  $("#gutter").scrollTop = ta.scrollTop;
}

// Validate the editor's text and draw its picture. Answers can come back out of order (a slow
// validation of older text after a quick one of newer text): only the newest check is shown.
async function validate() {
  const seq = ++state.checkSeq;
  const text = $("#editor").value;
  const yaml = { "Content-Type": "application/yaml" };
  const [r, g] = await Promise.all([api("POST", "/api/routes/validate", { body: text, headers: yaml }),
    api("POST", "/api/graph", { body: text, headers: yaml }).catch(() => null)]);
  if (seq !== state.checkSeq) return r.ok ? r.data : null;
  if (g && g.ok && g.data.parsed) { state.editorGraph = g.data; drawCandidate(); }
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
    const file = await checkFile();
    say(file ? `Refused: ${detail(r.data)} — see "routes.yaml on disk" below for the way out.`
      : `Conflict: ${detail(r.data)} — use "Load running" to start from the running version.`, "bad");
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
  state.historyBase = r.data.running;  // what this list shows as running: the base of a rollback from it
  $("#history-stale").hidden = true;
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
    const r = await api("POST", `/api/history/${encodeURIComponent(v)}/rollback`, { headers: { "If-Match": `"${state.historyBase}"` } });
    if (r.ok) {
      say(`Rolled back: version ${r.data.version} is running.`, "good");
      if (!state.dirty) await loadRunning();
    } else if (r.status === 409 && r.data.running && r.data.running !== state.historyBase) {
      say(`Rollback refused: version ${r.data.running} was applied after this list was loaded. `
        + "The list is up to date now: look at that change, then roll back again if you still want to.", "bad");
    } else {
      if (r.status === 409) await checkFile();
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

// --- the flow picture ------------------------------------------------------------------------------

const RATE_WINDOW = 6;  // polls (about seconds) a rate is measured over

function computeStats() {
  const first = state.samples[0], last = state.samples[state.samples.length - 1];
  const dt = last.t - first.t;
  const per = (a, b) => (dt > 0 ? Math.max(0, (b - (a || 0)) / dt) : 0);
  const before = { routes: new Map(first.o.routes.map((r) => [r.name, r])), connectors: first.o.connectors };
  const routes = {}, connectors = {};
  for (const r of last.o.routes) {
    const b = before.routes.get(r.name) || {};
    const targets = {};
    for (const [name, t] of Object.entries(r.targets_sent || {})) {
      const bt = (b.targets_sent || {})[name] || {};
      targets[name] = { ...t, deliveredRate: per(bt.delivered, t.delivered), failedRate: per(bt.failed, t.failed) };
    }
    for (const name of r.targets) if (!targets[name]) targets[name] = { delivered: 0, failed: 0, deliveredRate: 0, failedRate: 0 };
    routes[r.name] = { ...r, targets, matchedRate: per(b.matched, r.matched) };
  }
  for (const [name, c] of Object.entries(last.o.connectors)) {
    const b = before.connectors[name] || {};
    connectors[name] = { ...c, receivedRate: per(b.received, c.received), sentRate: per(b.sent, c.sent) };
  }
  return { routes, connectors };
}

async function updateFlow(o) {
  state.samples.push({ t: performance.now() / 1000, o });
  if (state.samples.length > RATE_WINDOW) state.samples.shift();
  state.stats = computeStats();
  if (!state.graph || state.graph.version !== o.version) {
    const g = await api("GET", "/api/graph");
    if (g.ok) state.graph = g.data;
  }
  if (!$("#tab-overview").hidden) drawRunning();
  fillDeadLetterChoices(o);
}

function drawRunning() {
  if (state.graph) FlowPicture.draw($("#flow"), state.graph, { stats: state.stats, onRoute: openRoute });
  const pending = state.dirty && state.editorGraph ? changes(state.editorGraph) : "";
  $("#pending-note").hidden = !pending;
  $("#pending-note").textContent = pending ? `The editor holds an edit that is not applied: ${pending}.` : "";
}

function changes(graph) {
  const n = { added: 0, changed: 0, removed: 0 };
  for (const r of graph.routes) if (r.change) n[r.change]++;
  return Object.entries(n).filter(([, v]) => v).map(([k, v]) => `${v} ${k}`).join(", ");
}

function drawCandidate() {
  const g = state.editorGraph;
  if (!g) return;
  FlowPicture.draw($("#candidate-flow"), g, { stats: state.stats, onRoute: openRoute });
  const summary = changes(g);
  $("#candidate-summary").textContent = summary ? `against the running version: ${summary}` : "the same routes as the running version";
  $("#candidate-summary").className = summary ? "hint changed" : "hint";
}

// A click on a route: its lines in the editor's text (where the editor's text still has it).
function openRoute(name) {
  const route = (g) => g && g.routes.find((r) => r.name === name && r.lines);
  const r = route(state.editorGraph) || (!state.dirty && route(state.graph));
  showTab("editor");
  if (!r) { say(`Route ${name} is not in the editor's text.`, "bad"); return; }
  goToLine(r.lines[0], r.lines[1]);
  say(`Route ${name}: lines ${r.lines[0]}–${r.lines[1]}.`);
}

// --- routes.yaml on disk differs from the running version ----------------------------------------

async function checkFile() {
  const r = await api("GET", "/api/config/file");
  state.file = r.ok && r.data.differs ? r.data : null;
  const pane = $("#file-pane");
  pane.hidden = !state.file;
  if (!state.file) return null;
  const f = state.file;
  $("#file-summary").textContent = `${f.path} holds version ${f.version}; version ${f.running} is running. `
    + "Edits and rollbacks are refused until the two agree: replace the file, or fix its text and apply it. "
    + (f.valid ? "The file is valid, but it is not applied." : `Its problems (${f.errors.length}):`);
  $("#file-errors").replaceChildren(...f.errors.map((e) => el("li", { "data-line": e.line || "", text:
    `line ${e.line || "?"}: ${e.path ? e.path + ": " : ""}${e.message}` })));
  for (const id of ["#file-running-btn", "#file-edited-btn"]) $(id).disabled = state.role !== "editor";
  return f;
}

function loadFileText() {
  if (!state.file) return;
  $("#editor").value = state.file.text;
  showTab("editor");
  onEdit();
  say("The file's text is in the editor: fix it, then replace the file with it.");
}

async function replaceFile(withRunning) {
  if (!state.file) return;
  let text = $("#editor").value;
  if (withRunning) {
    const run = await api("GET", "/api/routes?format=yaml");
    if (!run.ok) { say(detail(run.data), "bad"); return; }
    text = run.data;
  }
  const r = await api("PUT", "/api/config/file", { body: text,
    headers: { "Content-Type": "application/yaml", "If-Match": `"${state.file.version}"` } });
  if (r.ok) {
    say(r.data.outcome === "restored" ? `The file holds the running version ${r.data.version} again.`
      : `The file was replaced and version ${r.data.version} is running.`, "good");
    await checkFile();
    if (withRunning ? !state.dirty : true) await loadRunning();
  } else if (r.status === 422) {
    setErrors(r.data.errors || []);
    say(detail(r.data), "bad");
  } else {
    say(`Replacing the file was refused (${r.status}): ${detail(r.data)}`, "bad");
    await checkFile();
  }
}

// --- dead letters ----------------------------------------------------------------------------------

function fillSelect(sel, names, first) {
  const want = [first, ...names].join("\n");
  if (sel.dataset.names === want) return;
  const keep = sel.value;
  sel.replaceChildren(el("option", { value: "", text: first }), ...names.map((n) => el("option", { value: n, text: n })));
  sel.value = names.includes(keep) ? keep : "";
  sel.dataset.names = want;
}

function fillDeadLetterChoices(o) {
  fillSelect($("#dl-route"), o.routes.map((r) => r.name).sort(), "any");
  fillSelect($("#dl-connector"), Object.keys(o.connectors).sort(), "any");
  const outbound = state.graph ? Object.entries(state.graph.connectors).filter(([, c]) => c.outbound).map(([n]) => n).sort() : [];
  fillSelect($("#dl-to"), outbound, "the original connector");
}

function deadLetterFilter() {
  const f = {};
  for (const [key, id] of [["route", "#dl-route"], ["connector", "#dl-connector"], ["reason", "#dl-reason"]]) {
    const v = $(id).value.trim();
    if (v) f[key] = v;
  }
  for (const [key, id] of [["since", "#dl-since"], ["until", "#dl-until"]]) {
    const v = $(id).value;
    if (v) f[key] = new Date(v).getTime() / 1000;
  }
  return f;
}

async function countDeadLetters() {
  const r = await api("GET", "/api/dead-letters?limit=1");
  if (!r.ok) return;
  $("#dl-count").textContent = r.data.total;
  $("#dl-count").hidden = !r.data.total;
}

async function loadDeadLetters() {
  const f = deadLetterFilter();
  const q = new URLSearchParams({ ...f, limit: 500 });
  const r = await api("GET", "/api/dead-letters?" + q);
  if (!r.ok) { say(detail(r.data), "bad"); return; }
  state.dl.items = r.data.dead_letters;
  const ids = new Set(state.dl.items.map((d) => d.id));
  state.dl.selected = new Set([...state.dl.selected].filter((id) => ids.has(id)));
  $("#dl-total").textContent = `${r.data.total} dead letter(s)` + (Object.keys(f).length ? " match the filter" : "")
    + (r.data.total > state.dl.items.length ? `, the newest ${state.dl.items.length} shown` : "");
  $("#dl-table tbody").replaceChildren(...state.dl.items.map((d) => el("tr", { "data-id": d.id, class: "dl-row" },
    el("td", {}, el("input", { type: "checkbox", class: "dl-pick", "data-id": d.id, "aria-label": `select ${d.id}`,
      ...(state.dl.selected.has(d.id) ? { checked: "" } : {}) })),
    el("td", { class: "num", text: d.id }), el("td", { text: new Date(d.dead_at * 1000).toLocaleString() }),
    el("td", { text: d.route }), el("td", { text: d.connector }), el("td", { text: d.reason }),
    el("td", { class: "num", text: d.attempts }), el("td", { text: d.subject || "" }),
    el("td", { class: "clip", title: d.last_error, text: d.last_error }))));
  if (!state.dl.items.length) $("#dl-table tbody").append(el("tr", {}, el("td", { colspan: 9, class: "hint", text: "No dead letters." })));
  syncDeadLetterButtons();
  countDeadLetters();
}

function syncDeadLetterButtons() {
  const n = state.dl.selected.size;
  $("#dl-replay-btn").disabled = !n;
  $("#dl-purge-btn").disabled = !n;
  $("#dl-replay-btn").textContent = n ? `Replay ${n} selected` : "Replay selected";
  $("#dl-purge-btn").textContent = n ? `Purge ${n} selected` : "Purge selected";
  $("#dl-all").checked = n > 0 && n === state.dl.items.length;
}

function row(label, value) {
  return el("tr", {}, el("th", { text: label }), el("td", {}, value instanceof Node ? value : String(value ?? "")));
}

function pretty(env) {
  const body = env.body ?? "";
  if (env.body_encoding === "base64" || !/json/.test(env.content_type || "")) return body;
  try { return JSON.stringify(JSON.parse(body), null, 2); } catch (e) { return body; }
}

async function inspectDeadLetter(id) {
  const r = await api("GET", `/api/dead-letters/${id}`);
  if (!r.ok) { say(detail(r.data), "bad"); return; }
  const d = r.data, env = (d.envelope && typeof d.envelope === "object") ? d.envelope : { body: String(d.envelope) };
  const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "");
  const actions = state.role === "editor" ? el("div", { class: "dl-actions" },
    el("button", { class: "dl-replay-one primary", "data-id": d.id, text: "Replay this one" }),
    el("button", { class: "dl-purge-one danger", "data-id": d.id, text: "Purge this one" })) : "";
  $("#dl-detail").replaceChildren(
    el("h3", { text: `Dead letter ${d.id}: ${d.route} → ${d.connector}` }), actions,
    el("table", { class: "kv" }, el("tbody", {},
      row("envelope id", el("span", {}, env.id || d.envelope_id, " ",
        el("button", { class: "dl-follow", "data-id": env.id || d.envelope_id, text: "Follow this message" }))),
      row("reason", d.reason),
      row("attempts", `${d.attempts} — the first at ${when(d.first_at)}, dead-lettered at ${when(d.dead_at)}`),
      row("last answer", el("pre", { class: "answer", text: d.last_error || "(none)" })),
      row("source", `${env.source || ""} (${env.protocol || ""})`), row("subject", env.subject || ""),
      row("received", env.time || ""), row("content type", env.content_type || ""),
      row("correlation id", env.correlation_id || ""), row("reply to", env.reply_to || ""))),
    el("h4", { text: "Headers" }), el("pre", { text: JSON.stringify(env.headers || {}, null, 2) }),
    el("h4", { text: "Attributes" }), el("pre", { text: JSON.stringify(env.attributes || {}, null, 2) }),
    el("h4", { text: `Body${env.body_encoding === "base64" ? " (base64)" : ""}` }), el("pre", { class: "body", text: pretty(env) }),
    el("h4", { text: "Target options" }), el("pre", { text: JSON.stringify(d.options, null, 2) }));
  $("#dl-detail").hidden = false;
  for (const tr of document.querySelectorAll("#dl-table tr.dl-row")) tr.classList.toggle("open", +tr.dataset.id === d.id);
}

// Destructive or wide actions ask twice, on the page (no dialog): the button says what a second click does.
function confirmed(button, question) {
  if (button.dataset.armed === "1") { delete button.dataset.armed; button.classList.remove("armed"); return true; }
  button.dataset.armed = "1";
  button.dataset.label = button.textContent;
  button.textContent = question;
  button.classList.add("armed");
  setTimeout(() => { if (button.dataset.armed) { delete button.dataset.armed; button.classList.remove("armed"); button.textContent = button.dataset.label; } }, 5000);
  return false;
}

async function replayDeadLetters(selection) {
  const to = $("#dl-to").value;
  const r = await api("POST", "/api/dead-letters/replay", { body: { ...selection, ...(to ? { connector: to } : {}) } });
  if (r.ok) {
    say(`Replayed ${r.data.replayed} dead letter(s)` + (to ? ` to ${to}` : "") + ".", "good");
    state.dl.selected.clear();
    $("#dl-detail").hidden = true;
  } else {
    say(`Replay refused (${r.status}): ${detail(r.data)}`, "bad");
  }
  await loadDeadLetters();
}

async function purgeDeadLetters(selection) {
  const r = await api("POST", "/api/dead-letters/purge", { body: selection });
  if (r.ok) {
    say(`Purged ${r.data.purged} dead letter(s).`, "good");
    state.dl.selected.clear();
    $("#dl-detail").hidden = true;
  } else {
    say(`Purge refused (${r.status}): ${detail(r.data)}`, "bad");
  }
  await loadDeadLetters();
}

function wireDeadLetters() {
  $("#dl-filter").addEventListener("submit", (ev) => { ev.preventDefault(); loadDeadLetters(); });
  $("#dl-clear-btn").addEventListener("click", () => {
    for (const id of ["#dl-route", "#dl-connector", "#dl-reason", "#dl-since", "#dl-until"]) $(id).value = "";
    loadDeadLetters();
  });
  $("#dl-table").addEventListener("click", (ev) => {
    const pick = ev.target.closest("input.dl-pick");
    if (pick) {
      const id = +pick.dataset.id;
      if (pick.checked) state.dl.selected.add(id); else state.dl.selected.delete(id);
      syncDeadLetterButtons();
      return;
    }
    if (ev.target.id === "dl-all") {
      state.dl.selected = ev.target.checked ? new Set(state.dl.items.map((d) => d.id)) : new Set();
      for (const box of document.querySelectorAll("input.dl-pick")) box.checked = ev.target.checked;
      syncDeadLetterButtons();
      return;
    }
    const tr = ev.target.closest("tr.dl-row");
    if (tr) inspectDeadLetter(+tr.dataset.id);
  });
  $("#dl-replay-btn").addEventListener("click", () => replayDeadLetters({ ids: [...state.dl.selected] }));
  $("#dl-purge-btn").addEventListener("click", (ev) => {
    if (confirmed(ev.currentTarget, `Click again to purge ${state.dl.selected.size}`)) purgeDeadLetters({ ids: [...state.dl.selected] });
  });
  $("#dl-replay-all-btn").addEventListener("click", (ev) => {
    const f = deadLetterFilter();
    const what = Object.keys(f).length ? "every one the filter matches" : "every dead letter";
    if (confirmed(ev.currentTarget, `Click again to replay ${what}`)) replayDeadLetters(Object.keys(f).length ? { filter: f } : { all: true });
  });
  $("#dl-detail").addEventListener("click", (ev) => {
    const b = ev.target.closest("button");
    if (!b) return;
    if (b.classList.contains("dl-follow")) { $("#follow-id").value = b.dataset.id; showTab("follow"); followMessage(); }
    if (b.classList.contains("dl-replay-one")) replayDeadLetters({ ids: [+b.dataset.id] });
    if (b.classList.contains("dl-purge-one") && confirmed(b, "Click again to purge it")) purgeDeadLetters({ ids: [+b.dataset.id] });
  });
}

// --- follow a message (provenance) ------------------------------------------------------------------

function describeEvent(e) {
  const ids = Object.entries(e.ids || {}).map(([k, v]) => `${k} ${v}`).join(", ");
  switch (e.kind) {
    case "received":
      return `from ${e.connector} (${e.protocol}), subject ${e.subject}; answered ${e.status}` +
        (e.reason ? ` (${e.reason})` : "") + (e.duplicate_of ? `; a repeat, arrived as ${e.duplicate_of}` : "") +
        (ids ? `; ${ids}` : "");
    case "route": return `${e.route || "(no route)"}: ${e.outcome}` + (e.detail ? ` (${e.detail})` : "");
    case "attempt":
      return `${e.connector} via ${e.route} (${e.mode}): ${e.outcome}` + (e.ms !== undefined ? ` after ${e.ms} ms` : "");
    case "dead_letter": case "dropped": return `${e.route || "-"} → ${e.connector || "-"}: ${e.reason}`;
    case "replay": return `by ${e.by || "?"}` + (e.connector ? ` to ${e.connector}` : "");
    default: return JSON.stringify(e);
  }
}

function stamp(at) {  // local time to the millisecond: attempts are often milliseconds apart
  const d = new Date(at * 1000), p = (n, w = 2) => String(n).padStart(w, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:` +
    `${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}

function eventLabel(e) {
  if (e.kind === "attempt") return `attempt ${e.attempt}`;
  return { dead_letter: "dead letter" }[e.kind] || e.kind;
}

async function followMessage() {
  const id = $("#follow-id").value.trim();
  if (!id) return;
  const out = $("#follow-result");
  const r = await api("GET", "/api/messages/" + encodeURIComponent(id));
  if (!r.ok) { out.replaceChildren(el("p", { class: r.status === 404 ? "hint" : "error", text: detail(r.data) })); return; }
  out.replaceChildren(...r.data.messages.map((m) => el("div", { class: "follow-record" },
    el("h3", { text: `Envelope ${m.envelope_id}` }),
    el("table", { class: "follow-table" },
      el("thead", {}, el("tr", {}, el("th", { text: "time" }), el("th", { text: "what" }), el("th", { text: "" }),
        el("th", { text: "answer / error" }))),
      el("tbody", {}, ...m.events.map((e) => el("tr", { class: `ev-${e.kind} out-${e.outcome || e.status || ""}` },
        el("td", { class: "when", text: stamp(e.at) }),
        el("td", { text: eventLabel(e) }), el("td", { text: describeEvent(e) }),
        el("td", {}, el("pre", { class: "answer", text: e.answer || e.error || "" })))))))));
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
  $("#history-reload-btn").addEventListener("click", loadHistory);
  $("#file-load-btn").addEventListener("click", loadFileText);
  $("#file-running-btn").addEventListener("click", () => replaceFile(true));
  $("#file-edited-btn").addEventListener("click", () => replaceFile(false));
  $("#file-errors").addEventListener("click", (ev) => { const li = ev.target.closest("li"); if (li && li.dataset.line) { loadFileText(); goToLine(+li.dataset.line); } });
  wireDeadLetters();
  $("#follow-form").addEventListener("submit", (ev) => { ev.preventDefault(); followMessage(); });
  if (state.session) enter().catch(() => logout(""));
});
