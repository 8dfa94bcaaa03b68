"""The GPU seam, after Zeus ``zeus/device/gpu/``: one interface (common.py), its backends (nvml.py,
simulated.py, and remote.py for another rank's GPU) and one factory, ``open_gpus``.

Backends (``power_source``):

- ``nvml``: reads and may set power limits and locked clocks (needs root or CAP_SYS_ADMIN to set).
- ``nvml-readonly``: reads everything (clocks, supported clocks, clock-event reasons included); its GPU
  class has no code path to an NVML setter. Shared or lent
  GPUs must run this backend (``auto`` picks it when NVML finds a GPU).
- ``simulated``: ``SimulatedGPU``, a power model whose power follows the engine's load and whose clock
  throttles under a cap or a clock lock (docs/power-caps.md and docs/clocks.md describe the model).
"""

from __future__ import annotations

import logging

from llmwatts.errors import FailedPrecondition, InvalidArgument, Unavailable
from llmwatts.server.gpu.common import (
    CLOCK_EVENT_REASONS,
    GPU,
    ClockReading,
    EnergySample,
    GpuSample,
    LockedClocks,
    clock_event_names,
    pace_slowest,
)
from llmwatts.server.gpu.nvml import NvmlGPU, NvmlReadOnlyGPU, nvml_index_of_cuda_device, nvml_init
from llmwatts.server.gpu.simulated import (
    SIM_PROFILES,
    SimProfile,
    SimulatedGPU,
    predicted_cap_table,
    predicted_clock_table,
    sim_profile,
)

__all__ = [
    "BACKENDS", "CLOCK_EVENT_REASONS", "GPU", "ClockReading", "EnergySample", "GpuSample", "LockedClocks",
    "clock_event_names", "predicted_clock_table", "NvmlGPU", "NvmlReadOnlyGPU", "SIM_PROFILES", "SimProfile",
    "SimulatedGPU", "nvml_index_of_cuda_device", "open_gpus", "pace_slowest", "power_source",
    "predicted_cap_table", "sim_profile",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nvml", "nvml-readonly", "simulated")


def open_gpus(
    backend: str = "auto",
    *,
    node: str,
    rank: int = 0,
    sim_gpus: int = 1,
    sim_profile: str = "a100-250w",
    device_indices: list[int] | None = None,
) -> list[GPU]:
    """Open this rank's GPUs. ``auto`` → ``nvml-readonly`` when NVML initialises and sees a GPU, else
    ``simulated`` (setting caps on real GPUs needs the explicit ``nvml`` backend).

    ``device_indices``: NVML indices to open (default: all visible); for ``simulated``, the indices
    to give the simulated GPUs (default ``range(sim_gpus)``).
    """
    if backend not in BACKENDS:
        raise InvalidArgument(f"unknown power backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    count = None
    if backend == "auto":
        try:
            count = nvml_init()
        except Unavailable as e:
            log.info("no NVML (%s); using simulated GPUs", e)
            count = 0
        backend = "nvml-readonly" if count > 0 else "simulated"
    if backend == "simulated":
        indices = list(device_indices) if device_indices is not None else list(range(sim_gpus))
        if not indices:
            raise InvalidArgument("simulated backend needs at least one GPU (sim_gpus ≥ 1)")
        return [SimulatedGPU(i, node=node, rank=rank, profile=sim_profile) for i in indices]
    if count is None:
        count = nvml_init()
    if count == 0:
        raise Unavailable(f"NVML sees no GPU on {node}; use --power-backend simulated")
    indices = list(device_indices) if device_indices is not None else list(range(count))
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise InvalidArgument(f"GPU indices {bad} do not exist on {node}; NVML sees 0..{count - 1}")
    cls = NvmlGPU if backend == "nvml" else NvmlReadOnlyGPU
    return [cls(i, node=node, rank=rank) for i in indices]


def power_source(gpus: list[GPU]) -> str:
    """The backend of a GPU list: "nvml", "nvml-readonly" or "simulated" (mixed lists are refused)."""
    sources = {g.power_source for g in gpus}
    if len(sources) != 1:
        raise FailedPrecondition(f"GPUs of mixed power sources {sorted(sources)}; use one backend on every rank")
    return sources.pop()
