"""The study report: a rich table on the terminal, runs.csv, runs.md, PNG plots and report.html.

Simulated power is labelled wherever a number appears: the ``power`` column of every table, and
"SIMULATED power" in table and plot titles whenever any run shown is simulated.
"""

from __future__ import annotations

import base64
import csv
import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import rich.box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from llmwatts.analysis import metrics, samples, views  # noqa: E402
from llmwatts.analysis.ingest import open_study_db  # noqa: E402
from llmwatts.console import console as llmwatts_console  # noqa: E402
from llmwatts.errors import FailedPrecondition, InvalidArgument  # noqa: E402

# The columns shown in the terminal, runs.md and report.html; runs.csv has every METRIC_COLUMNS column.
DISPLAY_COLUMNS = [
    "run_id", "model", "shard_count", "batch_size", "cap_w", "power", "duration_s", "responses",
    "words_per_s", "tokens_per_s", "responses_per_s", "avg_power_w", "energy_total_j", "energy_busy_j",
    "j_per_token", "j_per_response", "sm_pct_mean", "mem_pct_mean", "mem_used_pct_max",
    "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "ttft_p50_ms", "gpu_energy_spread",
    "tpot_p50_ms", "itl_p50_ms", "slo", "goodput_rps", "goodput_tokens_per_s", "j_per_good_token",
    "j_per_request_p50", "j_per_request_p95", "j_per_output_token_p50", "idle_power_w", "energy_dynamic_j",
    "steady_s", "steady_j_per_token",
]
# The terminal gets fewer columns, with short headers, so the table fits a normal window.
TERMINAL_COLUMNS = {
    "run_id": "run", "batch_size": "batch", "shard_count": "GPUs", "cap_w": "cap W", "power": "power",
    "tokens_per_s": "tok/s", "avg_power_w": "W", "j_per_token": "J/tok", "j_per_response": "J/resp",
    "sm_pct_mean": "SM%", "mem_pct_mean": "mem%", "latency_p95_ms": "p95 ms",
}
RECONCILE_COLUMNS = [
    "run_id", "client_sent", "server_ok", "server_error", "missing", "duplicated", "server_only",
    "outside_window", "attributed_j", "batch_j", "attribution_rel_diff", "status_mismatch",
    "done_after_window", "batch_energy_exceeds_window",
]
PLOT_NAMES = ("j_per_token_vs_batch", "tokens_per_s_vs_batch", "tradeoff", "power_timeline")
MAX_POINTS_PER_GPU = 5000


@dataclass
class ReportResult:
    """Paths written and the data behind them. ``plots`` maps a plot name to its PNG (absent: no data)."""

    out_dir: Path
    runs_csv: Path
    runs_md: Path
    report_html: Path
    plots: dict[str, Path] = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    reconciliations: list[metrics.Reconciliation] = field(default_factory=list)
    sla: metrics.SlaChoice | None = None
    simulated: bool = False


def fmt(value) -> str:
    """A cell: blank for None, 4 significant digits for floats (whole numbers above 10 000)."""
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN
            return ""
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def _short(value) -> str:
    """A terminal cell: 3 significant digits (whole numbers from 1000 up)."""
    if isinstance(value, float) and value == value:
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return fmt(value)


def _title(text: str, simulated: bool) -> str:
    return f"{text} — SIMULATED power" if simulated else text


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table; ``|`` in cells is escaped."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _html_table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(row.get(c)))}</td>" for c in columns) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _series_key(row: dict) -> str:
    parts = [str(row.get("model") or "?")]
    if row.get("shard_count") is not None:
        parts.append(f"{row['shard_count']} GPU")
    if row.get("cap_w") is not None:
        parts.append(f"cap {fmt(float(row['cap_w']))} W")
    return ", ".join(parts)


def _save(fig, ax, path: Path) -> Path:
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_vs_batch(runs: list[dict], column: str, ylabel: str, title: str, path: Path, simulated: bool):
    usable = [r for r in runs if r.get("batch_size") is not None and r.get(column) is not None]
    if not usable:
        return None
    series: dict[str, list[tuple[float, float]]] = {}
    for row in usable:
        series.setdefault(_series_key(row), []).append((float(row["batch_size"]), row[column]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("batch size (prompts per request)")
    ax.set_ylabel(ylabel)
    ax.set_title(_title(title, simulated))
    return _save(fig, ax, path)


def _plot_tradeoff(points: list[metrics.TradeoffPoint], path: Path, simulated: bool):
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([p.latency_p95_ms for p in points], [p.j_per_token for p in points], color="tab:gray",
               label="runs")
    front = [p for p in points if p.pareto]  # points are sorted by latency
    ax.plot([p.latency_p95_ms for p in front], [p.j_per_token for p in front], color="tab:red", marker="o",
            drawstyle="steps-post", label="Pareto front")
    for p in points:
        ax.annotate(p.run_id, (p.latency_p95_ms, p.j_per_token), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("latency p95 (ms, client)")
    ax.set_ylabel("energy per output token (J)")
    ax.set_title(_title("Latency vs energy trade-off", simulated))
    return _save(fig, ax, path)


def _plot_power_timeline(db, path: Path):
    servers = [r[0] for r in db.execute(
        "SELECT DISTINCT g.server_id FROM telemetry_gpus g "
        "WHERE EXISTS (SELECT 1 FROM telemetry_buckets s WHERE s.gpu_key = g.gpu_key) ORDER BY g.server_id")]
    if not servers:
        return None
    fig, axes = plt.subplots(len(servers), 1, figsize=(9, 3.2 * len(servers)), squeeze=False)
    for ax, server_id in zip(axes[:, 0], servers):
        gpus = db.execute("SELECT gpu_key, gpu_uuid FROM telemetry_gpus WHERE server_id = ? ORDER BY rank, gpu_uuid",
                          [server_id]).fetchall()
        keys = [k for k, _ in gpus]
        marks = ",".join("?" * len(keys))
        t0_ns, t1_ns, server_simulated = db.execute(
            f"SELECT min(ts_min), max(ts_max), max(simulated) FROM telemetry_buckets WHERE gpu_key IN ({marks})",
            keys).fetchone()
        for gpu_key, gpu_uuid in gpus:
            x, mean_w, min_w, max_w = samples.power_series(db, gpu_key, t0_ns, t1_ns, MAX_POINTS_PER_GPU)
            line, = ax.plot(x, mean_w, lw=1, label=gpu_uuid)
            ax.fill_between(x, min_w, max_w, color=line.get_color(), alpha=0.15, lw=0)
        for run_id, begin_ns, end_ns in db.execute(
            "SELECT run_id, begin_ns, end_ns FROM runs WHERE server_id = ? AND end_ns IS NOT NULL "
            "ORDER BY begin_ns", [server_id]) if db["runs"].exists() else []:
            ax.axvspan((begin_ns - t0_ns) / 1e9, (end_ns - t0_ns) / 1e9, color="tab:blue", alpha=0.08)
            steady = db.execute("SELECT begin_ns, end_ns FROM run_steady WHERE run_id = ?", [run_id]).fetchone()
            if steady:
                ax.axvspan((steady[0] - t0_ns) / 1e9, (steady[1] - t0_ns) / 1e9, fill=False, hatch="//",
                           edgecolor="tab:green", lw=0, alpha=0.4)
            ax.text((begin_ns - t0_ns) / 1e9, 1.0, f" {run_id}", transform=ax.get_xaxis_transform(),
                    fontsize=7, va="top")
        if db["cap_events"].exists():
            for ts_ns, gpu_uuid, kind, new_cap_w in db.execute(
                "SELECT ts_ns, gpu_uuid, kind, new_cap_w FROM cap_events WHERE server_id = ? ORDER BY ts_ns",
                [server_id],
            ):
                x = (ts_ns - t0_ns) / 1e9
                ax.axvline(x, color="tab:red", ls="--", lw=0.8)
                ax.text(x, 0.02, f" {kind} {fmt(new_cap_w)} W", rotation=90, fontsize=6, color="tab:red",
                        transform=ax.get_xaxis_transform(), va="bottom")
        ax.set_xlabel("time since first sample (s, server clock)")
        ax.set_ylabel("power (W)")
        ax.set_title(_title(f"GPU power, server {server_id} (mean per time bucket, min–max band; "
                            "runs shaded, steady state hatched, cap changes dashed)",
                            bool(server_simulated)),
                     fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _print_table(console: Console, runs: list[dict], simulated: bool) -> None:
    table = Table(title=_title("llmwatts runs", simulated), caption="every column: runs.csv / report.html",
                  box=rich.box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for column, header in TERMINAL_COLUMNS.items():
        table.add_column(header, justify="left" if column in ("run_id", "power") else "right",
                         no_wrap=column == "run_id")
    for row in runs:
        table.add_row(*(_short(row.get(c)) for c in TERMINAL_COLUMNS))
    console.print(table)


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _write_html(result: ReportResult) -> None:
    title = _title("llmwatts report", result.simulated)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
        "font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
        "th{background:#f0f0f0}.sim{color:#b00;font-weight:bold}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if result.simulated:
        parts.append("<p class='sim'>Some runs use SIMULATED power: their watts and joules come from a model "
                     "of the GPU, not from NVML. See the power column.</p>")
    parts += [
        "<h2>Runs</h2>", _html_table(result.runs, DISPLAY_COLUMNS),
        "<p>Every column, with definitions, is in runs.csv and docs/analysis.md.</p>",
        "<h2>Reconciliation</h2>",
        _html_table([_reconcile_row(r) for r in result.reconciliations], RECONCILE_COLUMNS),
    ]
    if result.sla is not None:
        parts += ["<h2>SLA choice</h2>", f"<p>{html.escape(result.sla.message)}</p>"]
    for name, path in result.plots.items():
        parts += [f"<h2>{html.escape(name.replace('_', ' '))}</h2>",
                  f"<img alt='{html.escape(name)}' src='{_png_data_uri(path)}'>"]
    parts.append("</body></html>\n")
    result.report_html.write_text("\n".join(parts), encoding="utf-8")


def _reconcile_row(rec: metrics.Reconciliation) -> dict:
    return {c: getattr(rec, c) for c in RECONCILE_COLUMNS}


def _write_markdown(result: ReportResult) -> None:
    lines = [f"# {_title('llmwatts runs', result.simulated)}\n", markdown_table(result.runs, DISPLAY_COLUMNS)]
    lines += ["\n## Reconciliation\n",
              markdown_table([_reconcile_row(r) for r in result.reconciliations], RECONCILE_COLUMNS)]
    if result.sla is not None:
        lines += ["\n## SLA choice\n", result.sla.message + "\n"]
    result.runs_md.write_text("\n".join(lines), encoding="utf-8")


def orphan_client_runs(db) -> list[str]:
    """Client run ids that no ingested server saw (their server DB was not ingested)."""
    if not db["client_runs"].exists():
        return []
    server_runs = set(r[0] for r in db.execute("SELECT run_id FROM runs")) if db["runs"].exists() else set()
    client_runs = [r[0] for r in db.execute("SELECT DISTINCT run_id FROM client_runs ORDER BY run_id")]
    return [run_id for run_id in client_runs if run_id not in server_runs]


def build_report(
    study_db,
    out_dir: str | os.PathLike,
    *,
    sla_p95_ms: float | None = None,
    slo: dict[str, float] | None = None,
    console: Console | None = None,
) -> ReportResult:
    """Compute every run's metrics from ``study_db`` and write runs.csv, runs.md, the plots and
    report.html into ``out_dir`` (created). Prints the runs table to ``console`` (stdout by default).
    ``sla_p95_ms``: also pick the lowest-J/token run with latency p95 at most this many ms. ``slo``
    (ms, keys ttft_ms/tpot_ms/e2e_ms): the objectives goodput is judged by for every run, instead of each
    run's own (``llmwatts load --slo``)."""
    db = open_study_db(study_db, create=False)
    if slo:
        views.ensure_fresh(db)
        views.set_slo(db, slo)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidArgument(f"--out {out} is a file; give a folder")
    runs = metrics.all_run_metrics(db)
    if not runs:
        raise FailedPrecondition(
            "the study DB holds no runs; ingest a server DB whose load was wrapped in BeginRun/EndRun"
        )
    out.mkdir(parents=True, exist_ok=True)
    simulated = any(r["simulated"] for r in runs)
    result = ReportResult(out, out / "runs.csv", out / "runs.md", out / "report.html", runs=runs,
                          simulated=simulated)
    result.reconciliations = metrics.all_reconciliations(db, [r["run_id"] for r in runs], runs=runs)
    points = metrics.tradeoffs(runs=runs)
    if sla_p95_ms is not None:
        result.sla = metrics.choose_sla(latency_p95_ms_max=sla_p95_ms, runs=runs)

    with open(result.runs_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(metrics.METRIC_COLUMNS))
        writer.writeheader()
        writer.writerows(runs)
    plots = {
        "j_per_token_vs_batch": _plot_vs_batch(runs, "j_per_token", "energy per output token (J)",
                                               "J/token vs batch size", out / "j_per_token_vs_batch.png",
                                               simulated),
        "tokens_per_s_vs_batch": _plot_vs_batch(runs, "tokens_per_s", "output tokens / s",
                                                "Throughput vs batch size", out / "tokens_per_s_vs_batch.png",
                                                simulated),
        "tradeoff": _plot_tradeoff(points, out / "tradeoff.png", simulated),
        "power_timeline": _plot_power_timeline(db, out / "power_timeline.png"),
    }
    result.plots = {name: path for name, path in plots.items() if path is not None}
    _write_markdown(result)
    from llmwatts.analysis.html_report import cpu_only, write_html

    write_html(db, runs, result.report_html, sla_p95_ms=sla_p95_ms, cpu_only=cpu_only(db))

    console = console or llmwatts_console()
    _print_table(console, runs, simulated)
    for rec in result.reconciliations:
        if rec.missing or rec.duplicated or rec.server_only:
            console.print(
                f"run {rec.run_id}: {rec.missing} client request(s) with no server row, "
                f"{rec.duplicated} on several servers, {rec.server_only} server row(s) no client sent"
            )
        if rec.done_after_window or rec.batch_energy_exceeds_window:
            console.print(
                f"run {rec.run_id}: its window ended before {rec.done_after_window} of its request(s) finished"
                + (" and its batches' energy exceeds the window's" if rec.batch_energy_exceeds_window else "")
                + ": its J/token leaves out energy those requests spent"
            )
    for run_id in orphan_client_runs(db):
        console.print(f"client run {run_id} has no server run: ingest its server DB (--server-db)")
    if result.sla is not None:
        console.print(result.sla.message)
    console.print(f"wrote {result.runs_csv}, {result.runs_md}, {result.report_html} and "
                  f"{len(result.plots)} plot(s) to {out}")
    return result
