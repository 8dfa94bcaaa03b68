"""``llmwatts report``: ingest server and client DBs into a study DB, then build the report."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from llmwatts.errors import InvalidArgument, NotFound

EPILOG = """\
example:
  llmwatts report --server-db server.db --client-db client.db --study-db study.db --out report/
  llmwatts report --study-db study.db --out report/ --sla-p95-ms 2000   # re-report, no new inputs

Re-ingesting the same files adds nothing twice. Metric definitions: docs/analysis.md.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report",
        help="ingest server/client DBs into a study DB and write tables, plots and an HTML report",
        description="Ingest server and client DBs into one study DB, compute the paper's metrics per run "
        "(words/s, tokens/s, responses/s, W, J/token, J/response, SM and memory utilisation, latency "
        "percentiles), and write runs.csv, runs.md, PNG plots and report.html.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--server-db", action="append", default=[], metavar="PATH",
                        help="a server DB (repeatable)")
    parser.add_argument("--client-db", action="append", default=[], metavar="PATH",
                        help="a client DB written by `llmwatts load` (repeatable)")
    parser.add_argument("--study-db", required=True, metavar="PATH",
                        help="the study DB to create or add to")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the report files")
    parser.add_argument("--sla-p95-ms", type=float, default=None, metavar="MS",
                        help="pick the lowest-J/token run whose client latency p95 is at most MS")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from llmwatts.analysis.ingest import ingest
    from llmwatts.analysis.report import build_report

    if args.sla_p95_ms is not None and not (args.sla_p95_ms > 0 and math.isfinite(args.sla_p95_ms)):
        raise InvalidArgument(f"--sla-p95-ms must be a positive number of ms, got {args.sla_p95_ms:g}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InvalidArgument(f"--out {args.out} is a file; give a folder")
    if not args.server_db and not args.client_db and not Path(args.study_db).exists():
        raise NotFound(f"no study DB at {args.study_db}; give --server-db and --client-db to build one")
    if args.server_db or args.client_db:
        ingest(args.study_db, args.server_db, args.client_db)
    build_report(args.study_db, args.out, sla_p95_ms=args.sla_p95_ms)
    return 0
