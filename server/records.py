"""The server's energy records: one dataclass per kind of row the batchers write (the server DB's
``requests``, ``batches`` and ``batch_gpu_energy`` tables are derived from them in store.py), and the one
attribution rule that splits a batch's joules over its requests.

Times ``*_ns`` are this server's wall clock (``time.time_ns``); energies are joules (``energy_j``) or the
GPUs' counters in millijoules (``*_mj``). ``simulated`` (0/1) says whether the joules came from the
simulated GPU (docs/energy.md) and not from NVML's counters.
"""

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(kw_only=True)
class RequestRow:
    """One request (``requests``): built by ``Work.row`` for every request, whatever became of it."""

    request_id: str
    run_id: str
    batch_id: str | None = None          # the static batch or continuous segment it ran in (None: never ran)
    server_id: str | None = None         # filled in by the store
    received_ns: int
    batch_start_ns: int | None = None    # its batch's start; with --continuous, when it joined
    first_token_ns: int | None = None
    done_ns: int | None = None
    n_prompts: int
    prompt_tokens: int
    output_tokens: int = 0
    energy_j: float = 0.0                # its share of its batch's joules (``attribute``)
    status: str                          # "ok", "running", or how it ended (a gRPC code name)
    error: str | None = None
    simulated: int                       # 0/1
    steps: int = 0                       # decode steps its rows ran: the last, the step it left its batch at (1:
                                         # the prefill's token)
    cancelled_ns: int | None = None      # its call ended early: when the server saw it (``Batcher.cancel``)
    cancelled_step: int | None = None    # ... and the step its rows were at then (``steps`` - this <= 1)


@dataclass(kw_only=True)
class BatchRow:
    """One static batch, or one busy segment of a continuous batch (``batches``)."""

    batch_id: str
    server_id: str | None = None         # filled in by the store
    start_ns: int
    first_token_ns: int
    end_ns: int
    n_requests: int
    n_sequences: int
    prompt_tokens: int
    output_tokens: int                   # (continuous: of the requests answered so far)
    energy_j: float                      # every GPU's joules
    energy_method: str                   # "counter", or "interpolated" when any GPU's was
    simulated: int                       # 0/1


@dataclass(kw_only=True)
class GpuEnergyRow:
    """One GPU's joules over one batch (``batch_gpu_energy``); ``telemetry.EnergyMeter.between`` makes them."""

    batch_id: str
    gpu_uuid: str
    node: str
    rank: int
    energy_start_mj: int
    energy_end_mj: int
    energy_j: float
    method: str                          # "counter" or "interpolated" (sampled power × time)
    simulated: int                       # 0/1


def method_of(rows: list[GpuEnergyRow]) -> str:
    """A batch's energy method: "counter" when every GPU's was, else "interpolated"."""
    return "counter" if all(r.method == "counter" for r in rows) else "interpolated"


def attribute(energy_j: float, tokens: Mapping[K, int]) -> dict[K, float]:
    """The attribution rule (docs/energy.md): ``energy_j`` joules split over requests in proportion to the
    tokens each processed (prompt + output; per interval with --continuous). The shares add up to
    ``energy_j`` (the rounding left over goes to the largest share). With no tokens at all the joules are
    split evenly, so none are lost."""
    if not tokens:
        return {}
    total = sum(tokens.values())
    if total > 0:
        shares = {key: energy_j * n / total for key, n in tokens.items()}
    else:
        shares = {key: energy_j / len(tokens) for key in tokens}
    largest = max(shares, key=shares.__getitem__)
    shares[largest] += energy_j - math.fsum(shares.values())
    return shares
