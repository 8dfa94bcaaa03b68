"""The study report: a rich table on the terminal, runs.csv (every column), runs.md (the main columns,
reconciliation, SLA choice) and report.html (for people, with its plots: ``html_report.py``).

Simulated power is labelled wherever a number appears: the ``power`` column of every table, and
"SIMULATED power" in table titles whenever any run shown is simulated.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import rich.box
from rich.console import Console
from rich.table import Table

from llmwatts.analysis import metrics, reconcile, tradeoffs, views
from llmwatts.analysis.study_db import open_study_db
from llmwatts.console import console as llmwatts_console
from llmwatts.errors import FailedPrecondition, InvalidArgument

# The columns of runs.md; runs.csv has every METRIC_COLUMNS column (report.html: report_data.TABLES).
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
# PNG files the first draft of the report wrote beside report.html (its plots now live inside report.html):
# removed from an --out folder a report is written to, so no stale figure sits beside the new page.
STALE_FILES = ("j_per_token_vs_batch.png", "tokens_per_s_vs_batch.png", "tradeoff.png", "power_timeline.png")
RECONCILE_COLUMNS = [
    "run_id", "client_sent", "server_ok", "server_error", "missing", "duplicated", "server_only",
    "outside_window", "attributed_j", "batch_j", "attribution_rel_diff", "status_mismatch",
    "done_after_window", "batch_energy_exceeds_window",
]


@dataclass
class ReportResult:
    """Paths written and the data behind them (report.html holds the plots)."""

    out_dir: Path
    runs_csv: Path
    runs_md: Path
    report_html: Path
    runs: list[dict] = field(default_factory=list)
    reconciliations: list[reconcile.Reconciliation] = field(default_factory=list)
    sla: tradeoffs.SlaChoice | None = None
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


def _print_table(console: Console, runs: list[dict], simulated: bool) -> None:
    table = Table(title=_title("llmwatts runs", simulated), caption="every column: runs.csv / report.html",
                  box=rich.box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    for column, header in TERMINAL_COLUMNS.items():
        table.add_column(header, justify="left" if column in ("run_id", "power") else "right",
                         no_wrap=column == "run_id")
    for row in runs:
        table.add_row(*(_short(row.get(c)) for c in TERMINAL_COLUMNS))
    console.print(table)


def _reconcile_row(rec: reconcile.Reconciliation) -> dict:
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
    """Compute every run's metrics from ``study_db`` and write runs.csv, runs.md and report.html (its
    plots inside) into ``out_dir`` (created). Prints the runs table to ``console`` (stdout by default).
    ``sla_p95_ms``: also pick the lowest-J/token run with latency p95 at most this many ms. ``slo``
    (ms, keys ttft_ms/tpot_ms/e2e_ms): the objectives goodput is judged by for every run, instead of each
    run's own (``llmwatts load --slo``)."""
    db = open_study_db(study_db, create=False)
    if slo:  # goodput under these objectives: the totals are recomputed with them (one request pass)
        views.refresh(db, slo)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidArgument(f"--out {out} is a file; give a folder")
    runs = metrics.all_run_metrics(db)
    if not runs:
        raise FailedPrecondition(
            "the study DB holds no runs; ingest a server DB whose load was wrapped in BeginRun/EndRun"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in STALE_FILES:
        (out / name).unlink(missing_ok=True)
    simulated = any(r["simulated"] for r in runs)
    result = ReportResult(out, out / "runs.csv", out / "runs.md", out / "report.html", runs=runs,
                          simulated=simulated)
    result.reconciliations = reconcile.all_reconciliations(db, [r["run_id"] for r in runs], runs=runs)
    if sla_p95_ms is not None:
        result.sla = tradeoffs.choose_sla(latency_p95_ms_max=sla_p95_ms, runs=runs)

    with open(result.runs_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(metrics.METRIC_COLUMNS))
        writer.writeheader()
        writer.writerows(runs)
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
    console.print(f"wrote {result.runs_csv}, {result.runs_md} and {result.report_html}")
    return result
