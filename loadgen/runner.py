"""``run_load``: a headless Locust run as a library (local, or one node of a distributed run).

Importing this module imports Locust, which monkey-patches the process for gevent. ``run_load`` may be
called repeatedly in one process for local runs (each call builds a fresh Environment and event hooks);
run each distributed master or worker in its own process (its ZeroMQ socket and runner greenlets are
per process). Do not host ``llmwatts serve`` in a process that imports this module.
"""

from __future__ import annotations

import logging
import time

import gevent
import grpc
from locust import argument_parser
from locust.env import Environment
from locust.event import Events

from llmwatts.errors import FailedPrecondition, InvalidArgument, Unauthenticated, Unavailable
from llmwatts.loadgen.config import LoadConfig
from llmwatts.client import inference_token
from llmwatts.credentials import inference_token_refused
from llmwatts.loadgen.grpc_user import ChannelOptions, call_metadata, make_channel
from llmwatts.loadgen.locustfile import InferenceUser
from llmwatts.loadgen.prompts import load_prompts
from llmwatts.loadgen.clock import server_clock_offset_ns
from llmwatts.loadgen.session import LoadSession, install
from llmwatts.loadgen.summary import LoadResult, parse_slo, summarise
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
    token = config.token or inference_token()  # --inference-token-file's env, else the token's
    if config.quiet:
        logging.getLogger("locust").setLevel(logging.ERROR)
    if config.worker:
        return _run_worker(config, token)

    config.resolved_run_id()
    info = preflight(config, token)
    if not config.master:  # a master's prompt files may live only on its workers
        load_prompts(config.dataset, num_prompts=config.num_prompts, seed=config.seed, data_dir=config.data_dir,
                     split=config.split, jsonl_path=config.jsonl_path, field=config.field)
    # stop_timeout: at --run-time's deadline, calls in flight get grace_s to finish (Locust stops users
    # that are waiting at once, and lets a user that is in its task finish it).
    env = Environment(user_classes=[InferenceUser], events=Events(), host=config.target,
                      parsed_options=_options(config), stop_timeout=config.grace_s)
    if config.master:
        runner = env.create_master_runner(master_bind_host=config.master_bind_host,
                                          master_bind_port=config.master_port)
    else:
        runner = env.create_local_runner()
    session = install(env, local_config=config, token=token)
    session.stop_on_finish = False  # we stop the runner ourselves, below
    session.log_errors = False      # raised below, as one line
    try:
        if config.master:
            _wait_for_workers(runner, config)
        runner.start(config.concurrency(), spawn_rate=config.spawn_rate or config.concurrency())
        session.finished.wait(timeout=config.run_time_s)
        session.stop_sending()
        runner.stop()  # returns once the users have stopped; its test_stop calls EndRun after the last reply
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
        raise session.error_type("; ".join(session.errors))
    result = summarise(config.resolved_client_db(), session.run_id, role=session.role, slo=parse_slo(config.slo),
                       rate_rps=config.rate_rps)
    result.power_source = info.power_source or None
    return result


def preflight(config: LoadConfig, token: str | None):
    """Fail fast, in one line, when the server is unreachable or would refuse the run's settings -> its
    ``ServerInfo``."""
    channel = make_channel(ChannelOptions(target=config.target, ca=config.ca, cert=config.cert, key=config.key))
    try:
        info, _ = server_clock_offset_ns(pb_grpc.ControlStub(channel), call_metadata(token), PREFLIGHT_DEADLINE_S)
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else None
        if code == grpc.StatusCode.UNAUTHENTICATED:
            raise Unauthenticated(inference_token_refused(config.target, token)) from e
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
    return info


def _options(config: LoadConfig):
    """Locust's parsed options for a library run: Locust defaults, our ``llm_*`` values, headless."""
    parser = argument_parser.get_empty_argument_parser(add_help=False, default_config_files=[])
    argument_parser.setup_parser_arguments(parser)
    options = parser.parse_args(args=[])
    vars(options).update(config.to_options())
    options.headless = True
    options.host = config.target
    options.num_users = config.concurrency()
    options.spawn_rate = config.spawn_rate or config.concurrency()
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
    env = Environment(user_classes=[InferenceUser], events=Events(), stop_timeout=config.grace_s)
    try:
        runner = env.create_worker_runner(master_host=config.master_host, master_port=config.master_port)
    except ConnectionError as e:
        raise Unavailable(f"cannot reach the master at {config.master_host}:{config.master_port}") from e
    session: LoadSession = install(env, local_config=config, token=token)
    session.stop_on_finish = False  # the master stops workers
    session.log_errors = False      # the master is told; raised below, as one line
    try:
        runner.greenlet.join()
    except ConnectionError as e:
        raise Unavailable(f"cannot reach the master at {config.master_host}:{config.master_port}") from e
    finally:
        session.close()
    if session.errors:
        raise session.error_type("; ".join(session.errors))
    return LoadResult(run_id=session.run_id or "", client_db=None, role="worker",
                      requests_ok=session._shipped)
