"""``ContinuousSession``: continuous batching on one workspace of a ``FastEngine``, through its public
steps (``workspace``, ``join``, ``decode_step``, ``step_graph``, ``rows_view``). The server's admission and
energy accounting around it is ``server/continuous.py``.
"""

import dataclasses
import operator

import torch

from llmwatts.server.engine.batch import BatchOutput, BatchSpec, Sampling, SequenceTracker
from llmwatts.server.engine.cache import Workspace, bucket
from llmwatts.server.engine.graphs import step_buffers

# What a session's requests must share: every sampling setting but the seed (each row samples with its own).
_unseeded = operator.attrgetter(*(f.name for f in dataclasses.fields(Sampling) if f.name != "seed"))


class ContinuousSession:
    """Continuous batching on one workspace: requests join free rows and leave between decode steps.

    Joining requests' prompts are prefilled into the lowest free rows (together: one prefill, left-padded
    to their widest) and then decode with every other live row: each row writes its own
    cache slot (``row_slot``) and attends over its own slots only, so rows that joined at different steps
    share every step. A row is freed the step its sequence ends (EOS or its limit); the next request
    takes it. A step runs over rows ``0 .. bucket(highest live row)``, so a half-empty session does not
    pay for its empty top rows. Sampling settings live in the step's graph: one temperature and top-p per
    session; each row samples with its own request's seed (its noise key, ``sampling.row_keys``).

    ``admit`` and ``step`` return, per request key, what each of its sequences gained (``SequenceTracker``
    deltas); ``done(key)`` says when all of them ended and ``pop(key)`` hands over its ``BatchOutput``.
    Single process only (a sharded engine would have to broadcast every join and step to its ranks).
    """

    @torch.inference_mode()
    def __init__(self, engine, rows: int, cache_slots: int, sampling: Sampling,
                 ignore_eos: bool, prefill_width: int = 1):
        if engine.attention == "flex":
            raise ValueError("continuous batching runs with the sdpa or bmm decode attention, not flex")
        if rows < 1:
            raise ValueError(f"a continuous batch needs at least one row, got {rows}")
        self.engine, self.rows, self.sampling, self.ignore_eos = engine, rows, sampling, ignore_eos
        cache_slots = min(cache_slots, engine.context_length)
        ws = self.ws = engine.workspace(bucket(rows), cache_slots, prefill_width=prefill_width)
        dev = engine.device
        if ws.row_slot is None:
            ws.row_slot = torch.zeros(ws.batch, dtype=torch.long, device=dev)
            ws.live = torch.zeros(ws.batch, dtype=torch.long, device=dev)
        ws.temperature.fill_(sampling.temperature)
        ws.top_p.fill_(sampling.top_p)
        if engine.cuda_graphs and engine.join_tokens:
            engine.capture_joins(ws, sampling.greedy)  # (before a row is live: they write rows 0..)
        self._idle(torch.arange(ws.batch, device=dev))
        self.owner: list[tuple[object, int] | None] = [None] * rows  # row -> (request key, sequence index)
        self.slot = [0] * rows                                         # host copy of the live rows' slots
        self.trackers: dict[object, SequenceTracker] = {}
        self.rows_of: dict[object, list[int | None]] = {}             # key -> row per sequence (None: ended)
        self.steps = 0                                                 # steps launched
        self.free_rows = rows                                          # rows without an owner
        self.finished: set = set()                                     # keys all ended, not yet popped
        self.last_ran: dict[object, int] = {}  # key -> its sequences that ran the step ``step`` took
        self._host = step_buffers(ws.batch, dev)
        self._pending = None  # (host buffer, event, [(row, key, sequence)]) of the step launched last

    @property
    def cache_slots(self) -> int:
        return self.ws.cache_len

    @property
    def live_rows(self) -> int:
        return self.rows - self.free_rows

    def fits(self, batch: BatchSpec) -> bool:
        """Whether ``batch`` could ever join this session: same sampling (any seed), and room in the cache
        (now or once rows free up) for its prompt, its new tokens and the one step a row runs past its end."""
        width = max(len(p) for p in batch.prompts)
        same = _unseeded(batch.sampling) == _unseeded(self.sampling)
        return (same and batch.ignore_eos == self.ignore_eos
                and len(batch.prompts) <= self.rows and width + max(batch.max_new_tokens) <= self.cache_slots)

    def can_admit(self, batches: list[BatchSpec]) -> bool:
        """Whether ``batches`` can join now, together: free rows for all their prompts, and room in the
        cache for their longest response after their widest prompt (one prefill left-pads to it)."""
        if not batches:
            return True
        width = max(len(p) for b in batches for p in b.prompts)
        return (all(self.fits(b) for b in batches) and sum(len(b.prompts) for b in batches) <= self.free_rows
                and width + max(n for b in batches for n in b.max_new_tokens) <= self.cache_slots)

    @torch.inference_mode()
    def admit(self, joins: dict) -> dict[object, list[list[int]]]:
        """Prefill every request of ``joins`` (key -> BatchSpec) into free rows, in one prefill; their first
        token per sequence (as deltas), per key."""
        if any(key in self.trackers for key in joins):
            raise ValueError(f"a request of {sorted(map(str, joins))} is already in this batch")
        if not joins or not self.can_admit(list(joins.values())):
            raise ValueError("these requests cannot join now: check can_admit first")
        prompts = [p for spec in joins.values() for p in spec.prompts]
        free = [r for r, o in enumerate(self.owner) if o is None][:len(prompts)]
        keys = None if self.sampling.greedy else [k for spec in joins.values() for k in spec.noise_keys()]
        first, starts = self.engine.join(self.ws, prompts, self.sampling.greedy, free, keys)
        out, at = {}, 0
        for key, spec in joins.items():
            rows = free[at:at + len(spec.prompts)]
            tracker = self.trackers[key] = SequenceTracker(spec, self.engine.eos_id)
            self.rows_of[key] = list(rows)
            for i, r in enumerate(rows):
                self.owner[r] = (key, i)
                self.slot[r] = starts[at + i]
            self.free_rows -= len(rows)
            out[key] = tracker.step(first[at:at + len(spec.prompts)])
            self._free_ended(key)
            at += len(spec.prompts)
        return out

    @torch.inference_mode()
    def capture_steps(self) -> int:
        """Capture the decode step of every row prefix and every attention window up to the cache length
        now, while no row is live, instead of at the first step that meets each one: a capture takes
        about as long as tens of decode steps, and every live row waits for it. -> graphs captured (0
        without CUDA graphs)."""
        if self.live_rows or self._pending is not None:
            raise ValueError("capture_steps runs before any request joins (its warm-up runs write rows 0..)")
        if not self.engine.cuda_graphs:
            return 0
        eng, before = self.engine, self.engine.captures
        windows = sorted({eng.window(self.ws, n) for n in range(1, self.ws.cache_len + 1)})
        for prefix in sorted({bucket(n) for n in range(1, self.rows + 1)}):
            view = self._view(prefix)
            for window in windows:
                eng.step_graph(view, window, self.sampling.greedy, per_row=True)
        return eng.captures - before

    @property
    def busy(self) -> bool:
        """Rows are live, or a launched step's tokens are still to be taken (``step``)."""
        return self.live_rows > 0 or self._pending is not None

    @torch.inference_mode()
    def step(self) -> dict[object, list[list[int]]]:
        """Launch a decode step of every live row, then take the tokens of the step launched before it (on
        CUDA their copy to the host overlapped this step, as in ``FastEngine.generate``: the GPU does not
        wait for the host's bookkeeping) -> per request key, each of its sequences' gain in that step;
        ``last_ran`` says how many of its sequences ran it. A sequence that ended in a step has already
        run the next one when that is found out: its row's token there is dropped (the cache has the
        slot to spare, ``fits``)."""
        live = [r for r, o in enumerate(self.owner) if o is not None]
        launched = None
        if live:
            view = self._view(bucket(live[-1] + 1))
            self.engine.decode_step(view, max(self.slot[r] for r in live) + 1, self.sampling.greedy,
                                     per_row=True)
            buf, event = self._host[self.steps % 2]
            buf[:view.batch].copy_(view.out, non_blocking=event is not None)
            if event is not None:
                event.record()
            self.steps += 1
            for r in live:
                self.slot[r] += 1
            launched = (buf, event, [(r, *self.owner[r]) for r in live])
        taken, self._pending = self._pending, launched
        return self._take(taken) if taken is not None else {}

    def _view(self, rows: int) -> Workspace:
        """The session's first ``rows`` rows, the workspace a step over them runs on (its own graphs)."""
        return self.engine.rows_view(self.ws, rows)

    def _take(self, pending) -> dict[object, list[list[int]]]:
        buf, event, ran = pending
        if event is not None:
            event.synchronize()  # the one host sync per step
        ids = buf.tolist()
        per_key: dict[object, dict[int, int]] = {}
        for r, key, i in ran:
            if key in self.trackers:  # (a request popped since: the step ran past its end)
                per_key.setdefault(key, {})[i] = ids[r]
        out, self.last_ran = {}, {}
        for key, tokens in per_key.items():
            tracker = self.trackers[key]
            self.last_ran[key] = sum(1 for i in tokens if tracker.finish[i] is None)
            if not self.last_ran[key]:
                continue
            finished = tracker.n_finished
            out[key] = tracker.step([tokens.get(i, 0) for i in range(len(tracker.finish))])
            if tracker.n_finished != finished:
                self._free_ended(key)
        return out

    def done(self, key) -> bool:
        return self.trackers[key].all_done

    def pop(self, key) -> BatchOutput:
        """The ended request's output; forgets it."""
        if not self.done(key):
            raise ValueError(f"request {key!r} has not ended")
        del self.rows_of[key]
        self.finished.discard(key)
        return self.trackers.pop(key).output()

    def _free_ended(self, key) -> None:
        """Free the rows of ``key``'s sequences that just ended: idle, slot 0, attending to slot 0 only. Once
        all have, ``key`` is in ``finished`` until ``pop``."""
        tracker = self.trackers[key]
        rows, finish = self.rows_of[key], tracker.finish
        if tracker.all_done:
            self.finished.add(key)
        ended = [r for i, r in enumerate(rows) if r is not None and finish[i] is not None]
        if not ended:
            return
        for r in ended:
            i = self.owner[r][1]
            rows[i] = None
            self.owner[r] = None
            self.slot[r] = 0
        self.free_rows += len(ended)
        self._idle(torch.tensor(ended, dtype=torch.long, device=self.engine.device))

    def _idle(self, rows: torch.Tensor) -> None:
        """Make ``rows`` idle: not live, slot 0, attending to their slot 0 alone (no empty softmax row)."""
        ws = self.ws
        ws.live.index_fill_(0, rows, 0)
        ws.row_slot.index_fill_(0, rows, 0)
        ws.key_valid.index_fill_(0, rows, False)
        ws.key_valid[rows, 0] = True
