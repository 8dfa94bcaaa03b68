"""Batching: a bounded queue of requests and one worker thread that runs batches on the engine.

A request's prompts always run as one batch (the paper's batch size). With ``merge_requests`` the
worker also merges concurrent compatible requests (same sampling and fixed-length mode; any seeds on an
engine that samples each row with its own seed, ``per_row_seeds``) up to
``max_batch_size`` sequences, waiting at most ``batch_wait_ms`` for company. Every batch is bracketed by
energy-counter reads of every GPU; its joules are split over its requests by tokens processed
(docs/energy.md) and written to the server store with the batch and request rows.
"""

import logging
import queue
import threading
import time
import uuid

from llmwatts.errors import CallEnded, EngineError, ResourceExhausted, Unavailable
from llmwatts.server.engine import BatchOutput, BatchSpec, Engine
from llmwatts.server.engine.sampling import row_keys
from llmwatts.server.gpu import GPU, pace_slowest
from llmwatts.server.records import BatchRow, attribute, method_of
from llmwatts.server.store import ServerStore
from llmwatts.server.telemetry import EnergyMeter
from llmwatts.server.work import Done, Failed, Result, Work

log = logging.getLogger(__name__)


# A batch that fails fails its own requests (INTERNAL) and the next batch runs; only this many failures in
# a row mark the engine broken (NOT_SERVING): one bad request must never take the server down.
MAX_CONSECUTIVE_FAILURES = 3


class Batcher:
    def __init__(self, engine: Engine, gpus: list[GPU], store: ServerStore, *, max_batch_size: int,
                 queue_size: int, merge_requests: bool = False, batch_wait_ms: float = 5.0,
                 on_failure=None):
        self.engine, self.gpus, self.store = engine, gpus, store
        self.meter = EnergyMeter(gpus)
        self.max_batch_size = max_batch_size
        self.merge = merge_requests
        self.wait_s = batch_wait_ms / 1000.0
        self.simulated = any(g.simulated for g in gpus)
        self._queue: queue.Queue[Work] = queue.Queue(maxsize=queue_size)
        self._held: Work | None = None  # taken from the queue but left for the next batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self.failure: BaseException | None = None
        self.failures_in_row = 0
        self.on_failure = on_failure  # called once (from the batcher thread) when the engine breaks

    def start(self) -> None:
        self._thread.start()

    def submit(self, work: Work) -> None:
        engine_failure = getattr(self.engine, "failure", None)  # (a sharded engine that lost a rank)
        if isinstance(engine_failure, Unavailable):
            raise engine_failure
        if self._stop.is_set() or self.failure is not None:
            raise Unavailable("the server is shutting down or its engine failed; retry against a healthy server")
        try:
            self._queue.put_nowait(work)
        except queue.Full:
            raise ResourceExhausted(
                f"request queue is full ({self._queue.maxsize} waiting): slow down, or raise --queue-size"
            ) from None

    def cancel(self, work: Work, status: str) -> None:
        """``work``'s call ended before its answer (``status``: CANCELLED or DEADLINE_EXCEEDED). Still
        queued: it leaves the queue now, its row says so. Running: its rows stop at the next decode step
        (``BatchSpec.stopped``) and its row keeps the energy it used."""
        if work.ended or work.cancelled:
            return
        work.cancel(status)
        with self._queue.mutex:  # (queue.Queue has no remove: its deque, under its own lock)
            try:
                self._queue.queue.remove(work)
            except ValueError:
                return  # taken by the batcher thread: it sees ``cancelled``
            self._queue.not_full.notify()
        self._end_unrun([work], status, None)

    def _end_unrun(self, works: list[Work], status: str, err: BaseException | None) -> None:
        """Rows and last events for requests that never ran (``err`` None: their call ended early)."""
        if not works:
            return
        try:
            self.store.record_requests([w.row(status, simulated=self.simulated, error=str(err) if err else None)
                                        for w in works])
        finally:
            for w in works:
                w.end(Failed(err or CallEnded(status)))

    def _next_work(self, block: bool = True) -> Work | None:
        """The request held back for the next batch, else the queue's next (waiting up to 0.1 s if
        ``block``); None when there is none. A request cancelled while queued is ended, never returned."""
        while True:
            if self._held is not None:
                work, self._held = self._held, None
            else:
                try:
                    work = self._queue.get(timeout=0.1) if block else self._queue.get_nowait()
                except queue.Empty:
                    return None
            if work.cancelled is None:
                return work
            self._end_unrun([work], work.cancelled, None)

    def _next_group(self) -> list[Work] | None:
        first = self._next_work()
        if first is None:
            return None
        group, n = [first], len(first.prompts)
        if not self.merge:
            return group
        deadline = time.perf_counter() + self.wait_s
        while n < self.max_batch_size:
            try:
                more = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            seeds_apart = getattr(self.engine, "per_row_seeds", False)
            if more.cancelled is not None:
                self._end_unrun([more], more.cancelled, None)
            elif more.compatible(first, seeds_apart) and n + len(more.prompts) <= self.max_batch_size:
                group.append(more)
                n += len(more.prompts)
            else:
                self._held = more
                break
        return group

    def _run(self) -> None:
        while not self._stop.is_set():
            group = self._next_group()
            if group is None:
                continue
            try:
                self._run_batch(group)
                self.failures_in_row = 0
            except BatchFailed as e:  # its requests have their rows and their errors; the next batch runs
                self.failures_in_row += 1
                if self.failures_in_row >= MAX_CONSECUTIVE_FAILURES:
                    self._fail_engine(e.__cause__ or e)
                    return
            except BaseException as e:  # the bookkeeping broke: fail these requests, refuse new ones
                log.exception("batch failed")
                self._mark_failed(e)  # (NOT_SERVING before any of them hears of it)
                for w in group:
                    if not w.ended:
                        w.end(Failed(e))
                self._fail_engine(e)
                return

    def _mark_failed(self, e: BaseException) -> None:
        """The engine (or the store) is broken: refuse new requests, tell the server (NOT_SERVING). Once."""
        if self.failure is not None:
            return
        log.error("the engine is marked failed (%d batches failed in a row): %s", self.failures_in_row, e)
        self.failure = e
        if self.on_failure is not None:
            self.on_failure(e)

    def _fail_engine(self, e: BaseException) -> None:
        self._mark_failed(e)
        self._fail_pending(Unavailable(f"the engine failed ({type(e).__name__}: {e}); the server is no longer "
                                       f"serving: restart it"))

    def _fail_pending(self, e: BaseException) -> None:
        """Answer every request that will never run: the one held back for the next batch and the queue."""
        held, self._held = self._held, None
        pending = [held] if held is not None else []
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self._end_unrun(pending, getattr(e, "grpc_code", "UNAVAILABLE"), e)

    def _pace(self, busy_s: float) -> None:
        pace_slowest(self.gpus, busy_s)  # simulated GPUs throttle under a cap; real ones return at once

    def _run_batch(self, group: list[Work]) -> None:
        batch_id = uuid.uuid4().hex
        prompts = [p for w in group for p in w.prompts]
        limits = [w.max_new_tokens for w in group for _ in w.prompts]
        owners = [(i, j) for i, w in enumerate(group) for j in range(len(w.prompts))]
        keys = [k for w in group for k in row_keys(w.sampling.seed, len(w.prompts))]  # each request's own seed
        def stopped(step: int, live: list[int]) -> set[int]:  # a cancelled request's rows stop at this step
            ended = {i for i, w in enumerate(group) if w.stops_at(step)}
            return {row for row in live if owners[row][0] in ended}

        spec = BatchSpec(prompts, limits, group[0].sampling, group[0].ignore_eos, keys, stopped=stopped)

        def on_step(step: int, deltas: list[list[int]]) -> None:
            per_work: list[list[list[int]]] = [[] for _ in group]
            for (i, _), d in zip(owners, deltas):
                per_work[i].append(d)
            for w, d in zip(group, per_work):
                w.put_step(step, d)

        start = self.meter.read()
        for g in self.gpus:
            g.set_load(len(prompts))
        failed: Exception | None = None
        try:
            out: BatchOutput = self.engine.generate(spec, on_step=on_step, pace=self._pace)
        except Exception as e:  # this batch's requests fail; its energy is still theirs
            log.exception("batch %s failed", batch_id)
            # An engine that says it is out of service (a sharded server that lost a rank) is, for good:
            # its own status reaches the client. Anything else fails this batch only.
            if isinstance(e, Unavailable):
                failed = e
            else:
                failed = EngineError(f"the engine failed on this request's batch ({type(e).__name__}: {e}); "
                                     f"the server still serves: retry, or change the request")
                failed.__cause__ = e
            out = BatchOutput([[] for _ in prompts], ["error"] * len(prompts), time.time_ns(),
                              [time.time_ns()] * len(prompts), [0] * len(prompts))
        finally:
            for g in self.gpus:
                g.set_load(0)
        end = self.meter.read()
        gpu_energy = self.meter.between(start, end, batch_id=batch_id)
        energy_j = sum(r.energy_j for r in gpu_energy)

        rows_of, first_row = [], 0  # each request's rows: contiguous in the batch, in group order (``owners``)
        for w in group:
            rows_of.append(range(first_row, first_row + len(w.prompts)))
            first_row += len(w.prompts)
        output_tokens = [sum(len(out.tokens[k]) for k in rows) for rows in rows_of]
        shares_j = attribute(energy_j, {i: sum(map(len, w.prompts)) + output_tokens[i] for i, w in enumerate(group)})
        steps = max((len(t) for t in out.tokens), default=0)
        requests, results = [], []
        for i, (w, rows) in enumerate(zip(group, rows_of)):
            done_ns = max(out.done_ns[k] for k in rows)
            requests.append(w.row(failed.grpc_code if failed else w.status, simulated=self.simulated,
                                  error=str(failed) if failed else None, batch_id=batch_id,
                                  batch_start_ns=start.ts_ns, first_token_ns=out.first_token_ns, done_ns=done_ns,
                                  output_tokens=output_tokens[i], energy_j=shares_j[i],
                                  steps=max(out.steps[k] for k in rows)))
            results.append(Result(batch_id, w.received_ns, steps, [out.tokens[k] for k in rows],
                                  [out.finish_reasons[k] for k in rows], [len(p) for p in w.prompts], start.ts_ns,
                                  out.first_token_ns, done_ns, shares_j[i], self.simulated))
        batch = BatchRow(batch_id=batch_id, start_ns=start.ts_ns, first_token_ns=out.first_token_ns,
                         end_ns=end.ts_ns, n_requests=len(group), n_sequences=len(prompts),
                         prompt_tokens=sum(len(p) for p in prompts), output_tokens=sum(len(t) for t in out.tokens),
                         energy_j=energy_j, energy_method=method_of(gpu_energy), simulated=int(self.simulated))
        self.store.record_batch(batch, gpu_energy, requests)
        for w, result in zip(group, results):
            w.end(Failed(failed) if failed else Done(result))
        if failed:
            if isinstance(failed, Unavailable):  # the engine said it is out of service: no retry count
                raise failed
            raise BatchFailed(str(failed)) from failed.__cause__

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in flight, then stop; queued requests are failed as UNAVAILABLE."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
        self._fail_pending(Unavailable("the server is shutting down; the request was not run"))


class BatchFailed(Exception):
    """A batch's engine call failed; its requests have their rows and their errors."""
