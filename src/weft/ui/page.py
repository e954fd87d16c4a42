"""The UI's single page: HTML, CSS, vanilla JS drawing SVG. It fetches nothing but this server's
/api/* (no CDN, no fonts from elsewhere), so it works in a lab without the world."""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>weft service map</title>
<style>
body { font-family: "DejaVu Sans", sans-serif; margin: 0; background: #f6f7f9; color: #222; }
header { background: #24303f; color: #fff; padding: 8px 16px; font-size: 16px; }
header span { color: #b9c4d0; font-size: 13px; margin-left: 16px; }
main { display: flex; gap: 12px; padding: 12px; align-items: flex-start; }
#mapbox { background: #fff; border: 1px solid #d5d9de; overflow: auto; flex: 1; }
aside { width: 300px; background: #fff; border: 1px solid #d5d9de; padding: 8px; font-size: 13px; }
aside h2, section h2 { font-size: 14px; margin: 4px 0 8px; }
table { border-collapse: collapse; font-size: 12px; width: 100%; }
td, th { border-bottom: 1px solid #e3e6ea; padding: 3px 6px; text-align: left; white-space: nowrap; }
section { margin: 0 12px 12px; background: #fff; border: 1px solid #d5d9de; padding: 8px; }
.ns rect { fill: #eef2f7; stroke: #c3ccd7; }
.ns text { font-size: 13px; fill: #4a5666; font-weight: bold; }
.node rect { fill: #fff; stroke: #3d4b5c; stroke-width: 1.5; rx: 6; }
.node.reserved rect, .node.fqdn rect, .node.ip rect { stroke-dasharray: 4 3; }
.node text { font-size: 14px; fill: #111; }
.edge { fill: none; stroke-width: 3; cursor: pointer; }
.edge.selected { stroke-width: 6; }
.hit { fill: none; stroke: transparent; stroke-width: 14; cursor: pointer; }
.count { font-size: 12px; font-weight: bold; paint-order: stroke; stroke: #fff; stroke-width: 4px; cursor: pointer; }
.DROPPED { color: #d62828; }
.FORWARDED { color: #1a9e3a; }
#empty { padding: 24px; color: #777; }
</style></head>
<body>
<header>weft service map <span id="status">connecting…</span></header>
<main>
  <div id="mapbox"><div id="empty">No flows yet.</div>
    <svg id="map" xmlns="http://www.w3.org/2000/svg" width="0" height="0"></svg></div>
  <aside><h2>DNS</h2><div id="dns-summary"></div>
    <table id="dns-names"><thead><tr>
      <th>name</th><th>queries</th><th>errors</th><th>denied</th></tr></thead><tbody></tbody></table>
    <h2 style="margin-top:12px">DNS errors by rcode</h2>
    <table id="dns-rcodes"><thead><tr><th>rcode</th><th>answers</th></tr></thead><tbody></tbody></table>
  </aside>
</main>
<section id="flows-panel"><h2 id="flows-title">Click an edge to list its recent flows</h2>
  <table id="flows"><thead><tr><th>time</th><th>source</th><th>destination</th><th>port</th><th>verdict</th>
  <th>drop reason</th><th>node</th></tr></thead><tbody></tbody></table></section>
<script>
"use strict";
const COLORS = {FORWARDED: "#1a9e3a", DROPPED: "#d62828", REDIRECTED: "#1f6fd1"};
const NS = "http://www.w3.org/2000/svg";
let selected = null;
let edgesById = {};

function el(name, attrs, parent) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}
function cell(row, text, cls) {
  const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; row.appendChild(td);
}

function geometry(a, b, offset) {
  const ay = a.y + a.h / 2 + offset, by = b.y + b.h / 2 + offset;
  if (a.id === b.id) {
    const x = a.x + a.w, y = a.y + a.h / 2;
    const o = offset;
    return {d: `M${x},${y - 8 + o} C${x + 70},${y - 40 + o} ${x + 70},${y + 40 + o} ${x},${y + 8 + o}`,
            mx: x + 62, my: y + offset + 4, anchor: "start"};
  }
  if (Math.abs(a.x - b.x) < 1) {
    const x = a.x + a.w, bend = x + 40 + Math.abs(by - ay) / 4;
    return {d: `M${x},${ay} C${bend},${ay} ${bend},${by} ${x},${by}`,
            mx: bend - 6, my: (ay + by) / 2 + 4, anchor: "start"};
  }
  const forward = b.x > a.x;
  const x1 = forward ? a.x + a.w : a.x, x2 = forward ? b.x : b.x + b.w;
  const c = (x2 - x1) / 2;
  return {d: `M${x1},${ay} C${x1 + c},${ay} ${x2 - c},${by} ${x2},${by}`,
          mx: (x1 + x2) / 2, my: (ay + by) / 2, anchor: "middle"};
}

function drawMap(m) {
  const svg = document.getElementById("map");
  svg.replaceChildren();
  svg.setAttribute("width", m.width); svg.setAttribute("height", m.height);
  document.getElementById("empty").style.display = m.nodes.length ? "none" : "block";
  const defs = el("defs", {}, svg);
  for (const [verdict, color] of Object.entries(COLORS).concat([["OTHER", "#888"]])) {
    const mk = el("marker", {id: "arrow-" + verdict, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 10,
                             markerHeight: 10, markerUnits: "userSpaceOnUse", orient: "auto-start-reverse"}, defs);
    el("path", {d: "M0,0 L10,5 L0,10 z", fill: color}, mk);
  }
  for (const ns of m.namespaces) {
    const g = el("g", {class: "ns", "data-namespace": ns.name}, svg);
    el("rect", {x: ns.x, y: ns.y, width: ns.w, height: ns.h, rx: 8}, g);
    el("text", {x: ns.x + 10, y: ns.y + 20}, g).textContent = ns.name;
  }
  const nodes = {};
  for (const n of m.nodes) nodes[n.id] = n;
  edgesById = {};
  const labels = el("g", {}, null);
  for (const e of m.edges) {
    edgesById[e.id] = e;
    const verdicts = Object.keys(e.verdicts);
    verdicts.forEach((verdict, i) => {
      const offset = (i - (verdicts.length - 1) / 2) * 7;
      const g = geometry(nodes[e.source], nodes[e.destination], offset);
      const color = COLORS[verdict] || "#888";
      const attrs = {d: g.d, "data-edge": e.id, "data-verdict": verdict, "data-count": e.verdicts[verdict]};
      el("path", Object.assign({class: "edge" + (e.id === selected ? " selected" : ""), stroke: color,
              "marker-end": `url(#arrow-${COLORS[verdict] ? verdict : "OTHER"})`}, attrs), svg);
      el("path", Object.assign({class: "hit"}, attrs), svg);
      const port = e.port ? `${e.protocol}/${e.port}` : e.protocol;
      const t = el("text", {class: "count", x: g.mx, y: g.my - 4 + i * 14, fill: color, "text-anchor": g.anchor,
                            "data-edge": e.id, "data-verdict": verdict}, labels);
      t.textContent = `${port} ${verdict.toLowerCase()} ${e.verdicts[verdict]}`;
    });
  }
  for (const n of m.nodes) {
    const g = el("g", {class: "node " + n.kind, "data-id": n.id}, svg);
    el("rect", {x: n.x, y: n.y, width: n.w, height: n.h}, g);
    const t = el("text", {x: n.x + n.w / 2, y: n.y + n.h / 2 + 5, "text-anchor": "middle"}, g);
    t.textContent = n.label.length > 22 ? n.label.slice(0, 21) + "…" : n.label;
    el("title", {}, g).textContent = `${n.id}\n${n.pods.join("\n")}`;
  }
  svg.appendChild(labels);
}

function drawDns(d) {
  document.getElementById("dns-summary").textContent = `${d.queries} queries, ${d.errors} errors`;
  const names = document.querySelector("#dns-names tbody"); names.replaceChildren();
  for (const n of d.names) {
    const r = names.insertRow(); cell(r, n.name); cell(r, n.queries); cell(r, n.errors, n.errors ? "DROPPED" : "");
    cell(r, n.denied, n.denied ? "DROPPED" : "");
  }
  const rcodes = document.querySelector("#dns-rcodes tbody"); rcodes.replaceChildren();
  for (const r of d.rcodes) { const row = rcodes.insertRow(); cell(row, r.rcode); cell(row, r.count); }
}

async function showFlows() {
  if (!selected) return;
  const resp = await fetch(`/api/flows?edge=${encodeURIComponent(selected)}&limit=50`);
  const body = await resp.json();
  const e = edgesById[selected];
  if (e) {
    const port = e.port ? `${e.protocol}/${e.port}` : e.protocol;
    document.getElementById("flows-title").textContent = `Recent flows ${e.source} → ${e.destination} ${port}`;
  }
  const tbody = document.querySelector("#flows tbody"); tbody.replaceChildren();
  for (const f of body.flows || []) {
    const r = tbody.insertRow(); r.className = "flow-row";
    cell(r, f.time); cell(r, f.source); cell(r, f.destination); cell(r, f.port); cell(r, f.verdict, f.verdict);
    cell(r, f.drop_reason); cell(r, f.node_name);
  }
}

document.getElementById("map").addEventListener("click", (ev) => {
  const id = ev.target.getAttribute && ev.target.getAttribute("data-edge");
  if (!id) return;
  selected = id;
  for (const p of document.querySelectorAll("path.edge")) p.classList.toggle("selected", p.dataset.edge === id);
  showFlows();
});

async function refresh() {
  try {
    const get = (path) => fetch(path).then(r => r.json());
    const [m, d] = await Promise.all([get("/api/servicemap"), get("/api/dns")]);
    drawMap(m); drawDns(d);
    if (selected) await showFlows();
    document.getElementById("status").textContent =
      `${m.flows} flows, ${m.nodes.length} nodes, ${m.edges.length} edges — nodes: ${m.node_names.join(", ")}`;
    document.body.dataset.loaded = "1";
  } catch (err) {
    document.getElementById("status").textContent = "error: " + err;
  }
}
refresh();
setInterval(refresh, 1000);
</script></body></html>
"""
