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
  llmwatts report --server gpu1:50051 --client-db client.db --study-db study.db --out report/
      # records pulled over gRPC (Control.ExportRecords, needs $LLMWATTS_CONTROL_TOKEN); no file copied

Re-ingesting the same files adds nothing twice. Metric definitions: docs/analysis.md.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report",
        help="ingest server/client DBs into a study DB and write tables and an HTML report with its plots",
        description="Ingest server and client DBs into one study DB, compute the paper's metrics per run "
        "(words/s, tokens/s, responses/s, W, J/token, J/response, SM and memory utilisation, latency "
        "percentiles), and write runs.csv, runs.md and report.html (plots inside).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--server-db", action="append", default=[], metavar="PATH",
                        help="a server DB (repeatable)")
    parser.add_argument("--server", action="append", default=[], metavar="HOST:PORT",
                        help="pull a running server's records over gRPC (repeatable; incremental: a mirror "
                        "DB per server is kept next to --study-db); needs the control token")
    parser.add_argument("--ca", metavar="PEM", help="TLS: the CA of the servers' certificates")
    parser.add_argument("--cert", metavar="PEM", help="mutual TLS: client certificate")
    parser.add_argument("--key", metavar="PEM", help="mutual TLS: client key")
    parser.add_argument("--client-db", action="append", default=[], metavar="PATH",
                        help="a client DB written by `llmwatts load` (repeatable)")
    parser.add_argument("--study-db", required=True, metavar="PATH",
                        help="the study DB to create or add to")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the report files")
    parser.add_argument("--sla-p95-ms", type=float, default=None, metavar="MS",
                        help="pick the lowest-J/token run whose client latency p95 is at most MS")
    parser.add_argument("--slo", default=None, metavar="KEY=MS,...",
                        help="latency objectives for goodput and J per good token, e.g. ttft_ms=500,tpot_ms=50,"
                        "e2e_ms=5000 (default: each run's own `llmwatts load --slo`)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from llmwatts.analysis.ingest import ingest
    from llmwatts.analysis.report import build_report
    from llmwatts.analysis.slo import parse_slo

    slo = parse_slo(args.slo)
    if args.sla_p95_ms is not None and not (args.sla_p95_ms > 0 and math.isfinite(args.sla_p95_ms)):
        raise InvalidArgument(f"--sla-p95-ms must be a positive number of ms, got {args.sla_p95_ms:g}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InvalidArgument(f"--out {args.out} is a file; give a folder")
    if not (args.server_db or args.server or args.client_db) and not Path(args.study_db).exists():
        raise NotFound(f"no study DB at {args.study_db}; give --server-db (or --server) and --client-db to build one")
    server_dbs = list(args.server_db)
    if args.server:
        from llmwatts.analysis.pull import mirror_path, pull_records
        from llmwatts.client import control_token, parse_target

        token = control_token()
        for target in args.server:
            target = parse_target(target, flag="--server")
            mirror = mirror_path(args.study_db, target)
            pull_records(target, mirror, token=token, ca=args.ca, cert=args.cert, key=args.key)
            server_dbs.append(str(mirror))
    if server_dbs or args.client_db:
        ingest(args.study_db, server_dbs, args.client_db)
    build_report(args.study_db, args.out, sla_p95_ms=args.sla_p95_ms, slo=slo)
    return 0
