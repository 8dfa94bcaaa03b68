"""``run_load``: a headless Locust run as a library (local, or one node of a distributed run).

Importing this module imports Locust, which monkey-patches the process for gevent. ``run_load`` may be
called repeatedly in one process for local runs (each call builds a fresh Environment and event hooks);
run each distributed master or worker in its own process (its ZeroMQ socket and runner greenlets are
per process). Do not host ``llmwatts serve`` in a process that imports this module.
"""

from __future__ import annotations

import logging
import math
import os
import time

import gevent
import grpc
from locust import argument_parser
from locust.env import Environment
from locust.event import Events

from llmwatts.errors import FailedPrecondition, InvalidArgument, LlmwattsError, Unauthenticated, Unavailable
from llmwatts.loadgen import records
from llmwatts.loadgen.config import LoadConfig, LoadResult
from llmwatts.loadgen.grpc_user import INFERENCE_TOKEN_ENV, ChannelOptions, call_metadata, make_channel
from llmwatts.loadgen.locustfile import InferenceUser
from llmwatts.loadgen.prompts import load_prompts
from llmwatts.loadgen.session import LoadSession, install, server_clock_offset_ns
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

log = logging.getLogger("llmwatts.loadgen")

PREFLIGHT_DEADLINE_S = 5.0
WORKER_WAIT_S = 60.0     # master: how long to wait for --expect-workers to connect
SETTLE_WAIT_S = 15.0     # master: how long to wait for workers' last rows after stop


def run_load(config: LoadConfig) -> LoadResult:
    """Run one load test as ``config`` says and return its summary (from the exact client rows).

    Raises ``Unavailable`` when the server (or master) cannot be reached, ``NotFound`` when a prompt
    file is missing, ``InvalidArgument`` for a config the server would refuse.
    """
    config.validate()
    token = config.token or os.environ.get(INFERENCE_TOKEN_ENV)
    if config.quiet:
        logging.getLogger("locust").setLevel(logging.ERROR)
    if config.worker:
        return _run_worker(config, token)

    config.resolved_run_id()
    preflight(config, token)
    if not config.master:  # a master's prompt files may live only on its workers
        load_prompts(config.dataset, num_prompts=config.num_prompts, seed=config.seed, data_dir=config.data_dir,
                     split=config.split, jsonl_path=config.jsonl_path, field=config.field)
    env = Environment(user_classes=[InferenceUser], events=Events(), host=config.target,
                      parsed_options=_options(config), stop_timeout=0.0)
    if config.master:
        runner = env.create_master_runner(master_bind_host=config.master_bind_host,
                                          master_bind_port=config.master_port)
    else:
        runner = env.create_local_runner()
    session = install(env, local_config=config, token=token)
    session.stop_on_finish = False  # we stop the runner ourselves, below
    try:
        if config.master:
            _wait_for_workers(runner, config)
        runner.start(config.users, spawn_rate=config.spawn_rate or config.users)
        session.finished.wait(timeout=config.run_time_s)
        runner.stop()
        if config.master:
            deadline = time.monotonic() + SETTLE_WAIT_S
            while not session.workers_settled() and time.monotonic() < deadline:
                gevent.sleep(0.1)
            if not session.workers_settled():
                log.error("some workers did not confirm their last rows; the client DB may miss requests")
    finally:
        runner.quit()
        session.close()
        if session.db is not None:
            session.db.close()
    if session.errors:
        raise LlmwattsError("; ".join(session.errors))
    return summarise(config.resolved_client_db(), session.run_id, role=session.role)


def preflight(config: LoadConfig, token: str | None) -> None:
    """Fail fast, in one line, when the server is unreachable or would refuse the run's settings."""
    channel = make_channel(ChannelOptions(target=config.target, ca=config.ca, cert=config.cert, key=config.key))
    try:
        info, _ = server_clock_offset_ns(pb_grpc.ControlStub(channel), call_metadata(token), PREFLIGHT_DEADLINE_S)
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else None
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise Unauthenticated(f"{config.target} refused the call: set {INFERENCE_TOKEN_ENV}") from e
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise Unavailable(f"cannot reach {config.target}: is `llmwatts serve` running?") from e
        raise FailedPrecondition(f"{config.target}: GetServerInfo failed: {code.name if code else e}") from e
    finally:
        channel.close()
    if info.max_batch_size and config.batch_size > info.max_batch_size:
        raise InvalidArgument(f"--batch-size {config.batch_size} exceeds the server's max_batch_size "
                              f"{info.max_batch_size}")
    limit = info.max_new_tokens_limit
    if limit and config.max_new_tokens and config.max_new_tokens > limit:
        raise InvalidArgument(f"--max-new-tokens {config.max_new_tokens} exceeds the server's limit {limit}")


def _options(config: LoadConfig):
    """Locust's parsed options for a library run: Locust defaults, our ``llm_*`` values, headless."""
    parser = argument_parser.get_empty_argument_parser(add_help=False, default_config_files=[])
    argument_parser.setup_parser_arguments(parser)
    options = parser.parse_args(args=[])
    vars(options).update(config.to_options())
    options.headless = True
    options.host = config.target
    options.num_users = config.users
    options.spawn_rate = config.spawn_rate or config.users
    options.expect_workers = config.expect_workers
    return options


def _wait_for_workers(runner, config: LoadConfig) -> None:
    deadline = time.monotonic() + WORKER_WAIT_S
    while runner.worker_count < config.expect_workers:
        if time.monotonic() > deadline:
            raise Unavailable(
                f"only {runner.worker_count} of {config.expect_workers} workers connected to port "
                f"{config.master_port} within {WORKER_WAIT_S:.0f} s: start them with "
                f"`llmwatts load --worker --master-host THIS_HOST`")
        gevent.sleep(0.1)


def _run_worker(config: LoadConfig, token: str | None) -> LoadResult:
    env = Environment(user_classes=[InferenceUser], events=Events(), stop_timeout=0.0)
    try:
        runner = env.create_worker_runner(master_host=config.master_host, master_port=config.master_port)
    except ConnectionError as e:
        raise Unavailable(f"cannot reach the master at {config.master_host}:{config.master_port}") from e
    session: LoadSession = install(env, local_config=config, token=token)
    session.stop_on_finish = False  # the master stops workers
    try:
        runner.greenlet.join()
    except ConnectionError as e:
        raise Unavailable(f"cannot reach the master at {config.master_host}:{config.master_port}") from e
    finally:
        session.close()
    return LoadResult(run_id=session.run_id or "", client_db=None, role="worker",
                      requests_ok=session._shipped)


def _percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of exact values (no binning)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarise(client_db: str, run_id: str, role: str = "local") -> LoadResult:
    """A run's ``LoadResult`` from its rows in the client DB."""
    db = records.open_client_db(client_db)
    try:
        rows = list(db.query(
            "select status, client_send_ns, done_ns, latency_ms, ttft_ms, output_tokens "
            "from client_requests where run_id = ?", [run_id]))
        run = next(db.query("select clock_offset_ns from client_runs where run_id = ?", [run_id]), {})
    finally:
        db.close()
    ok = [r for r in rows if r["status"] == "ok"]
    failures: dict[str, int] = {}
    for r in rows:
        if r["status"] != "ok":
            failures[r["status"]] = failures.get(r["status"], 0) + 1
    sends = [r["client_send_ns"] for r in rows if r["client_send_ns"] is not None]
    dones = [r["done_ns"] for r in rows if r["done_ns"] is not None]
    duration_s = (max(dones) - min(sends)) / 1e9 if sends and dones else 0.0
    latencies = sorted(r["latency_ms"] for r in ok)
    ttfts = sorted(r["ttft_ms"] for r in ok if r["ttft_ms"] is not None)
    return LoadResult(
        run_id=run_id, client_db=str(client_db), role=role,
        requests_ok=len(ok), requests_failed=len(rows) - len(ok),
        duration_s=duration_s, rps=len(rows) / duration_s if duration_s > 0 else 0.0,
        latency_p50_ms=_percentile(latencies, 50), latency_p95_ms=_percentile(latencies, 95),
        ttft_p50_ms=_percentile(ttfts, 50), output_tokens=sum(r["output_tokens"] or 0 for r in ok),
        clock_offset_ns=run.get("clock_offset_ns"), failures=failures,
    )
