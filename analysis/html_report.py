"""report.html for people: one self-contained page (jinja2; plots inlined as base64 PNGs).

Per workload group: the SLA choice over both levers (power cap, locked SM clock) saying which one won, with
its saving against the default cap and clock and the runner-up, three
tables (throughput and energy; latency; utilisation) with column names in words and units, the Pareto
front as a table and a plot, J/token and throughput against batch size, J/token against the cap for cap
sweeps, J/token and latency p95 against the locked SM clock for clock sweeps, per-request joules against
latency; then a power timeline per run, and our cap change beside
the seed paper's published one. Every image is checked by a script on load (``data-images-ok``), so a
headless browser test can tell that each plot rendered.
"""

from __future__ import annotations

import base64
from pathlib import Path

import jinja2

from llmwatts.analysis import report_data as data
from llmwatts.analysis import report_plots as plots

TEMPLATE = jinja2.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:3px 6px}
td{text-align:right}td.t{text-align:left}th{background:#f2f2f2;font-weight:600;max-width:9em}
.sim{background:#fff3f3;border-left:4px solid #b00;padding:.5em 1em}.choice{background:#f3fff3;
border-left:4px solid #080;padding:.5em 1em}img{max-width:100%;display:block;margin:.4em 0}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{margin:0;max-width:680px}h2{border-bottom:1px solid #ddd}
</style></head>
<body data-images-ok="pending">
<h1>{{ title }}</h1>
{% if sim_note %}<p class="sim">{{ sim_note }}</p>{% endif %}
<p>{{ runs_n }} runs in {{ groups|length }} workload group(s). A workload is what a run serves (model, engine,
precision, dataset, streaming, sampling, output length); runs of different workloads are never compared in one
series or one choice. Definitions of every number: docs/analysis.md; every column per run: runs.csv.</p>
{% for g in groups %}
<h2>{{ g.name }}</h2>
{% if g.choice %}<div class="choice"><b>SLA choice (latency p95 ≤ {{ "%g"|format(sla) }} ms):</b> {{ g.choice.message }}
{% if g.choice.runner_up %}<br>Runner-up: {{ setting(g.choice.runner_up) }} at {{ "%.4g"|format(g.choice.runner_up.j_per_token) }} J/token,
latency p95 {{ "%.0f"|format(g.choice.runner_up.latency_p95_ms) }} ms.{% endif %}</div>{% endif %}
{% for name, cols in tables.items() %}<h3>{{ name }}</h3>
<table><thead><tr>{% for c in cols if present(g.runs, c) %}<th>{{ header(c) }}</th>{% endfor %}</tr></thead><tbody>
{% for r in g.runs %}<tr>{% for c in cols if present(g.runs, c) %}<td class="{{ 't' if c in ('run_id','dataset','power') }}">{{ fmt(r.get(c)) }}</td>{% endfor %}</tr>{% endfor %}
</tbody></table>{% endfor %}
{% if g.pareto %}<h3>Pareto front (lowest energy for its latency)</h3>
<table><thead><tr><th>#</th><th>settings</th><th>latency p95 (ms)</th><th>{{ header('j_per_token') }}</th><th>run</th></tr></thead><tbody>
{% for r in g.pareto %}<tr><td>{{ loop.index }}</td><td class="t">{{ setting(r) }}</td><td>{{ fmt(r.latency_p95_ms) }}</td>
<td>{{ fmt(r.j_per_token) }}</td><td class="t">{{ r.run_id }}</td></tr>{% endfor %}</tbody></table>{% endif %}
<div class="plots">{% for caption, uri in g_plots[loop.index0] %}<figure><img alt="{{ caption }}" src="{{ uri }}">
<figcaption>{{ caption }}</figcaption></figure>{% endfor %}</div>
{% endfor %}
{% if timeline %}<h2>Power over each run</h2>
<p>Each run's GPU power over its own window ± 1 s (the black lines: BeginRun and EndRun), the mean of the
samples in bins of one width per run chosen from its length (at most 120 bins; the width is under each plot;
docs/analysis.md), their min–max shaded; shaded green: the steady
state (requests in flight at 90% or more of the target: the closed loop's users, else the most ever in flight;
docs/analysis.md); dashed red: cap changes. Steady state shaded in {{ steady.shaded }} of {{ steady.shown }} runs{%
if steady.without %}; none in {{ steady.without|join(", ") }} (in-flight requests never reached 90% of the
target){% endif %}.</p>
<img alt="power timelines" src="{{ timeline }}">{% endif %}
<h2>Against the seed paper</h2>
<table><thead><tr><th>source</th><th>model</th><th>GPUs</th><th>cap change (W)</th><th>time per token change (%)</th>
<th>energy per token change (%)</th></tr></thead><tbody>
{% for p in paper %}<tr><td class="t">{{ p.source }}</td><td class="t">{{ p.model }}</td><td class="t">{{ p.gpus }}</td>
<td>{{ p.cap_from_w }} → {{ p.cap_to_w }}</td><td>{{ "%+.1f"|format(p.time_change_pct) }}</td><td>{{ "%+.1f"|format(p.energy_change_pct) }}</td></tr>{% endfor %}
{% for g in groups if g.cap_change %}<tr><td class="t">this study{{ " (SIMULATED)" if sim_note }}: {{ g.name }}</td>
<td class="t">{{ g.workload.get('model', '') }}</td><td class="t">{{ g.runs[0].get('n_gpus') or '' }}</td>
<td>{{ "%g"|format(g.cap_change.cap_from_w) }} → {{ "%g"|format(g.cap_change.cap_to_w) }}</td>
<td>{{ "%+.1f"|format(g.cap_change.time_change_pct) }}</td><td>{{ "%+.1f"|format(g.cap_change.energy_change_pct) }}</td></tr>{% endfor %}
</tbody></table>
<p>Paper: S. Samsi et al., "From Words to Watts: Benchmarking the Energy Costs of Large Language Model
Inference", IEEE HPEC 2023 (arXiv:2310.03003); figures kept in analysis/reference/samsi2023.toml.</p>
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-ok", ok + "/" + imgs.length);
});
</script>
</body></html>
""", autoescape=True, undefined=jinja2.StrictUndefined)


def _uri(png: bytes | None) -> str | None:
    return None if png is None else "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "–"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def _exists(db, name: str) -> bool:
    return name in db.table_names() or name in db.view_names()


def cpu_only(db) -> bool:
    """True when every server ran its model on a CPU (its layout names no CUDA device)."""
    if "servers" not in db.table_names():
        return False
    layouts = [r[0] or "" for r in db.execute("SELECT layout FROM servers")]
    return bool(layouts) and all("cuda" not in layout for layout in layouts)


def write_html(db, runs: list[dict], path: Path, *, sla_p95_ms: float | None, cpu_only: bool) -> Path:
    """Write report.html for ``runs`` (run_metrics rows) of study DB ``db`` (sqlite_utils)."""
    runs = data.with_labels(db, runs)
    apart = [k for k in data.WORKLOAD_KEYS if len({str(r.get(k)) for r in runs}) > 1]  # what tells groups apart
    for r in runs:
        r["_title"] = ", ".join([f"{k.replace('_', ' ')} {r.get(k)}" for k in apart] + [data.settings_text(r)])
    all_sim = bool(runs) and all(r.get("simulated") for r in runs)
    titles = {r["run_id"]: r["_title"] for r in runs}
    aside = plots.TimelinesAside(db, runs, titles) if _exists(db, "telemetry_buckets") else None
    try:
        return _write(db, runs, path, aside, titles, all_sim, sla_p95_ms=sla_p95_ms, cpu_only=cpu_only)
    finally:
        if aside is not None:
            aside.close()


def _write(db, runs, path, aside, titles, all_sim, *, sla_p95_ms, cpu_only) -> Path:
    groups = data.groups_of(runs)
    group_plots = []
    for g in groups:
        g.pareto = data.pareto_rows(g.runs)
        g.cap_change = data.cap_change(g)
        if sla_p95_ms is not None:
            g.choice = data.choose(g, sla_p95_ms)
        sim = any(r.get("simulated") for r in g.runs)
        figures = [
            ("energy per output token vs batch size",
             plots.metric_vs(g, "batch_size", "j_per_token", "energy per output token (J)",
                             "batch size (prompts per request)", sim)),
            ("throughput vs batch size",
             plots.metric_vs(g, "batch_size", "tokens_per_s", "throughput (output tokens/s)",
                             "batch size (prompts per request)", False)),
            ("energy per output token vs power cap",
             plots.metric_vs(g, "cap_w", "j_per_token", "energy per output token (J)",
                             "power cap (W)", sim) if g.cap_change else None),
            ("energy per output token vs locked SM clock",
             plots.metric_vs(g, "sm_clock_mhz", "j_per_token", "energy per output token (J)",
                             "locked SM clock (MHz)", sim) if data.clock_sweep(g) else None),
            ("latency p95 vs locked SM clock",
             plots.metric_vs(g, "sm_clock_mhz", "latency_p95_ms", "latency p95 (ms)",
                             "locked SM clock (MHz)", False) if data.clock_sweep(g) else None),
            ("latency p95 vs energy per token, Pareto front", plots.pareto(g, sim)),
            ("energy per request vs its latency",
             plots.request_energy(db, g, sim) if _exists(db, "request_join") else None),
        ]
        group_plots.append([(caption, _uri(png)) for caption, png in figures if png is not None])
    timeline = aside.png(db, runs, titles) if aside is not None else None  # drawn beside the plots above
    shown = runs[:plots.MAX_TIMELINES]
    without = [r["_title"] for r in shown if plots.steady_span_of(db, r["run_id"]) is None]
    steady = {"shown": len(shown), "shaded": len(shown) - len(without), "without": without}
    title = "llmwatts report" + (" — SIMULATED power" if all_sim else "")
    sim_cols = data.SIMULATED_COLUMNS if all_sim else set()
    # Some runs simulated, some measured: each table says which is which (the note points there).
    tables = {name: ["run_id", "power", *cols[1:]] for name, cols in data.TABLES.items()} \
        if len({r.get("power") for r in runs}) > 1 else data.TABLES

    def header(column: str) -> str:
        name = data.COLUMN_NAMES.get(column, column.replace("_", " "))
        return name + (" [simulated]" if column in sim_cols else "")

    def present(rows, column) -> bool:
        return any(r.get(column) is not None for r in rows)

    html = TEMPLATE.render(
        title=title, sim_note=data.simulated_note(runs, cpu_only), runs_n=len(runs), groups=groups,
        tables=tables, g_plots=group_plots, timeline=_uri(timeline), steady=steady, paper=data.reference(),
        sla=sla_p95_ms or 0, fmt=fmt, header=header, present=present, setting=data.settings_text)
    path.write_text(html, encoding="utf-8")
    return path
