"""What a batch is, as every engine sees it: prompts, limits and sampling in (``BatchSpec``), tokens and
their times out (``BatchOutput``), and the per-sequence bookkeeping of EOS and limits (``SequenceTracker``).
"""

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from llmwatts.server.config import DEFAULT_TEMPERATURE, DEFAULT_TOP_P
from llmwatts.server.limits import MIN_TEMPERATURE

# step index, new token ids per sequence (an empty list once a sequence has finished)
StepCallback = Callable[[int, list[list[int]]], None]
# called after each step with the wall seconds it took (the simulated GPU stretches it under a cap)
PaceCallback = Callable[[float], None]
# (step, rows still running) -> the rows among them whose request's call has ended (cancelled, past its
# deadline): they finish at this step ("cancelled"). Called once per step (``SequenceTracker.step``; step 1
# is the prefill's token), on every rank of a sharded engine (which agrees on rank 0's answer).
StopCheck = Callable[[int, list[int]], "set[int] | list[int]"]


@dataclass(frozen=True)
class Sampling:
    greedy: bool = False
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None


@dataclass
class BatchSpec:
    prompts: list[list[int]]        # token ids per sequence, unpadded
    max_new_tokens: list[int]       # per sequence
    sampling: Sampling = field(default_factory=Sampling)
    ignore_eos: bool = False        # fixed-length: generate exactly max_new_tokens
    # Per sequence: the fast engine's sampling-noise key (``sampling.row_keys`` of each request's seed), so
    # merged requests with different seeds each sample as they would alone. None: from ``sampling.seed``.
    keys: list[int] | None = None

    def noise_keys(self) -> list[int]:
        """Each sequence's sampling-noise key: ``keys``, else ``row_keys(sampling.seed, n)``."""
        from llmwatts.server.engine.sampling import row_keys

        return list(self.keys) if self.keys is not None else row_keys(self.sampling.seed, len(self.prompts))
    # Rows whose request's call has ended finish at the step that sees it ("cancelled"), so a static
    # batch stops once every row is done and a continuous one frees them (``StopCheck``).
    stopped: StopCheck | None = field(default=None, compare=False)


@dataclass
class BatchOutput:
    tokens: list[list[int]]         # generated ids per sequence (EOS excluded)
    finish_reasons: list[str]       # "length" or "eos"
    first_token_ns: int             # wall clock when the first step's tokens existed
    done_ns: list[int]              # wall clock when each sequence finished
    steps: list[int] = field(default_factory=list)  # per sequence: the step it finished at (1: the prefill's)


class Engine(Protocol):
    name: str

    def generate(self, batch: BatchSpec, on_step: StepCallback | None = None,
                 pace: PaceCallback | None = None) -> BatchOutput: ...


class SequenceTracker:
    """Per-sequence bookkeeping shared by the engines: which sequences finished, and why."""

    def __init__(self, batch: BatchSpec, eos_token_id: int | None):
        self.batch = batch
        self.eos = None if batch.ignore_eos else eos_token_id
        n = len(batch.prompts)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.done_ns = [0] * n
        self.done_step = [0] * n
        self.n_finished = 0  # sequences finished so far (a continuous session frees rows when it grows)
        self.steps = 0
        self.first_token_ns = 0

    @property
    def all_done(self) -> bool:
        return self.n_finished == len(self.finish)

    def step(self, new_ids: list[int]) -> list[list[int]]:
        """Take one step's token per sequence; return what each sequence really gained."""
        now = time.time_ns()
        if self.steps == 0:
            self.first_token_ns = now
        self.steps += 1
        deltas = []
        if self.batch.stopped is not None:
            for i in self.batch.stopped(self.steps, [i for i, f in enumerate(self.finish) if f is None]):
                self._finish(i, "cancelled", now)
        for i, tok in enumerate(new_ids):
            if self.finish[i] is not None:
                deltas.append([])
                continue
            if self.eos is not None and tok == self.eos:
                self._finish(i, "eos", now)
                deltas.append([])
                continue
            self.tokens[i].append(tok)
            deltas.append([tok])
            if len(self.tokens[i]) >= self.batch.max_new_tokens[i]:
                self._finish(i, "length", now)
        return deltas

    def _finish(self, i: int, reason: str, now_ns: int) -> None:
        self.finish[i], self.done_ns[i], self.done_step[i] = reason, now_ns, self.steps
        self.n_finished += 1

    def output(self) -> BatchOutput:
        now = time.time_ns()
        reasons = [f or "length" for f in self.finish]
        done = [d or now for d in self.done_ns]
        return BatchOutput(self.tokens, reasons, self.first_token_ns or now, done,
                           [s or self.steps for s in self.done_step])


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids: [B, S] left-padded; mask: [B, S] with 1 on real tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def validate_sampling(temperature: float | None, top_p: float | None, greedy: bool, seed: int | None) -> Sampling:
    """Sampling parameters from the wire, or ``ValueError`` with the allowed range."""
    t = DEFAULT_TEMPERATURE if temperature is None else float(temperature)
    p = DEFAULT_TOP_P if top_p is None else float(top_p)
    if not greedy:
        if not math.isfinite(t) or t < MIN_TEMPERATURE * (1 - 1e-6) or t > 10:  # (fp32 on the wire)
            raise ValueError(f"sampling.temperature must be in [{MIN_TEMPERATURE}, 10], got {t}; set greedy for "
                             f"argmax decoding")
        if not math.isfinite(p) or p <= 0 or p > 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {p}")
    return Sampling(greedy=greedy, temperature=t, top_p=p, seed=seed)
