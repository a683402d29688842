"""The status page: ``GET /status`` (one self-contained HTML page) and ``GET /status.json``.

What an operator looks at during a swap or an incident instead of ``broker.ctl status``: each
model's versions (state, labels, replicas with device, pid, restarts and batches in hand),
queue depth, the batch sizes formed, requests per second and p50/p99 latency over the last
minute, 4xx/5xx/504 answers, the I/O batchers' tables and the last version changes; and per
version where its requests' time goes (fill, wait, input, model, output, transport: a stacked bar for an
average request and a p99 one), how full its batches leave, their padding, why they leave,
and a sentence of advice when the numbers say it (frontend/batching_view.py).

The JSON is the broker's STATS answer (its ``broker.ctl status``, the last changes of version
state, its I/O batchers, each version's batch sizes) beside every frontend's request counts
and latency histogram (frontend/metrics.py: cumulative, shared by the frontends). The page
polls it every 2 s and works out rates and windowed percentiles itself from successive
answers, so the server keeps no time series. It loads nothing from elsewhere: styles,
script and charts (inline SVG) are in the page. ``--enable_status_page=false`` turns both off.
"""

from __future__ import annotations

import time
from typing import Any

from frontend.batching_view import breakdown
from frontend.metrics import Metrics
from tfbroker.wire import protocol

PATH = "/status"
JSON_PATH = "/status.json"


def status_json(stats: protocol.StatsReply | None, metrics: Metrics) -> dict[str, Any]:
    body: dict[str, Any] = {"time": time.time(), "broker": None, "models": [], "history": [], "iobatchers": [],
                            **metrics.summary()}
    if stats is None:
        body["error"] = "the broker does not answer"
        return body
    status = stats.status
    by_version = {(v.model, v.version): v for v in stats.versions}
    models = status.get("models", [])
    for model in models:
        for version in model.get("versions", []):
            counted = by_version.get((model["name"], version["version"]))
            version["batch_sizes"] = {str(rows): count for rows, count in
                                      sorted(counted.batch_sizes.items())} if counted else {}
            version["breakdown"] = breakdown(counted) if counted else {}
    body.update(broker={**status.get("broker", {}), "counters": stats.counters}, models=models,
                history=status.get("history", []), iobatchers=status.get("iobatchers", []))
    return body


PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tfbroker status</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.1em;margin:0}h3{font-size:.95em;margin:.8em 0 .3em}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:1em;margin:1em 0}
table{border-collapse:collapse}td,th{padding:.15em .7em .15em 0;text-align:left;vertical-align:top}
th{font-weight:600;color:#555}.num{text-align:right;font-variant-numeric:tabular-nums}
.AVAILABLE{color:#0a7d2c}.LOADING,.START{color:#b06d00}.UNLOADING,.END{color:#888}.err{color:#c0392b}
.figures span{display:inline-block;margin-right:1.6em}.figures b{font-size:1.25em}
#banner{display:none;background:#fdecea;color:#c0392b;padding:.6em;border-radius:4px}
svg{vertical-align:middle}.muted{color:#888}.advice{color:#b06d00}
</style></head><body>
<h1>tfbroker status</h1>
<div id="summary" class="muted">loading&hellip;</div>
<div id="banner"></div>
<div id="models"></div>
<div class="card"><h2>I/O batchers</h2><div id="iobatchers" class="muted">none</div></div>
<div class="card"><h2>Last version changes</h2><div id="history" class="muted">none yet</div></div>
<script>
"use strict";
const WINDOW_S = 60, POLL_MS = 2000;
let samples = [];  // {t, models: {name: {total, errors4, errors5, timeouts, buckets}}}, the last minute

function esc(v) { return String(v).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }
function sum(a) { return a.reduce((x, y) => x + y, 0); }

function perModel(body) {
  const out = {};
  const names = new Set([...Object.keys(body.requests || {}), ...body.models.map(m => m.name)]);
  for (const name of names) {
    const byStatus = (body.requests || {})[name] || {};
    let total = 0, e4 = 0, e5 = 0, t = 0;
    for (const [status, n] of Object.entries(byStatus)) {
      total += n;
      if (status === "504") t += n; else if (status >= "500") e5 += n; else if (status >= "400") e4 += n;
    }
    out[name] = {total, errors4: e4, errors5: e5, timeouts: t, buckets: (body.latency_buckets || {})[name] || []};
  }
  return out;
}

function percentile(bounds, counts, q) {  // from a windowed histogram: counts[i] requests at or below bounds[i]
  const total = counts[counts.length - 1];
  if (!total) return null;
  const goal = q * total;
  for (let i = 0; i < counts.length; i++) {
    if (counts[i] >= goal) {
      const lo = i ? bounds[i - 1] : 0, hi = i < bounds.length ? bounds[i] : bounds[bounds.length - 1];
      const below = i ? counts[i - 1] : 0, inside = counts[i] - below;
      return (lo + (hi - lo) * (inside ? (goal - below) / inside : 1)) / 1000;  // ms
    }
  }
  return null;
}

function spark(values, width, height, color) {
  if (values.length < 2) return `<svg width="${width}" height="${height}"></svg>`;
  const top = Math.max(...values, 1e-9);
  const pts = values.map((v, i) => `${(i * width / (values.length - 1)).toFixed(1)},${(height - 1 - v / top * (height - 2)).toFixed(1)}`);
  return `<svg width="${width}" height="${height}" role="img"><polyline fill="none" stroke="${color}" stroke-width="1.5" points="${pts.join(" ")}"/></svg>`;
}

function bars(sizes) {
  const entries = Object.entries(sizes || {}).map(([k, v]) => [Number(k), v]).sort((a, b) => a[0] - b[0]);
  if (!entries.length) return '<span class="muted">no batches yet</span>';
  const top = Math.max(...entries.map(e => e[1])), w = Math.max(4, Math.min(14, Math.floor(240 / entries.length)));
  const rects = entries.map(([rows, n], i) => {
    const h = Math.max(1, Math.round(n / top * 38));
    return `<rect x="${i * w}" y="${40 - h}" width="${w - 1}" height="${h}" fill="#4a78c2"><title>${rows} rows: ${n} batches</title></rect>`;
  });
  return `<svg width="${entries.length * w}" height="40" role="img">${rects.join("")}</svg> <span class="muted">${entries[0][0]}&ndash;${entries[entries.length - 1][0]} rows</span>`;
}

const STAGE_COLORS = {fill: "#e0a030", wait: "#b06d00", input: "#7a9a3a", model: "#4a78c2", output: "#9a6fb0", transport: "#999"};

function stacked(stages, key, scale) {
  let x = 0;
  const rects = Object.entries(stages).map(([name, s]) => {
    const w = Math.max(0, s[key] * scale), r = `<rect x="${x.toFixed(1)}" y="0" width="${w.toFixed(1)}" height="12" fill="${STAGE_COLORS[name] || "#ccc"}"><title>${name}: ${s[key]} ms</title></rect>`;
    x += w;
    return r;
  });
  return `<svg width="${Math.max(1, x).toFixed(0)}" height="12" role="img">${rects.join("")}</svg>`;
}

function breakdownRow(name, v) {
  const b = v.breakdown;
  if (!b || !b.stages) return "";
  const total = key => Object.values(b.stages).reduce((t, s) => t + s[key], 0);
  const scale = 240 / Math.max(total("p99_ms"), 1e-6);
  const parts = Object.entries(b.stages).map(([n, s]) => `${n} ${s.mean_ms}`).join(", ");
  const exits = Object.entries(b.exits).map(([r, n]) => `${r} ${n}`).join(", ");
  const fill = b.fill === null ? "" : `, batches ${Math.round(b.fill * 100)} % full`;
  return `<tr id="breakdown-${esc(name)}-${v.version}"><td></td><td colspan="6">` +
    `<div>average ${total("mean_ms").toFixed(2)} ms ${stacked(b.stages, "mean_ms", scale)} <span class="muted">(${parts} ms)</span></div>` +
    `<div>p99 &le; ${total("p99_ms").toFixed(2)} ms ${stacked(b.stages, "p99_ms", scale)}</div>` +
    `<div class="muted">${b.mean_rows} rows a batch${fill}, ${Math.round(b.padding_share * 100)} % padding; left: ${esc(exits)}</div>` +
    (b.advice ? `<div class="advice">${esc(b.advice)}</div>` : "") + "</td></tr>";
}

function render(body) {
  const banner = document.getElementById("banner");
  banner.style.display = body.error ? "block" : "none";
  banner.textContent = body.error || "";
  const now = body.time, current = perModel(body);
  samples.push({t: now, models: current});
  while (samples.length > 2 && now - samples[1].t >= WINDOW_S) samples.shift();
  const first = samples[0], bounds = body.latency_bounds_us || [];
  const b = body.broker;
  document.getElementById("summary").innerHTML = b ? `broker pid ${b.pid}, up ${Math.round(b.uptime_s)} s, ` +
      `${b.requests} requests in ${b.batches} batches, swap policy ${esc(b.swap_policy)}; updated ${new Date(now * 1000).toLocaleTimeString()}` : "";
  const html = [];
  for (const model of body.models) {
    const name = model.name, cur = current[name] || {total: 0, errors4: 0, errors5: 0, timeouts: 0, buckets: []};
    const series = samples.slice(1).map((s, i) => {
      const a = samples[i].models[name], z = s.models[name];
      return a && z ? (z.total - a.total) / Math.max(1e-3, s.t - samples[i].t) : 0;
    });
    const rps = series.length ? series[series.length - 1] : 0;
    const old = first.models[name];
    const windowed = cur.buckets.map((n, i) => n - (old && old.buckets[i] ? old.buckets[i] : 0));
    const p50 = percentile(bounds, windowed, 0.5), p99 = percentile(bounds, windowed, 0.99);
    const fmt = v => v === null ? "&ndash;" : v.toFixed(v < 10 ? 2 : 0);
    const labels = Object.entries(model.labels || {}).map(([k, v]) => `${esc(k)}&rarr;${v}`).join(", ") || "none";
    const rows = [];
    for (const v of [...model.versions].reverse()) {
      const note = v.draining ? "draining" : (v.error ? `<span class="err">${esc(v.error)}</span>` : "");
      rows.push(`<tr><td class="num">${v.version}</td><td class="${esc(v.state)}">${esc(v.state)}</td>` +
        `<td class="num">${v.pid || "&ndash;"}</td><td class="num">${v.queued}</td><td class="num">${v.in_flight}</td><td>${bars(v.batch_sizes)}</td><td>${note}</td></tr>`);
      rows.push(breakdownRow(name, v));
      for (const r of v.replicas || []) {
        rows.push(`<tr class="muted"><td></td><td>${esc(r.device)}</td><td class="num">${r.pid || "&ndash;"}</td><td></td>` +
          `<td class="num">${r.in_flight}</td><td colspan="2">${r.ready ? "ready" : "not ready"}, ${r.batches} batches, ${r.restarts} restarts</td></tr>`);
      }
    }
    html.push(`<div class="card" id="model-${esc(name)}"><h2>${esc(name)}</h2>` +
      `<div class="muted">${esc(model.base_path)}; labels ${labels}</div>` +
      `<div class="figures"><span>requests/s <b id="rps-${esc(name)}">${rps.toFixed(1)}</b> ${spark(series, 120, 24, "#4a78c2")}</span>` +
      `<span>p50 <b id="p50-${esc(name)}">${fmt(p50)}</b> ms</span><span>p99 <b id="p99-${esc(name)}">${fmt(p99)}</b> ms</span>` +
      `<span>requests <b id="total-${esc(name)}">${cur.total}</b></span>` +
      `<span>4xx <b>${cur.errors4}</b></span><span>5xx <b class="${cur.errors5 ? "err" : ""}">${cur.errors5}</b></span>` +
      `<span>504 <b class="${cur.timeouts ? "err" : ""}">${cur.timeouts}</b></span></div>` +
      `<h3>Versions</h3><table id="versions-${esc(name)}"><tr><th>version</th><th>state</th><th>pid</th><th>queued</th>` +
      `<th>in flight</th><th>batch sizes</th><th></th></tr>${rows.join("")}</table></div>`);
  }
  document.getElementById("models").innerHTML = html.join("") || '<div class="card muted">no models</div>';
  const io = body.iobatchers || [];
  document.getElementById("iobatchers").innerHTML = io.length ? "<table><tr><th>#</th><th>pid</th><th>state</th>" +
      "<th>restarts</th><th>batches in hand</th><th>tables</th></tr>" + io.map(x => `<tr><td>${x.index}</td><td>${x.pid || "&ndash;"}</td>` +
      `<td>${x.ready ? "ready" : "starting"}</td><td class="num">${x.restarts}</td><td class="num">${x.in_flight}</td><td>${esc(x.tables.join(", ") || "none")}</td></tr>`).join("") + "</table>" : "none";
  const history = [...(body.history || [])].reverse();
  document.getElementById("history").innerHTML = history.length ? "<table>" + history.map(h =>
      `<tr><td>${new Date(h.time * 1000).toLocaleTimeString()}</td><td>${esc(h.model)} version ${h.version}</td>` +
      `<td>${esc(h.from)} &rarr; <span class="${esc(h.to)}">${esc(h.to)}</span></td>` +
      `<td>${h.load_s !== undefined ? "loaded in " + h.load_s + " s" : ""}${h.error ? ' <span class="err">' + esc(h.error) + "</span>" : ""}</td></tr>`).join("") + "</table>" : "none yet";
}

async function poll() {
  try {
    const response = await fetch("status.json", {cache: "no-store"});
    if (response.ok) render(await response.json());
  } catch (e) {
    const banner = document.getElementById("banner");
    banner.style.display = "block";
    banner.textContent = "the server does not answer";
  }
  setTimeout(poll, POLL_MS);
}
poll();
</script></body></html>
"""
