"""``llmwatts demo``: the whole pipeline on one machine in a few minutes, on an embedded default.

Starts ``llmwatts serve`` (``tiny`` preset, CPU, simulated GPU) in a subprocess, replays Alpaca and
GSM8K prompts (from ``--data-dir`` / ``LLMWATTS_DATA_DIR``; the embedded mini set, labelled as such,
when those files are absent) at batch sizes 1, 4 and 8 with headless Locust, ingests both databases into
a study DB and prints the paper-style table; report files land in ``--out``. Then, on the simulated GPU, a
small ``llmwatts study`` on a server of its own (2 power caps × the first 2 batch sizes, each cap leased by
the study; docs/study.md) with its own study DB and report in ``--out``/study. Servers always stop.
"""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from llmwatts.errors import InvalidArgument, LlmwattsError, NotFound, Unavailable
from llmwatts.paths import DATA_DIR_ENV

DEMO_BATCH_SIZES = (1, 4, 8)
STUDY_CAPS_W = (250, 175)  # the simulated A100's default cap and 70% of it
STUDY_PLAN = """[study]
name = "demo"
warmup_requests = 0
idle_s = 1
sla_p95_ms = 600000

[[servers]]
target = "{target}"

[load]
dataset = "{dataset}"
requests = {requests}
max_new_tokens = {max_new_tokens}
ignore_eos = true
users = {users}

[grid]
cap_w = [{caps}]
batch_size = [{batch_sizes}]
"""
SERVER_START_TIMEOUT_S = 120


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run server, load and report end to end on CPU (simulated GPU)",
        description="Serve the tiny preset on CPU with a simulated GPU, replay Alpaca and GSM8K prompts at "
                    "batch sizes 1, 4 and 8, and print the energy/latency table; then a small study (2 power caps x "
                    "the first 2 batch sizes) and its report in OUT/study.")
    p.add_argument("--data-dir", help="folder with alpaca_5k.jsonl and gsm8k_test.jsonl, which must exist "
                                      "(default: $LLMWATTS_DATA_DIR, then the cache; else the embedded mini set)")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="folder for DBs and the report")
    p.add_argument("--requests", type=int, default=6, help="requests per run (default 6)")
    p.add_argument("--users", type=int, default=2, help="concurrent Locust users (default 2)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="fixed output length (default 32)")
    study = p.add_argument_group("the same study on other hardware (defaults: the demo)")
    study.add_argument("--model", default="tiny", help="preset or checkpoint (default tiny)")
    study.add_argument("--device", default="cpu", help="server device (default cpu)")
    study.add_argument("--engine", default="auto", help="server engine (default auto)")
    study.add_argument("--power-backend", default="simulated",
                       help="simulated (default) or nvml-readonly for a real GPU")
    study.add_argument("--batch-sizes", default=",".join(map(str, DEMO_BATCH_SIZES)),
                       help="comma-separated prompts per request (default 1,4,8)")
    study.add_argument("--datasets", default="alpaca,gsm8k",
                       help="comma-separated: alpaca, gsm8k, mini (the embedded set; used when neither file is "
                            "found); default alpaca,gsm8k")
    p.set_defaults(func=run)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise InvalidArgument(f"{flag} wants positive integers separated by commas, got {text!r}")
    return values


def _start_server(out: Path, args, control_token: str | None = None) -> tuple[subprocess.Popen, str]:
    port_file = out / "server.port"
    port_file.unlink(missing_ok=True)
    log = open(out / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmwatts.cli", "serve", "--model", args.model, "--device", args.device,
         "--engine", args.engine, "--power-backend", args.power_backend, "--port", "0", "--port-file",
         str(port_file), "--db", str(out / "server.db"), "--log-level", "WARNING"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, **({"LLMWATTS_CONTROL_TOKEN": control_token} if control_token else {})),
    )
    deadline = time.monotonic() + (SERVER_START_TIMEOUT_S if args.model == "tiny" else 900)
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise Unavailable(f"the demo server did not start; see {out / 'server.log'}")
        time.sleep(0.2)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def _stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


DATASET_NAMES = ("alpaca", "gsm8k", "mini")


def _datasets(data_dir: str | None, names: list[str]) -> list[tuple[str, str]]:
    """(dataset, label) pairs: the named sets whose files are found, else the embedded mini set."""
    from llmwatts.loadgen.prompts import load_prompts

    unknown = set(names) - set(DATASET_NAMES)
    if unknown or not names:
        raise InvalidArgument(f"--datasets wants some of {', '.join(DATASET_NAMES)}, comma-separated; got "
                              f"{', '.join(sorted(unknown)) or 'nothing'}")
    found = []
    for name in names:
        if name == "mini":
            found.append(("mini", "mini (embedded)"))
            continue
        try:
            load_prompts(name, num_prompts=8, seed=0, data_dir=data_dir, fetch=False)
            found.append((name, name))
        except NotFound as e:
            print(f"demo: {e}", file=sys.stderr)
    if not found:
        print("demo: using the embedded mini prompt set (written for llmwatts; not Alpaca/GSM8K)", file=sys.stderr)
        found.append(("mini", "mini (embedded)"))
    return found


def _data_dir(explicit: str | None) -> str | None:
    """``--data-dir`` must exist; a missing ``$LLMWATTS_DATA_DIR`` is said, then passed over."""
    if explicit:
        if not Path(explicit).is_dir():
            raise InvalidArgument(f"--data-dir {explicit} is not a folder: point it at the folder holding "
                                  f"alpaca_5k.jsonl and gsm8k_test.jsonl, or leave it out for the embedded mini set")
        return explicit
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env and not Path(from_env).is_dir():
        print(f"demo: ${DATA_DIR_ENV}={from_env} is not a folder; looking in the cache", file=sys.stderr)
        return None
    return from_env or None


def check(args) -> tuple[str | None, list[int], list[tuple[str, str]]]:
    """Every flag checked before the first side effect (no --out folder, no server for rejected input):
    (data dir, batch sizes, (dataset, label) pairs)."""
    from llmwatts.server.config import ServerConfig, check_engine
    from llmwatts.server.gpu import BACKENDS
    from llmwatts.server.models import check_model_spec

    limits = ServerConfig()
    for flag, value in (("--requests", args.requests), ("--users", args.users),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise InvalidArgument(f"{flag} must be at least 1, got {value}")
    if args.max_new_tokens > limits.max_new_tokens_limit:
        raise InvalidArgument(f"--max-new-tokens must be at most the server's limit {limits.max_new_tokens_limit}, "
                              f"got {args.max_new_tokens}")
    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes")
    if max(batch_sizes) > limits.max_batch_size:
        raise InvalidArgument(f"--batch-sizes must be at most the server's {limits.max_batch_size}, got "
                              f"{max(batch_sizes)}")
    if args.out.exists() and not args.out.is_dir():
        raise InvalidArgument(f"--out {args.out} is a file: name a folder")
    check_model_spec(args.model)
    check_engine(args.engine)
    if args.power_backend not in BACKENDS:
        raise InvalidArgument(f"unknown power backend {args.power_backend!r}; choose one of: {', '.join(BACKENDS)}")
    data_dir = _data_dir(args.data_dir)
    datasets = _datasets(data_dir, [d.strip() for d in args.datasets.split(",") if d.strip()])
    return data_dir, batch_sizes, datasets


def _study(folder: Path, args, dataset: str, batch_sizes: list[int], data_dir: str | None) -> None:
    """A small ``llmwatts study`` (its own process: the study's CLI and one-line errors) on a server of its
    own (a control token, for the caps; no runs of the demo's sweep in its records): 2 caps × up to 2 batch
    sizes, its server DB, study DB and report.html in ``folder``."""
    shutil.rmtree(folder, ignore_errors=True)  # a study DB is resumable: a stale one would skip every cell
    folder.mkdir(parents=True)
    control_token = secrets.token_urlsafe(16)
    proc, target = _start_server(folder, args, control_token)
    try:
        _run_study(folder, target, control_token, args, dataset, batch_sizes, data_dir)
    finally:
        _stop_server(proc)


def _run_study(folder: Path, target: str, control_token: str, args, dataset: str, batch_sizes: list[int],
               data_dir: str | None) -> None:
    plan = folder / "plan.toml"
    plan.write_text(STUDY_PLAN.format(target=target, dataset=dataset, requests=args.requests,
                                      max_new_tokens=args.max_new_tokens, users=args.users,
                                      caps=", ".join(map(str, STUDY_CAPS_W)),
                                      batch_sizes=", ".join(map(str, batch_sizes))))
    print(f"demo: study {plan} ({len(STUDY_CAPS_W)} caps x {len(batch_sizes)} batch sizes)", flush=True)
    argv = [sys.executable, "-m", "llmwatts.cli", "study", str(plan), "--study-db", str(folder / "study.db"),
            "--out", str(folder), "--no-progress"] + (["--data-dir", data_dir] if data_dir else [])
    done = subprocess.run(argv, env=dict(os.environ, LLMWATTS_CONTROL_TOKEN=control_token))
    if done.returncode != 0 or not (folder / "report.html").exists():
        raise LlmwattsError(f"the demo's study failed (exit {done.returncode}); see above and {folder}")


def _report(out: Path):
    from llmwatts.analysis.ingest import ingest
    from llmwatts.analysis.report import build_report

    ingest(out / "study.db", server_dbs=[out / "server.db"], client_dbs=[out / "client.db"])
    report = build_report(out / "study.db", out)
    bad = [r for r in report.reconciliations if not r.consistent]
    if bad:
        raise LlmwattsError(f"reconciliation failed for {[r.run_id for r in bad]}: see {report.report_html}")
    return report


def run(args) -> int:
    started = time.monotonic()
    data_dir, batch_sizes, datasets = check(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("server.db", "client.db", "study.db"):
        for suffix in ("", "-wal", "-shm"):
            (out / (stale + suffix)).unlink(missing_ok=True)
    # Locust monkey-patches this process for gevent; the server runs in its own process.
    from llmwatts.loadgen.config import LoadConfig
    from llmwatts.loadgen.runner import run_load

    proc, target = _start_server(out, args)
    try:
        for dataset, label in datasets:
            for batch_size in batch_sizes:
                result = run_load(LoadConfig(
                    target=target, dataset=dataset, data_dir=data_dir, batch_size=batch_size, users=args.users,
                    requests=args.requests, max_new_tokens=args.max_new_tokens, ignore_eos=True,
                    run_id=f"{args.model}-{dataset}-bs{batch_size}", client_db=str(out / "client.db"), quiet=True,
                    labels={"dataset": label, "batch_size": str(batch_size), "model": args.model},
                ))
                print(f"demo: {label:>16} batch {batch_size}: {result.requests_ok} ok, {result.requests_failed} failed")
                if result.requests_failed:
                    raise LlmwattsError(f"{result.requests_failed} requests failed in the demo; see {out / 'server.log'}")
    finally:
        _stop_server(proc)
    report = _report(out)
    if args.power_backend == "simulated":
        _study(out / "study", args, datasets[0][0], batch_sizes[:2], data_dir)
    else:
        print("demo: the cap study runs on the simulated GPU only (it sets power caps); skipped")
    study = out / "study" / "report.html"
    print(f"demo: done in {time.monotonic() - started:.0f} s; report: {report.report_html}"
          + (f"; study report: {study}" if args.power_backend == "simulated" else ""))
    return 0
