"""Continuous batching in the server (``llmwatts serve --continuous``): requests join a running batch
between decode steps and leave it the step they end, instead of waiting for the batch in flight.

The engine side is ``engine.ContinuousSession`` (server/engine/session.py). Here: admission and energy.

Admission is first come, first served: the request at the head of the queue joins as soon as the session
has a free row for each of its prompts; while it waits, nothing behind it jumps the queue. Every request
that can join at that point joins in the same prefill. A prefill stalls every live row (on an H200 with
llama-7b a join of one or two short prompts took 11 ms as a captured graph, 19-31 ms eager, and a round
of 8 rows ~37 ms: several decode steps), so a running session waits for
``--continuous-join-rows`` free rows and as many rows' worth of waiting requests (by default an eighth of
``--max-batch-size``), or for its oldest waiting request to have waited ``--batch-wait-ms``, before a
round. A session holds one run (``run_id``), one sampling setting and one cache length
(``--continuous-slots``, by default the first request's prompt + ``max_new_tokens``); a request that
differs waits until the session drains, and a new session opens for it. (One run per session keeps a
run's energy its own: a segment never holds two runs' requests.)

Energy: a *segment* is a busy period, from the first request joining an idle session until the session is
idle again; it is the ``batches`` row of its requests (``batch_id``). Inside it, the energy counters are
read off the decode path, by a meter thread, whenever a request has joined or ended (at most every
``MIN_READ_GAP_S`` on real GPUs) and at least every ``SETTLE_EVERY_S``. The joules between two reads are
split over the requests by the tokens each processed in that interval (prompt tokens at its join, one per
live sequence per step): the same rule as a static batch (docs/energy.md), applied per interval, so a
request pays for the steps it shared and not for the ones before it joined or after it left. A request's
response waits for the first read after its last token (docs/performance.md measures what that adds).
The segment's ``batches`` row, its ``batch_gpu_energy`` rows and its requests' rows are upserted at every
read, so the sums agree whenever the DB is read. The segment's ledger and rows: segment.py.
"""

import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass

from llmwatts.errors import EngineError, Unavailable
from llmwatts.server.batcher import MAX_CONSECUTIVE_FAILURES, Batcher
from llmwatts.server.engine import BatchSpec
from llmwatts.server.segment import Joined, Segment
from llmwatts.server.work import Done, Failed, Work

log = logging.getLogger(__name__)

SETTLE_EVERY_S = 1.0  # the segment's rows in the DB are at most this old while it runs
# Reads of real GPUs at most this often (an H100's energy counter read costs ~4 ms, on the meter thread).
# The counter itself moves every ~100 ms, at a phase nobody knows, so any read is up to ~100 ms stale
# whatever the gap: intervals take counter deltas as they are (a lump lands in the interval that sees
# it; the deltas add up to the exact total), and a short gap only answers requests sooner.
MIN_READ_GAP_S = 0.02
# Default join round: a running batch waits for max_batch_size / JOIN_FRACTION free rows. On an H200 with
# llama-7b, offline Alpaca requests, eager joins: rounds of 8 rows at batch 64 ran 1.44x the tokens/s of
# joining at once and rounds of 32 1.22x; at batch 256, 8 and 32 rows 1.14x and 1.12x. With graphed joins
# (their second design) rounds of 8 still ran 1.11x (batch 64) and 1.02x (batch 256) of joining at once
# (docs/performance.md).
JOIN_FRACTION = 8


class MeterFailed(Unavailable):
    """The meter thread could not read or record the energy: the server stops serving (no unmetered work)."""


@dataclass
class LoopStats:
    """Where the batcher thread's wall time went while its session was busy (benchmarks read it, and a
    closed segment logs it). A step launches the next decode step and waits for the one before it, so
    ``step_s`` is mostly the GPU's time; ``between_s`` (the rest, joins aside) is the host's: admission,
    accounting and anything else holding the interpreter lock. While ``between_s`` per step stays under
    the GPU's step time, the GPU never waits for the host."""

    steps: int = 0
    live_rows: int = 0       # summed over steps
    step_s: float = 0.0      # in the session's step()
    joins: int = 0
    joined_rows: int = 0
    join_s: float = 0.0      # in the session's admit(): the prefill and the step in flight
    between_s: float = 0.0   # from the end of one step to the start of the next, joins excluded

    def summary(self) -> str:
        n = max(self.steps, 1)
        return (f"{self.steps} steps of {1000 * self.step_s / n:.2f} ms + {1000 * self.between_s / n:.2f} ms "
                f"between, {self.live_rows / n:.1f} live rows; {self.joins} joins of "
                f"{self.joined_rows / max(self.joins, 1):.1f} rows, {1000 * self.join_s / max(self.joins, 1):.1f} ms")


class ContinuousBatcher(Batcher):
    """``Batcher``'s interface (submit, start, stop, failure) over a ``ContinuousSession``."""

    def __init__(self, engine, gpus, store, *, max_batch_size: int, queue_size: int, cache_slots: int = 0,
                 join_rows: int = 0, batch_wait_ms: float = 5.0, on_failure=None):
        if not hasattr(engine, "session"):
            raise ValueError(f"continuous batching needs the fast engine, not {engine.name!r}")
        super().__init__(engine, gpus, store, max_batch_size=max_batch_size, queue_size=queue_size,
                         batch_wait_ms=batch_wait_ms, on_failure=on_failure)
        self.cache_slots = cache_slots
        if not 0 <= join_rows <= max_batch_size:
            raise ValueError(f"join_rows must be between 0 and max_batch_size ({max_batch_size}), got {join_rows}")
        self.join_rows = join_rows or max(1, max_batch_size // JOIN_FRACTION)
        self.min_gap_s = 0.0 if self.simulated else MIN_READ_GAP_S
        self.session = None
        self.run_id: str | None = None                # a session (and its segments) serves one run
        self.segment: Segment | None = None
        self.joined: dict[str, Joined] = {}          # request id -> its state, while in the session
        self._lock = threading.Lock()                 # guards the three below (batcher and meter threads)
        self._tokens: dict[str, int] = {}             # request id -> tokens processed since the last read
        self._ended: list[Joined] = []               # ended, waiting for the read that settles them
        self._settle_lock = threading.Lock()          # one read-and-split at a time
        self._wake = threading.Event()
        self._meter_stop = threading.Event()
        self._meter_error: BaseException | None = None  # raised on the batcher thread: the same failure path
        self._meter_thread = threading.Thread(target=self._meter_loop, name="continuous-meter", daemon=True)
        self.stats = LoopStats()                      # since start (the batcher thread writes it)
        self._last_step = None                        # perf_counter at the end of the last step of a segment

    def start(self) -> None:
        self._meter_thread.start()
        super().start()

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
        self._meter_stop.set()
        self._wake.set()
        if self._meter_thread.is_alive():
            self._meter_thread.join(timeout=5)

    # -- the batcher thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if self._run_once():
                    return
            except BaseException as e:  # fail the requests the session holds; the next ones run, unless
                log.exception("continuous batch failed")  # the store or the meter broke (or too many in a row)
                self.failures_in_row += 1
                fatal = isinstance(e, (sqlite3.Error, MeterFailed)) or not isinstance(e, Exception)
                if fatal or self.failures_in_row >= MAX_CONSECUTIVE_FAILURES:
                    self._mark_failed(e)  # (NOT_SERVING before any of its requests hears of it)
                try:
                    self._fail_session(e)
                except Exception:
                    log.exception("recording the failed session's requests failed")
                    fatal = True
                if fatal or self.failures_in_row >= MAX_CONSECUTIVE_FAILURES:
                    self._fail_engine(e)
                    return

    def _run_once(self) -> bool:
        """One turn of the batcher thread: admit, step or close; True once stopped and drained."""
        if self._meter_error is not None:
            raise MeterFailed(f"reading or recording the energy failed: {self._meter_error}") from self._meter_error
        if not self._stop.is_set():
            self._admit()
        if self.session is not None and self.session.busy:
            self._step()
        elif self.segment is not None:
            self._close_segment()
        elif self._stop.is_set():
            return True
        return False

    def _fail_session(self, e: BaseException) -> None:
        """Fail every request the session holds (rows with the energy settled so far) and drop the session:
        the next request opens a fresh one."""
        if isinstance(e, (MeterFailed, Unavailable)):
            err = e
        elif isinstance(e, sqlite3.Error):
            err = Unavailable(f"recording this request's batch failed ({e}); the server is no longer serving")
        else:
            err = EngineError(f"the engine failed on this request's batch ({type(e).__name__}: {e}); the server "
                              f"still serves: retry, or change the request")
        with self._lock:
            ended, self._ended = self._ended, []
            self._tokens.clear()
        failed = list(self.joined.values()) + ended  # (answered requests are in neither)
        self.joined.clear()
        self.session, self.run_id = None, None
        segment, self.segment, self._last_step = self.segment, None, None
        try:
            if segment is not None and not isinstance(e, (sqlite3.Error, MeterFailed)):
                with self._settle_lock:
                    self._write(segment, failed, status=err.grpc_code, error=str(err))
        finally:
            for j in failed:
                j.work.end(Failed(err))

    def _admit(self) -> None:
        """Join queued requests first come, first served, all that fit in one prefill. While the session
        runs, a round waits until ``_round_ready``: one prefill costs about the same for one joiner as for
        several (it reads every weight once), and it stalls every live row."""
        idle = self.session is None or not self.session.live_rows
        if not idle and not self._round_ready():
            return
        joins: dict[str, tuple[Work, BatchSpec]] = {}
        while True:
            work = self._next_work(block=idle and self.segment is None and not joins)
            if work is None:
                break
            spec = BatchSpec(work.prompts, [work.max_new_tokens] * len(work.prompts), work.sampling,
                             work.ignore_eos, stopped=lambda step, live, w=work: live if w.stops_at(step) else ())
            if self.session is None or (idle and not joins and (not self.session.fits(spec)
                                                                  or work.run_id != self.run_id)):
                if self.segment is not None:
                    self._close_segment()
                need = max(len(p) for p in spec.prompts) + work.max_new_tokens
                self.session = self.engine.session(self.max_batch_size, max(need, self.cache_slots),
                                                   work.sampling, work.ignore_eos,
                                                   prefill_width=max(len(p) for p in spec.prompts))
                self.run_id = work.run_id
            if work.run_id != self.run_id or not self.session.can_admit([s for _, s in joins.values()] + [spec]):
                self._held = work  # first come, first served: it waits at the head of the queue
                break
            joins[work.request_id] = (work, spec)
        if joins:
            self._join(joins)

    def _round_ready(self) -> bool:
        """A running session admits a round once ``join_rows`` rows are free and as many are waiting, or
        the oldest waiting request has waited ``batch_wait_ms`` (a lone request under light load)."""
        if self.session.free_rows < self.join_rows:
            return False
        with self._queue.mutex:
            waiting = ([self._held] if self._held is not None else []) + list(self._queue.queue)
        if not waiting:
            return False
        if sum(len(w.prompts) for w in waiting) >= self.join_rows:
            return True
        return time.time_ns() - min(w.received_ns for w in waiting) >= self.wait_s * 1e9

    def _join(self, joins: dict[str, tuple[Work, BatchSpec]]) -> None:
        if self.segment is None:
            start = self.meter.read()
            self.segment = Segment(uuid.uuid4().hex, start, start)
        now = time.time_ns()
        for request_id, (work, spec) in joins.items():
            self.joined[request_id] = Joined(work, spec, now)
            self.segment.join(request_id, self.joined[request_id])
        t0 = time.perf_counter()
        deltas = self.session.admit({request_id: spec for request_id, (_, spec) in joins.items()})
        took = time.perf_counter() - t0
        self.stats.joins += 1
        self.stats.joined_rows += sum(len(spec.prompts) for _, spec in joins.values())
        self.stats.join_s += took
        if self._last_step is not None:  # (the join is not host time between steps)
            self._last_step += took
        if not self.segment.first_token_ns:
            self.segment.first_token_ns = time.time_ns()
        self._set_load()
        for request_id, (work, _) in joins.items():
            work.put_step(0, deltas[request_id])
        # their prefill: the prompt tokens
        self._account({request_id: sum(map(len, spec.prompts)) for request_id, (_, spec) in joins.items()})
        self._wake.set()  # a read soon: the steps before the join are not split with the ones who joined

    def _step(self) -> None:
        stats, live = self.stats, self.session.live_rows
        t0 = time.perf_counter()
        gained = self.session.step()
        t1 = time.perf_counter()
        self._pace(t1 - t0)
        if self._last_step is not None:
            stats.between_s += t0 - self._last_step
        stats.steps += 1
        stats.live_rows += live
        stats.step_s += t1 - t0
        joined, trackers = self.joined, self.session.trackers
        for request_id, deltas in gained.items():
            work = joined[request_id].work
            if work.stream:  # (a unary request waits for its answer alone)
                work.put_step(trackers[request_id].steps - 1, deltas)
        # tokens a step processes: one per sequence that ran it (the step it stopped on EOS included)
        self._account(dict(self.session.last_ran))
        self._last_step = time.perf_counter()
        self.failures_in_row = 0

    def _account(self, tokens: dict[str, int]) -> None:
        """Add the tokens each request processed; hand the requests that ended to the meter thread. One
        critical section: a request's last tokens and its end are settled by the same read."""
        ended, finished = [], self.session.finished  # (the session's keys that ended: no check per request)
        for request_id in [k for k in tokens if k in finished] if finished else ():
            j = self.joined.pop(request_id)
            j.steps = self.session.trackers[request_id].steps
            j.output = self.session.pop(request_id)
            ended.append(j)
        with self._lock:
            counts = self._tokens
            for request_id, n in tokens.items():
                if n:
                    counts[request_id] = counts.get(request_id, 0) + n
            self._ended.extend(ended)
        if ended:
            self._set_load()
            self._wake.set()

    def _set_load(self) -> None:
        for g in self.gpus:
            g.set_load(self.session.live_rows)

    def _close_segment(self) -> None:
        """The session is idle: settle what is left, then the next request opens a new segment."""
        self._settle()
        self.segment = None
        self._last_step = None
        log.debug("continuous batcher since start: %s", self.stats.summary())

    # -- energy: the meter thread (and the batcher thread when a segment closes) -----------------------

    def _meter_loop(self) -> None:
        while not self._meter_stop.is_set():
            self._wake.wait(timeout=SETTLE_EVERY_S)
            self._wake.clear()
            segment = self.segment
            if segment is None:
                continue
            wait = self.min_gap_s - (time.perf_counter() - segment.last.perf_s)
            if wait > 0:
                self._meter_stop.wait(wait)
            try:
                self._settle()
            except Exception as e:  # a failed read or write: the batcher thread fails the session's requests
                log.exception("settling continuous-batch energy failed")
                self._meter_error = e

    def _settle(self) -> None:
        """Read the counters; split the joules since the last read over the tokens processed since then;
        answer the requests that had ended before the read; write the segment's rows."""
        with self._settle_lock:
            segment = self.segment
            if segment is None:
                return
            with self._lock:
                tokens, self._tokens = self._tokens, {}
                ended, self._ended = self._ended, []
            if not tokens and not ended:
                return
            try:
                self._settle_taken(segment, tokens, ended)
            except BaseException:
                with self._lock:  # the batcher thread fails them with the rest of the session
                    self._ended[:0] = ended
                raise

    def _settle_taken(self, segment: Segment, tokens: dict[str, int], ended: list[Joined]) -> None:
        if tokens:  # (every end comes with its last tokens: an end alone needs no read)
            reading = self.meter.read()
            segment.settle(reading, self.meter.between(segment.last, reading, counter_only=True), tokens)
        segment.output_tokens += sum(len(t) for j in ended for t in j.output.tokens)
        self._write(segment, ended)
        for j in ended:
            j.work.end(Done(segment.result(j, self.simulated)))

    def _write(self, segment: Segment, ended: list[Joined], status: str | None = None,
               error: str | None = None) -> None:
        self.store.record_segment(*segment.rows(ended, self.gpus, self.simulated, status, error))
