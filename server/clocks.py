"""Locked GPU clocks: the clock lock as a ``Setting`` of the leased-setting manager (gpu_settings.py), so a
lock is validated against NVML's supported clocks, leased, persisted and always restored, as power caps
are (docs/clocks.md).

The original value of a GPU is "no lock" (``None``): NVML has no reader for locked clocks, so the
manager restores by resetting them (``nvmlDeviceResetGpuLockedClocks``, and the memory lock where the
board has one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmwatts.errors import InvalidArgument, ReadOnlyPowerError
from llmwatts.server.gpu import GPU, LockedClocks, clock_event_names
from llmwatts.server.gpu.common import check_lock
from llmwatts.server.gpu_settings import Setting, SettingManager

Lock = LockedClocks | None


@dataclass(frozen=True)
class ClockStatus:
    """One GPU's clocks, mirroring proto ``GpuClocks``. MHz; ``locked`` None = no lock held here."""

    uuid: str
    index: int
    rank: int
    node: str
    sm_mhz: int
    mem_mhz: int
    sm_max_mhz: int
    mem_max_mhz: int
    locked: LockedClocks | None
    supported: dict[int, tuple[int, ...]]   # memory MHz -> SM MHz, highest first
    event_reasons: list[str]
    lease_end_ns: int
    simulated: bool


def clocks_reply(statuses: list[ClockStatus], backend: str):
    """A ``llmwatts.v1.ClocksReply`` for the statuses."""
    from llmwatts.v1 import llmwatts_pb2 as pb

    def gpu(s: ClockStatus):
        lock = s.locked or LockedClocks(0, 0)
        return pb.GpuClocks(
            uuid=s.uuid, index=s.index, rank=s.rank, node=s.node, sm_mhz=s.sm_mhz, mem_mhz=s.mem_mhz,
            sm_max_mhz=s.sm_max_mhz, mem_max_mhz=s.mem_max_mhz, locked_sm_min_mhz=lock.sm_min_mhz,
            locked_sm_max_mhz=lock.sm_max_mhz, locked_mem_min_mhz=lock.mem_min_mhz,
            locked_mem_max_mhz=lock.mem_max_mhz,
            supported=[pb.SupportedClocks(mem_mhz=m, sm_mhz=list(sm)) for m, sm in s.supported.items()],
            event_reasons=s.event_reasons, lease_end_ns=s.lease_end_ns, simulated=s.simulated)

    return pb.ClocksReply(gpus=[gpu(s) for s in statuses], backend=backend)


class ClockLock(Setting[Lock]):
    """The locked clock range (None: none). Events: ``clock_events`` (old/new sm and memory MHz, NULL when
    unlocked)."""

    noun = "clock lock"
    state_key = "original_clocks"
    fix_hint = "check the clocks with `llmwatts clocks get` or nvidia-smi -q -d CLOCK"

    def read(self, g: GPU) -> Lock:
        return g.locked_clocks()

    def write(self, g: GPU, value: Lock) -> None:
        g.set_locked_clocks(value)

    def validate(self, lock, gpus: list[GPU]) -> LockedClocks:
        if not isinstance(lock, LockedClocks):
            raise InvalidArgument(f"a clock lock needs SM min and max MHz, got {lock!r}")
        for g in gpus:
            check_lock(lock, g.supported_clocks_mhz(), f"GPU {g.rank}:{g.index} ({g.uuid})")
        return lock

    def read_only_error(self) -> ReadOnlyPowerError:
        return ReadOnlyPowerError(
            "clocks are read-only on this server (power backend nvml-readonly, used on shared GPUs): "
            "`llmwatts clocks get` works, setting does not; start it with --power-backend nvml on GPUs you "
            "own, or --power-backend simulated")

    def encode(self, value: Lock):
        return None if value is None else [value.sm_min_mhz, value.sm_max_mhz, value.mem_min_mhz, value.mem_max_mhz]

    def decode(self, obj) -> Lock:
        if obj is None:
            return None
        if not (isinstance(obj, list) and len(obj) == 4 and all(type(v) is int and v >= 0 for v in obj)):
            raise ValueError(f"not a clock lock: {obj!r}")
        return LockedClocks(*obj)

    def event(self, g: GPU, old: Lock, new: Lock) -> dict:
        row = {}
        for prefix, value in (("old", old), ("new", new)):
            for field in ("sm_min_mhz", "sm_max_mhz", "mem_min_mhz", "mem_max_mhz"):
                v = None if value is None else getattr(value, field)
                row[f"{prefix}_{field}"] = v or None if field.startswith("mem") else v
        return row

    def describe(self, value: Lock) -> str:
        return "unlocked" if value is None else value.describe()

    def status(self, g: GPU, lease_end_ns: int) -> ClockStatus:
        now = g.clocks()
        return ClockStatus(
            uuid=g.uuid, index=g.index, rank=g.rank, node=g.node, sm_mhz=now.sm_mhz, mem_mhz=now.mem_mhz,
            sm_max_mhz=now.sm_max_mhz, mem_max_mhz=now.mem_max_mhz, locked=g.locked_clocks(),
            supported=g.supported_clocks_mhz(), event_reasons=clock_event_names(now.event_reasons),
            lease_end_ns=lease_end_ns, simulated=g.simulated)


CLOCK_LOCK = ClockLock()


class ClockManager(SettingManager[Lock]):
    """Locks, leases, persists and restores GPU clocks: ``set(selector, LockedClocks(...), lease_s, who,
    reason)``; ``reset`` and every restore unlock them. ``record_event`` gets ``clock_events`` rows."""

    def __init__(self, gpus: list[GPU], backend: str, *, state_path: Path, record_event: Callable[[dict], None],
                 **kwargs):
        super().__init__(CLOCK_LOCK, gpus, backend, state_path=state_path, record_event=record_event, **kwargs)
