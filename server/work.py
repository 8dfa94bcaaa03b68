"""A request on its way through a batcher (``Work``), what comes back (``Result``), the typed events the
batchers send to the servicer thread that waits for it (``Step``, ``Done``, ``Failed``), and its row in
the server DB (``Work.row``: the one place a ``requests`` row is built)."""

import dataclasses
import queue
import time
from dataclasses import dataclass, field
from typing import Callable

from llmwatts.server.engine import Sampling
from llmwatts.server.records import RequestRow


@dataclass
class Result:
    """A request's answer: its share of one batch (or continuous segment)."""

    batch_id: str
    received_ns: int
    steps: int                      # decode steps the batch ran
    tokens: list[list[int]]
    finish_reasons: list[str]
    prompt_tokens: list[int]
    batch_start_ns: int
    first_token_ns: int
    done_ns: int
    energy_j: float
    simulated: bool


@dataclass(frozen=True)
class Step:
    """A decode step's new tokens for a streaming request, one list per sequence, stamped with the server
    clock when the step finished (each token's ``token_server_ns``)."""

    step: int
    deltas: list[list[int]]
    server_ns: int


@dataclass(frozen=True)
class Done:
    """The request's answer; its row is written."""

    result: Result


@dataclass(frozen=True)
class Failed:
    """The request failed or its call ended early; its row is written. ``error`` carries the status."""

    error: BaseException


Event = Step | Done | Failed


@dataclass
class Work:
    """One request travelling through the batcher. ``events`` carries what the servicer streams out."""

    request_id: str
    run_id: str
    prompts: list[list[int]]
    max_new_tokens: int
    sampling: Sampling
    ignore_eos: bool
    received_ns: int
    # (SimpleQueue: put and get in C, no Python-level lock and condition per event: the batcher thread puts a
    # Step for every streamed request every decode step)
    events: "queue.SimpleQueue[Event]" = field(default_factory=queue.SimpleQueue)
    stream: bool = True  # False (unary Generate): no Step events, so its thread does not wake every step
    # "CANCELLED" or "DEADLINE_EXCEEDED" once its call ended before its answer (``Batcher.cancel``): it
    # leaves the queue, and a running batch at its next decode step.
    cancelled: str | None = None
    # When the server saw that (wall clock), and the step its rows had been checked at then (``stops_at``):
    # the row's ``steps`` minus this is how many steps it ran after (<= 1: the step in flight).
    cancelled_ns: int | None = None
    cancelled_step: int | None = None
    checked_step: int = 0
    ended: bool = False
    on_end: Callable[["Work"], None] | None = None  # the host's run bookkeeping (``runs.py``)

    def stops_at(self, step: int) -> bool:
        """Its rows' check at ``step`` (``BatchSpec.stopped``): has its call ended? The step is noted first and
        ``cancel`` notes it second, so ``cancelled_step`` is never behind the step that sees the cancel."""
        self.checked_step = step
        return self.cancelled is not None

    def cancel(self, status: str) -> None:
        """Its call ended before its answer (CANCELLED or DEADLINE_EXCEEDED): noted with when and at which step."""
        self.cancelled_ns = time.time_ns()
        self.cancelled = status
        self.cancelled_step = self.checked_step  # (after ``cancelled``: see ``stops_at``)

    def put_step(self, step: int, deltas: list[list[int]]) -> None:
        """A step's new tokens, stamped with the server clock now, for a streaming request (a unary one
        waits for ``Done`` alone). The stamp is each token's time on the wire (``token_server_ns``)."""
        if self.stream:
            self.events.put(Step(step, deltas, time.time_ns()))

    def end(self, event: Done | Failed) -> None:
        """Its last event, once its row is written."""
        self.ended = True
        self.events.put(event)
        if self.on_end is not None:
            self.on_end(self)

    def compatible(self, other: "Work", per_row_seeds: bool = False) -> bool:
        """Same sampling (any seeds with ``per_row_seeds``) and fixed-length mode: one batch can hold both."""
        mine, theirs = self.sampling, other.sampling
        if per_row_seeds:
            mine, theirs = dataclasses.replace(mine, seed=None), dataclasses.replace(theirs, seed=None)
        return mine == theirs and self.ignore_eos == other.ignore_eos

    @property
    def status(self) -> str:
        """The row's status of a request that ran: ok, or how its call ended early."""
        return self.cancelled or "ok"

    def row(self, status: str, *, simulated: bool, error: str | None = None, batch_id: str | None = None,
            batch_start_ns: int | None = None, first_token_ns: int | None = None, done_ns: int | None = None,
            output_tokens: int = 0, energy_j: float = 0.0, steps: int = 0) -> RequestRow:
        """Its ``requests`` row. Without ``batch_id``: a request that never reached a batch (running, refused,
        cancelled while queued, shut down)."""
        return RequestRow(request_id=self.request_id, run_id=self.run_id, batch_id=batch_id,
                          received_ns=self.received_ns, batch_start_ns=batch_start_ns, first_token_ns=first_token_ns,
                          done_ns=done_ns, n_prompts=len(self.prompts), prompt_tokens=sum(map(len, self.prompts)),
                          output_tokens=output_tokens, energy_j=energy_j, status=status, error=error,
                          simulated=int(simulated), steps=steps, cancelled_ns=self.cancelled_ns,
                          cancelled_step=self.cancelled_step)
