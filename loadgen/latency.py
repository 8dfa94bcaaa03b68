"""Per-request latency metrics of a streamed call from its chunks' arrival times: TTFT, TPOT, ITL.

Definitions (all on ``time.perf_counter_ns``, relative to the call's send):

* **TTFT** — send to the arrival of the first chunk that carries tokens.
* **E2E** (``latency_ms``) — send to the end of the call (the final chunk).
* **TPOT** — ``(E2E − TTFT) / (n − 1)`` where ``n`` is the output tokens of the request's longest
  completion (its decode steps; for a request of one prompt, its output tokens). None when ``n < 2``.
* **ITL** — the gaps between the request's consecutive decode steps. When the server stamps each token
  with the server clock of its step (``TokenDelta.token_server_ns``; a server that coalesces several
  steps into one chunk does), the gaps are the diffs of those stamps (one clock, no offset needed; exact
  to the step although chunks arrive in lumps): ``itl_source = "server_steps"``. From a server without
  stamps, the gaps between the arrivals of consecutive token-carrying chunks (``"client_chunks"``); a
  chunk that carries several tokens of a sequence then counts once, as the time the reader waited for it.
  Per request we keep the gaps' count, mean, p50, p99 and max (``llmwatts.stats``); the chunk times (and
  their server step stamps) only with ``--record-chunks`` (table ``client_chunks``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from llmwatts.loadgen.records import ClientChunk
from llmwatts.stats import percentiles


@dataclass
class ChunkClock:
    """Arrival times of one streamed call's token-carrying chunks, collected as they come."""

    start_perf_ns: int
    arrival_perf_ns: list[int] = field(default_factory=list)
    arrival_ns: list[int] = field(default_factory=list)      # wall clock
    tokens: list[int] = field(default_factory=list)          # most tokens any one sequence got per chunk
    step_server_ns: list[list[int]] = field(default_factory=list)  # per chunk: its steps' server stamps

    def add(self, perf_ns: int, wall_ns: int, tokens: int, step_server_ns: list[int] = ()) -> None:
        self.arrival_perf_ns.append(perf_ns)
        self.arrival_ns.append(wall_ns)
        self.tokens.append(tokens)
        self.step_server_ns.append(list(step_server_ns))

    def steps_server_ns(self) -> list[int]:
        """The request's decode steps' server stamps, in order (empty from a server that sends none)."""
        return sorted({t for chunk in self.step_server_ns for t in chunk})

    def elapsed_ms(self) -> list[float]:
        return [(t - self.start_perf_ns) / 1e6 for t in self.arrival_perf_ns]

    def chunks(self, request_id: str) -> list[ClientChunk]:
        return [ClientChunk(request_id, i, wall, ms, n, json.dumps(steps) if steps else None)
                for i, (wall, ms, n, steps) in enumerate(zip(self.arrival_ns, self.elapsed_ms(), self.tokens,
                                                             self.step_server_ns))]


@dataclass
class StreamLatency:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    itl_count: int | None = None
    itl_mean_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    itl_max_ms: float | None = None
    itl_source: str | None = None        # "server_steps" or "client_chunks"


def stream_latency(elapsed_ms: list[float], e2e_ms: float, longest_output_tokens: int | None,
                   steps_server_ns: list[int] = ()) -> StreamLatency:
    """TTFT, TPOT and the ITL summary from the token-carrying chunks' times since send (ms), the call's
    E2E (ms), the longest completion's output tokens and the steps' server stamps, if the server sent them
    (see the module docstring)."""
    if not elapsed_ms:
        return StreamLatency()
    ttft_ms = elapsed_ms[0]
    tpot_ms = None
    if longest_output_tokens is not None and longest_output_tokens > 1:
        tpot_ms = (e2e_ms - ttft_ms) / (longest_output_tokens - 1)
    if steps_server_ns:
        source, gaps = "server_steps", [(b - a) / 1e6 for a, b in zip(steps_server_ns, steps_server_ns[1:])]
    else:
        source, gaps = "client_chunks", [b - a for a, b in zip(elapsed_ms, elapsed_ms[1:])]
    if not gaps:
        return StreamLatency(ttft_ms=ttft_ms, tpot_ms=tpot_ms, itl_count=0, itl_source=source)
    p50, p99 = percentiles(gaps, (50, 99))
    return StreamLatency(ttft_ms=ttft_ms, tpot_ms=tpot_ms, itl_count=len(gaps), itl_mean_ms=sum(gaps) / len(gaps),
                         itl_p50_ms=p50, itl_p99_ms=p99, itl_max_ms=max(gaps), itl_source=source)
