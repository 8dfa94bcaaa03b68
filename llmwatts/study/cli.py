"""``llmwatts study PLAN.toml``: run a plan's grid (or print it with ``--dry-run``), then the report."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
example:
  llmwatts study caps.toml --dry-run                 # the grid and its estimated time; contacts nothing
  llmwatts study caps.toml --study-db caps.db --out caps-report/
  llmwatts study caps.toml --preset paper            # the paper's grid (4,096 prompts, batch 64, 256 tokens)

A rerun of the same command skips the cells already done and redoes an interrupted one. Records are
pulled from the servers over gRPC (Control.ExportRecords): set $LLMWATTS_CONTROL_TOKEN to their control
token. The plan's format is in docs/study.md.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "study", help="run a declarative grid of load runs (caps, batch sizes, rates...) into one study DB",
        description="Run every cell of a study plan (TOML: datasets x batch sizes x users or rates x power caps "
        "x engines, repetitions, a warm-up per cell) against one or more servers, resumably, pull their "
        "records over gRPC into one study DB and write the report.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", metavar="PLAN.toml", help="the study plan")
    parser.add_argument("--study-db", metavar="PATH", help="the study DB (default: <name>.study.db)")
    parser.add_argument("--out", metavar="DIR", help="folder for the report (default: <name>-report)")
    parser.add_argument("--dry-run", action="store_true", help="print the grid and its estimated time; run nothing")
    parser.add_argument("--preset", choices=["paper"], help="defaults under the plan: the paper's grid")
    parser.add_argument("--server", action="append", metavar="HOST:PORT",
                        help="run against these servers instead of the plan's (repeatable)")
    parser.add_argument("--data-dir", metavar="DIR", help="where the prompt files are")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--ca", metavar="PEM", help="TLS: the CA of the servers' certificates")
    parser.add_argument("--cert", metavar="PEM", help="mutual TLS: client certificate")
    parser.add_argument("--key", metavar="PEM", help="mutual TLS: client key")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from llmwatts.console import console, simulated_power_notice
    from llmwatts.study.plan import load_plan

    plan = load_plan(args.plan, preset=args.preset, servers=args.server)
    if args.data_dir:
        plan.data_dir = args.data_dir
    out = console()
    if args.dry_run:
        print_grid(plan, out)
        return 0
    from llmwatts.study.runner import run_study

    study_db = Path(args.study_db or f"{plan.name}.study.db")

    def on_simulated(targets: list[str]) -> None:
        out.print(simulated_power_notice(targets), highlight=False, soft_wrap=True)

    result = run_study(plan, study_db, out=Path(args.out or f"{plan.name}-report"),
                       tls={"ca": args.ca, "cert": args.cert, "key": args.key}, show_progress=not args.no_progress,
                       on_simulated=on_simulated)
    out.print(f"study {plan.name}: {len(result.done)} cells run, {len(result.skipped)} already done"
              + (f", {len(result.abandoned)} interrupted attempts closed" if result.abandoned else "")
              + (f", {len(result.ended_open_runs)} runs they left open ended" if result.ended_open_runs else "")
              + f"; study DB {result.study_db}; report {result.report_dir}")
    if result.sla is not None:
        out.print(f"SLA: {result.sla.message}")
    return 0


def print_grid(plan, out) -> None:
    from rich.table import Table

    cells = plan.cells()
    table = Table(title=f"study {plan.name}: {len(cells)} cells x {len(plan.servers)} server(s)")
    for name in ["#", *plan.grid, "rep", "est. s"]:
        table.add_column(name, justify="right")
    total_s = 0.0
    for i, cell in enumerate(cells, 1):
        est = plan.estimate_s(cell) * len(plan.servers)
        total_s += est
        table.add_row(str(i), *(str(v) for _, v in cell.values), str(cell.rep), f"{est:.0f}")
    out.print(table)
    idle = plan.idle_s * len(plan.servers)
    out.print(f"estimated time: {(total_s + idle) / 60:.1f} min (idle power {idle:g} s; a closed-loop request "
              f"guessed at {plan.est_request_s:g} s: set [study] est_request_s)")
