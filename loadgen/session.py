"""Per-environment run state and the Locust event wiring shared by ``locust -f`` and ``run_load``.

Roles (from the runner): ``local`` does everything in one process; a ``master`` marks the run on the
server, hands out request numbers and writes the client DB; a ``worker`` runs users and ships its rows
to the master. Request numbers ("permits") come from one counter — the local session or the master — so
``--requests N`` is exact over any number of workers and request ``k`` always carries the same prompts.
The run's markers on the server (BeginRun/EndRun, the clock offset): ``run_markers.RunMarkers``.
"""

from __future__ import annotations

import itertools
import logging
import socket
from pathlib import Path

import gevent
import gevent.event
from locust.runners import MasterRunner, WorkerRunner

from llmwatts.errors import LlmwattsError
from llmwatts.loadgen import records
from llmwatts.loadgen.arrivals import ArrivalSchedule
from llmwatts.loadgen.config import LoadConfig
from llmwatts.loadgen.grpc_user import ChannelOptions, normalise_target
from llmwatts.loadgen.prompts import PromptSet, dataset_label, load_prompts
from llmwatts.loadgen.run_markers import RunMarkers

log = logging.getLogger("llmwatts.loadgen")

MSG_PERMIT = "llmwatts_permit"          # worker → master {"ticket"}
MSG_PERMIT_REPLY = "llmwatts_grant"     # master → worker {"ticket", "seq"|None}
MSG_ROWS = "llmwatts_rows"              # worker → master [row, ...]
MSG_FINAL = "llmwatts_final"            # worker → master {"shipped": n} after its last rows of a test
MSG_ERROR = "llmwatts_error"            # worker → master {"error"}: it cannot run (e.g. no prompt file)
FLUSH_INTERVAL_S = 0.5
PERMIT_WAIT_S = 60.0


class LoadSession(RunMarkers):
    """State of one Locust environment across its tests. Users read ``environment.llmwatts``."""

    def __init__(self, environment, local_config: LoadConfig | None = None, token: str | None = None):
        self.environment = environment
        self.runner = environment.runner
        if isinstance(self.runner, MasterRunner):
            self.role = "master"
        elif isinstance(self.runner, WorkerRunner):
            self.role = "worker"
        else:
            self.role = "local"
        # A worker's own --data-dir (its files may live elsewhere than the master's).
        self.local_data_dir = local_config.data_dir if local_config else None
        self.secret_file = local_config.run_secret_file if local_config else None  # run_secret.py
        self.token = token
        self.config: LoadConfig | None = None
        self.prompts: PromptSet | None = None
        self.run_id: str | None = None
        self.run_secret = ""                    # BeginRun's answer: the run's requests and EndRun carry it
        self.dataset = ""
        self.worker_name = self.runner.client_id if self.role == "worker" else socket.gethostname()
        self.db = None
        self.recorder: records.RequestRecorder | None = None
        self.clock_offset_ns: int | None = None
        self.schedule: ArrivalSchedule | None = None   # open loop: this node's arrivals
        self.finished = gevent.event.Event()    # set when --requests N rows are all in
        self.exhausted = False                  # no more permits for this test
        self._issued = 0                        # permits handed out (local/master)
        self._completed = 0                     # rows in (local/master)
        self._shipped = 0                       # rows sent (worker)
        self._finals: dict[str, int] = {}       # master: worker id → rows it says it shipped
        self._rows_from: dict[str, int] = {}    # master: worker id → rows received
        self._tickets = itertools.count()
        self._waiting: dict[int, gevent.event.AsyncResult] = {}
        self._late: list[int] = []              # worker: numbers granted after their user stopped waiting
        self._first_ticket = 0                  # worker: tickets below this belong to an earlier test
        self._flusher = None
        self._explicit_run_id = None
        self._begun = False                     # our BeginRun was accepted: EndRun is ours to send
        self._prompt_key = None
        self.stop_on_finish = True
        self._last_error: str | None = None
        self.errors: list[str] = []             # setup errors (a worker's arrive at the master)
        self.error_type: type[LlmwattsError] = LlmwattsError  # what run_load raises for them
        self.log_errors = True                  # locust -f: the log is where errors show; run_load raises them

        events = environment.events
        events.test_start.add_listener(self.on_test_start)
        events.test_stop.add_listener(self.on_test_stop)
        if self.role == "master":
            self.runner.register_message(MSG_PERMIT, self._on_permit_request)
            self.runner.register_message(MSG_ROWS, self._on_rows)
            self.runner.register_message(MSG_FINAL, self._on_final)
            self.runner.register_message(MSG_ERROR, self._on_error)
        elif self.role == "worker":
            self.runner.register_message(MSG_PERMIT_REPLY, self._on_permit_reply)

    # --- test lifecycle ---------------------------------------------------------------------------

    def on_test_start(self, environment, **_kw):
        options = environment.parsed_options
        try:
            config = LoadConfig.from_options(options, host=environment.host) if options is not None else LoadConfig()
        except LlmwattsError as e:  # e.g. a number field of the web UI's form that is not a number
            self.config, self.recorder, self.schedule = LoadConfig(), None, None
            self.errors.clear()
            self._fail(str(e))  # users idle, the run stops, the log says why
            return
        if self._explicit_run_id is None:
            self._explicit_run_id = config.run_id or ""
        if self.role != "worker" and not self._explicit_run_id:
            # A fresh id per test (web UI restarts); workers receive it with the spawn message.
            config.run_id = None
            config.resolved_run_id()
            if options is not None:
                options.llm_run_id = config.run_id
        if self.role == "master" and options is not None:
            # The spawn message carries the options to the workers: each sends rate / workers.
            options.llm_rate_split = max(1, self.runner.worker_count)
        self.config = config
        self.run_id = config.resolved_run_id()
        self.schedule = self._arrival_schedule(options)
        self.run_secret = getattr(options, "llm_run_secret", None) or "" if self.role == "worker" else ""
        self.dataset = dataset_label(config.dataset, split=config.split, jsonl_path=config.jsonl_path,
                                     field=config.field)
        self.finished.clear()
        self._issued = self._completed = self._shipped = 0
        self._new_test_permits()
        self._finals.clear()
        self._rows_from.clear()
        self.errors.clear()
        self.error_type = LlmwattsError
        if self.role != "master":
            try:
                self._load_prompts()
            except LlmwattsError as e:
                self._fail(str(e))
        if self.role == "worker":
            self.recorder = records.RequestRecorder(self._ship_rows, flush_rows=64)
            self._measure_clock_offset()  # this machine's clock, not the master's
        else:
            self.db = records.open_client_db(config.resolved_client_db())
            self.recorder = records.RequestRecorder(records.db_sink(self.db))
            self._mark_begin()
        if self._flusher is None:
            self._flusher = gevent.spawn(self._flush_loop)

    def on_test_stop(self, environment, **_kw):
        if self.recorder is None:
            return
        self._safe_flush()
        if self.role == "worker":
            # Locust's worker sleeps stop_timeout after a stop before it reads the next message (quit): the
            # grace period is over once the users have stopped, which they have (the next spawn sets it anew).
            environment.stop_timeout = 0.0
            try:
                self.runner.send_message(MSG_FINAL, {"run_id": self.run_id, "shipped": self._shipped})
            except Exception as e:  # the master may be gone already
                log.warning("could not tell the master this worker's row count: %s", e)
            return
        self._mark_end()

    def close(self):
        """Stop the flusher and write what is left (library use, after the runner has quit)."""
        if self._flusher is not None:
            self._flusher.kill()
            self._flusher = None
        self._safe_flush()

    # --- what users call --------------------------------------------------------------------------

    def channel_options(self, host: str) -> ChannelOptions:
        c = self.config
        return ChannelOptions(target=normalise_target(host), ca=c.ca, cert=c.cert, key=c.key, token=self.token)

    def _new_test_permits(self) -> None:
        self.exhausted = False
        self._late.clear()
        self._first_ticket = next(self._tickets)  # a grant still in flight from the last test is not ours

    def take_permit(self) -> int | None:
        """The number of this user's next request, or None when the run's ``--requests`` are used up."""
        if self._late:  # granted to a user that gave up waiting: the master counts on this request
            return self._late.pop(0)
        if self.exhausted:
            return None
        if self.role == "worker":
            ticket = next(self._tickets)
            waiter = self._waiting[ticket] = gevent.event.AsyncResult()
            try:
                self.runner.send_message(MSG_PERMIT, {"ticket": ticket})
                seq = waiter.get(timeout=PERMIT_WAIT_S)
            except gevent.Timeout:
                log.warning("no request number from the master within %.0f s", PERMIT_WAIT_S)
                return None
            finally:
                self._waiting.pop(ticket, None)
        else:
            seq = self._grant()
        if seq is None:
            self.exhausted = True
        return seq

    def stop_sending(self) -> None:
        """The run's deadline: no new request starts (on a master, no worker gets another number); those in
        flight finish within the grace period (Locust's ``stop_timeout``)."""
        self.exhausted = True

    def record(self, request: records.ClientRequest, chunks: list[records.ClientChunk] = ()) -> None:
        """One finished (or failed) request and, with ``--record-chunks``, its chunks' arrival times."""
        row = records.wire_row(request, chunks if self.config.record_chunks else ())
        try:
            self.recorder.add(row)  # a failing sink keeps the row buffered and raises...
        finally:
            if self.role == "local":  # ...but the request is done: --requests N must still end the run
                self._count_done(1)

    # --- permits and rows across nodes -----------------------------------------------------------

    def _grant(self) -> int | None:
        if self.exhausted:
            return None
        limit = self.config.requests if self.config else None
        if limit is not None and self._issued >= limit:
            return None
        seq = self._issued
        self._issued += 1
        return seq

    def _on_permit_request(self, environment, msg, **_kw):
        seq = self._grant() if self.config is not None else None
        self.runner.send_message(MSG_PERMIT_REPLY, {"ticket": msg.data["ticket"], "seq": seq}, client_id=msg.node_id)

    def _on_permit_reply(self, environment, msg, **_kw):
        waiter = self._waiting.get(msg.data["ticket"])
        if waiter is not None:
            waiter.set(msg.data["seq"])
        elif msg.data["seq"] is not None and msg.data["ticket"] >= self._first_ticket:
            # Its user stopped waiting (PERMIT_WAIT_S) before the grant came. The master has counted the
            # number: keep it for this worker's next request, or --requests N would end only by --run-time.
            self._late.append(msg.data["seq"])

    def _ship_rows(self, rows: list[dict]) -> None:
        self.runner.send_message(MSG_ROWS, rows)
        self._shipped += len(rows)

    def _on_rows(self, environment, msg, **_kw):
        rows = msg.data
        self._rows_from[msg.node_id] = self._rows_from.get(msg.node_id, 0) + len(rows)
        if self.recorder is None:  # rows after the master already closed: keep them anyway
            log.error("dropping %d rows from %s: no test running on the master", len(rows), msg.node_id)
            return
        try:
            self.recorder.add_many(rows)
        finally:
            self._count_done(len(rows))

    def _on_final(self, environment, msg, **_kw):
        self._finals[msg.node_id] = msg.data["shipped"]

    def _fail(self, error: str, kind: type[LlmwattsError] = LlmwattsError) -> None:
        """This node cannot run the test: users idle, the run stops, ``errors`` says why (once: the same
        error from many users is one), and Locust's process exits non-zero."""
        if error in self.errors:
            return
        if self.log_errors:
            log.error("%s", error)
        self.errors.append(error)
        self.error_type = kind if len(self.errors) == 1 else LlmwattsError
        self.exhausted = True
        self.environment.process_exit_code = 1
        if self.role == "worker":
            self.runner.send_message(MSG_ERROR, {"error": error})
        else:
            self._finish()

    def _on_error(self, environment, msg, **_kw):
        self._fail(f"worker {msg.node_id}: {msg.data['error']}")

    def workers_settled(self) -> bool:
        """Master: every worker that sent rows has reported its final count, and all of them arrived."""
        return all(self._finals.get(w) == n for w, n in self._rows_from.items())

    def _count_done(self, n: int) -> None:
        self._completed += n
        limit = self.config.requests if self.config else None
        if limit is not None and self._completed >= limit:
            self._finish()

    def _finish(self):
        if not self.finished.is_set():
            self.finished.set()
            if self.stop_on_finish:
                gevent.spawn(self._stop_runner)

    def _stop_runner(self):
        options = self.environment.parsed_options
        if options is not None and getattr(options, "headless", False):
            self.runner.quit()
        else:
            self.runner.stop()

    def _flush_loop(self):
        while True:
            gevent.sleep(FLUSH_INTERVAL_S)
            self._safe_flush()

    def _safe_flush(self):
        if self.recorder is None:
            return
        try:
            self.recorder.flush()
        except Exception as e:  # keep the rows buffered; say why once
            if str(e) != self._last_error:
                log.error("could not write client rows (will retry): %s", e)
                self._last_error = str(e)

    # --- prompts -----------------------------------------------------------------------------------

    def _load_prompts(self):
        c = self.config
        key = (c.dataset, c.jsonl_path, c.field, c.split, c.data_dir, self.local_data_dir, c.num_prompts, c.seed)
        if key != self._prompt_key:
            self.prompts = load_prompts(
                c.dataset, num_prompts=c.num_prompts, seed=c.seed, data_dir=c.data_dir,
                extra_dirs=[Path(self.local_data_dir)] if self.local_data_dir else None, split=c.split,
                jsonl_path=c.jsonl_path, field=c.field,
            )
            self._prompt_key = key

    def _arrival_schedule(self, options) -> ArrivalSchedule | None:
        c = self.config
        if c.rate_rps is None or self.role == "master":
            return None
        split = int(getattr(options, "llm_rate_split", 1) or 1) if self.role == "worker" else 1
        node = self.runner.worker_index + 1 if self.role == "worker" else 0
        return ArrivalSchedule(c.rate_rps / split, c.arrival, c.burstiness, seed=c.seed, node=node)


def install(environment, local_config: LoadConfig | None = None, token: str | None = None) -> LoadSession:
    """Attach a ``LoadSession`` to an environment whose runner exists (Locust's ``init`` event time)."""
    existing = getattr(environment, "llmwatts", None)
    if existing is not None:
        return existing
    session = LoadSession(environment, local_config=local_config, token=token)
    environment.llmwatts = session
    return session
