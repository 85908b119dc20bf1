// The flow picture: every source connector, the routes that take from it and their targets,
// laid out in three columns and drawn as SVG. No library: the layout is three stacked columns
// with each connector placed at the height of the routes it feeds (or is fed by), which keeps
// most edges short and uncrossed for the configs people write.
//
// FlowPicture.draw(container, graph, { stats, onRoute, compare }) replaces the container's
// picture. graph is /api/graph's answer; stats (optional) holds per-route and per-connector
// counters and rates joined by name; onRoute(name) is called when a route is clicked.
"use strict";

const FlowPicture = (() => {
  const SVG = "http://www.w3.org/2000/svg";
  const CONN_W = 200, CONN_H = 48, ROUTE_W = 280, COL_GAP = 130, GAP = 16, PAD = 16, CHAR = 6.6;
  const MAX_ROUTES = 400;

  function node(tag, attrs = {}, ...children) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) e.setAttribute(k, v);
    for (const c of children) if (c) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }

  function clip(text, width, px = CHAR) {
    const max = Math.max(3, Math.floor(width / px));
    return text.length > max ? text.slice(0, max - 1) + "…" : text;
  }

  function count(n) {
    n = Number(n) || 0;
    if (n >= 1e6) return (n / 1e6).toFixed(n >= 1e7 ? 0 : 1) + "M";
    if (n >= 1e4) return (n / 1e3).toFixed(n >= 1e5 ? 0 : 1) + "k";
    return String(Math.round(n));
  }

  function rate(r) {
    if (!r || r < 0.005) return "";
    return (r >= 100 ? r.toFixed(0) : r >= 10 ? r.toFixed(1) : r.toFixed(2)) + "/s";
  }

  function routeHeight(r) { return 66 + (Object.keys(r.storm || {}).length ? 24 : 0); }

  // Place boxes of one column at their wished centres, in that order, without overlaps.
  function stack(items, top) {
    items.sort((a, b) => a.want - b.want);
    let y = top;
    for (const it of items) { it.y = Math.max(y, it.want - it.h / 2); y = it.y + it.h + GAP; }
    return y;
  }

  function layout(graph) {
    const routes = graph.routes.slice(0, MAX_ROUTES);
    const conns = graph.connectors || {};
    const firstSeen = new Map();
    for (const r of routes) for (const s of r.from) if (!firstSeen.has(s)) firstSeen.set(s, firstSeen.size);
    const order = (r) => (r.from.length ? firstSeen.get(r.from[0]) : 1e9);
    const placed = routes.map((r, i) => ({ r, i, h: routeHeight(r) }))
      .sort((a, b) => order(a.r) - order(b.r) || a.i - b.i);
    const xRoute = PAD + CONN_W + COL_GAP, xTarget = xRoute + ROUTE_W + COL_GAP;
    let y = PAD + 22;
    for (const p of placed) { p.x = xRoute; p.y = y; y += p.h + GAP; }
    const centre = (p) => p.y + p.h / 2;
    const column = (pick, x) => {
      const by = new Map();
      for (const p of placed) for (const name of pick(p.r)) {
        if (!by.has(name)) by.set(name, { name, x, h: CONN_H, ys: [] });
        by.get(name).ys.push(centre(p));
      }
      return by;
    };
    const sources = column((r) => r.from, PAD);
    for (const [name, c] of Object.entries(conns)) {  // inbound connectors no route takes from
      if (c.inbound && !sources.has(name) && !(c.outbound && !c.inbound)) sources.set(name, { name, x: PAD, h: CONN_H, ys: [1e9], idle: true });
    }
    const targets = column((r) => r.to, xTarget);
    for (const col of [sources, targets]) for (const c of col.values()) c.want = c.ys.reduce((a, b) => a + b, 0) / c.ys.length;
    const bottom = Math.max(y, stack([...sources.values()], PAD + 22), stack([...targets.values()], PAD + 22));
    return { placed, sources, targets, width: xTarget + CONN_W + PAD, height: bottom + PAD, xRoute, xTarget,
             hidden: graph.routes.length - routes.length };
  }

  // Where each edge leaves and enters a box: spread over its height in the order of the other ends.
  function ports(edges, key, end) {
    const by = new Map();
    for (const e of edges) { const k = e[key]; if (!by.has(k)) by.set(k, []); by.get(k).push(e); }
    for (const list of by.values()) {
      list.sort((a, b) => a[end === "out" ? "y2" : "y1"] - b[end === "out" ? "y2" : "y1"]);
      list.forEach((e, i) => {
        const box = e[key + "Box"];
        const yy = box.y + box.h * (i + 1) / (list.length + 1);
        if (end === "out") e.y1 = yy; else e.y2 = yy;
      });
    }
  }

  function curve(e) {
    const dx = Math.max(40, (e.x2 - e.x1) / 2);
    return `M${e.x1},${e.y1} C${e.x1 + dx},${e.y1} ${e.x2 - dx},${e.y2} ${e.x2},${e.y2}`;
  }

  function label(x, y, parts, cls) {
    const text = parts.filter(Boolean).join("  ");
    if (!text) return null;
    const w = text.length * 6.1 + 12;
    return node("g", { class: "edge-label " + (cls || ""), transform: `translate(${x - w / 2},${y - 10})` },
      node("rect", { width: w, height: 19, rx: 9.5 }),
      node("text", { x: w / 2, y: 13.5, "text-anchor": "middle" }, text));
  }

  function connectorBox(c, side, stats) {
    const s = (stats && stats.connectors && stats.connectors[c.name]) || null;
    const health = !s ? "idle" : s.up ? "up" : "down";
    const g = node("g", { class: `connector ${side} health-${health}` + (c.idle ? " no-route" : ""),
                          "data-connector": c.name, "data-side": side, transform: `translate(${c.x},${c.y})` });
    const type = (s && s.type) || c.type || "";
    const tip = `${c.name} (${type}) — ${!s ? "not running" : s.up ? "up" : "down: " + (s.detail || "")}`;
    g.append(node("title", {}, tip),
      node("rect", { class: "box", width: CONN_W, height: c.h, rx: 8 }),
      node("rect", { class: "stripe", width: 6, height: c.h, rx: 3 }),
      node("circle", { class: "dot", cx: CONN_W - 14, cy: 15, r: 5 }),
      node("text", { class: "name", x: 16, y: 20 }, clip(c.name, CONN_W - 44, 7.4)));
    const n = s ? (side === "source" ? s.received : s.sent) : null;
    const r = s ? (side === "source" ? s.receivedRate : s.sentRate) : 0;
    const sub = [type, c.idle ? "no route" : "", n !== null && n !== undefined ? `${count(n)} ${side === "source" ? "in" : "out"}` : "", rate(r)]
      .filter(Boolean).join(" · ");
    g.append(node("text", { class: "sub", x: 16, y: 37 }, clip(sub, CONN_W - 24)));
    return g;
  }

  function routeBox(p, stats, onRoute) {
    const r = p.r;
    const s = (stats && stats.routes && stats.routes[r.name]) || null;
    const g = node("g", { class: "route" + (r.change ? " " + r.change : ""), "data-route": r.name,
                          transform: `translate(${p.x},${p.y})`, tabindex: r.change === "removed" ? null : 0,
                          role: "button" });
    const where = [r.subjects.length ? r.subjects.join(", ") : "every subject", r.when ? `when ${r.when}` : ""]
      .filter(Boolean).join(" · ");
    g.append(node("title", {}, `${r.name}\n${where}` + (r.lines ? `\nlines ${r.lines[0]}–${r.lines[1]}: click to edit` : "")),
      node("rect", { class: "box", width: ROUTE_W, height: p.h, rx: 10 }),
      node("text", { class: "name", x: 12, y: 21 }, clip(r.name, ROUTE_W - 90, 7.6)));
    const tag = r.change || (r.mode === "direct" ? "direct" : "");
    if (tag) {
      const w = tag.length * 6.4 + 12;
      g.append(node("g", { class: "tag tag-" + tag, transform: `translate(${ROUTE_W - w - 8},8)` },
        node("rect", { width: w, height: 17, rx: 8.5 }), node("text", { x: w / 2, y: 12.5, "text-anchor": "middle" }, tag)));
    }
    g.append(node("text", { class: "sub", x: 12, y: 39 }, clip(where, ROUTE_W - 24)));
    if (s) {
      const line = [`${count(s.matched)} matched`, rate(s.matchedRate)].filter(Boolean).join(" · ");
      g.append(node("text", { class: "stat", x: 12, y: 57 }, line));
      if (s.dead_lettered > 0) {
        const t = `${count(s.dead_lettered)} dead-lettered`;
        const w = t.length * 6.2 + 14;
        g.append(node("g", { class: "dead", transform: `translate(${ROUTE_W - w - 8},45)` },
          node("rect", { width: w, height: 17, rx: 8.5 }), node("text", { x: w / 2, y: 12.5, "text-anchor": "middle" }, t)));
      }
    } else if (r.lines) {
      g.append(node("text", { class: "stat muted", x: 12, y: 57 }, `lines ${r.lines[0]}–${r.lines[1]}`));
    }
    let x = 12;
    const held = s ? (s.outcomes && (s.outcomes.suppressed || 0) + (s.outcomes.digested || 0)) || 0 : 0;
    for (const [kind, text] of Object.entries(r.storm || {})) {
      const t = kind === "alarm" ? "alarm" : clip(`${kind} ${text}`, 170);
      const w = t.length * 6.1 + 14;
      if (x + w > ROUTE_W - 8) break;
      g.append(node("g", { class: "storm storm-" + kind, "data-storm": kind, transform: `translate(${x},${p.h - 24})` },
        node("title", {}, `${kind}: ${text}`),
        node("rect", { width: w, height: 17, rx: 4 }), node("text", { x: 7, y: 12.5 }, t)));
      x += w + 5;
    }
    if (held && x < ROUTE_W - 60) g.append(node("text", { class: "stat muted", x, y: p.h - 11 }, `${count(held)} held back`));
    if (onRoute && r.change !== "removed") {
      g.addEventListener("click", () => onRoute(r.name));
      g.addEventListener("keydown", (ev) => { if (ev.key === "Enter") onRoute(r.name); });
    }
    return g;
  }

  function draw(container, graph, { stats = null, onRoute = null } = {}) {
    if (!graph || !graph.routes) return;
    if (!graph.routes.length) {
      container.replaceChildren(Object.assign(document.createElement("p"), { className: "hint", textContent: "No routes." }));
      return;
    }
    const L = layout(graph);
    const svg = node("svg", { class: "flow-svg", width: L.width, height: L.height, viewBox: `0 0 ${L.width} ${L.height}`,
                              role: "img" });
    svg.append(node("text", { class: "col-title", x: PAD, y: PAD + 6 }, "sources"),
      node("text", { class: "col-title", x: L.xRoute, y: PAD + 6 }, "routes"),
      node("text", { class: "col-title", x: L.xTarget, y: PAD + 6 }, "targets"));
    const inEdges = [], outEdges = [];
    for (const p of L.placed) {
      for (const name of p.r.from) {
        const c = L.sources.get(name);
        inEdges.push({ from: name, to: p.r.name, fromBox: c, toBox: p, x1: c.x + CONN_W, y1: c.y + c.h / 2, x2: p.x, y2: p.y + p.h / 2 });
      }
      for (const name of p.r.to) {
        const c = L.targets.get(name);
        outEdges.push({ from: p.r.name, to: name, fromBox: p, toBox: c, x1: p.x + ROUTE_W, y1: p.y + p.h / 2, x2: c.x, y2: c.y + c.h / 2 });
      }
    }
    for (const [list] of [[inEdges], [outEdges]]) { ports(list, "from", "out"); ports(list, "to", "in"); }
    const edgeLayer = node("g", { class: "edges" }), labelLayer = node("g", { class: "labels" });
    for (const e of inEdges) {
      const s = stats && stats.routes && stats.routes[e.to];
      const width = s ? 1.5 + Math.min(5, Math.log2(1 + (s.matchedRate || 0))) : 1.5;
      edgeLayer.append(node("path", { class: "edge in" + (e.toBox.r.change ? " " + e.toBox.r.change : "") + (s && s.matchedRate > 0 ? " flowing" : ""),
                                      d: curve(e), "stroke-width": width.toFixed(1), "data-from": e.from, "data-to": e.to }));
    }
    for (const e of outEdges) {
      const s = stats && stats.routes && stats.routes[e.from];
      const t = s && s.targets && s.targets[e.to];
      const failing = t && t.failedRate > 0;
      const width = t ? 1.5 + Math.min(5, Math.log2(1 + (t.deliveredRate || 0))) : 1.5;
      edgeLayer.append(node("path", { class: "edge out" + (e.fromBox.r.change ? " " + e.fromBox.r.change : "")
        + (t && t.deliveredRate > 0 ? " flowing" : "") + (failing ? " failing" : ""),
        d: curve(e), "stroke-width": width.toFixed(1), "data-from": e.from, "data-to": e.to }));
      if (t && (t.delivered || t.failed)) {
        // Beside the route, where each edge has its own port: labels of edges into one target never overlap.
        const parts = [`${count(t.delivered)} sent`, rate(t.deliveredRate), t.failed ? `${count(t.failed)} failed` : ""];
        const w = parts.filter(Boolean).join("  ").length * 6.1 + 12;
        const l = label(e.x1 + 10 + w / 2, e.y1, parts, t.failed ? "has-failures" : "");
        if (l) { l.setAttribute("data-from", e.from); l.setAttribute("data-to", e.to); labelLayer.append(l); }
      }
    }
    const nodes = node("g", { class: "nodes" });
    for (const c of L.sources.values()) nodes.append(connectorBox(c, "source", stats));
    for (const c of L.targets.values()) nodes.append(connectorBox(c, "target", stats));
    for (const p of L.placed) nodes.append(routeBox(p, stats, onRoute));
    svg.append(edgeLayer, nodes, labelLayer);
    const parts = [svg];
    if (L.hidden > 0) parts.push(Object.assign(document.createElement("p"), { className: "hint",
      textContent: `${L.hidden} more routes are not drawn (the picture shows the first ${MAX_ROUTES}).` }));
    container.replaceChildren(...parts);
  }

  return { draw };
})();
