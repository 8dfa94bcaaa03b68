"""Power-cap control: the power cap as a ``Setting`` of the leased-setting manager (gpu_settings.py), so
a cap is validated, leased, persisted and always restored (docs/power-caps.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmwatts.errors import InvalidArgument, ReadOnlyPowerError
from llmwatts.server.gpu import GPU
from llmwatts.server.gpu_settings import STATE_VERSION, Setting, SettingManager

__all__ = ["CapStatus", "POWER_CAP", "PowerCapManager", "STATE_VERSION", "caps_reply"]


@dataclass(frozen=True)
class CapStatus:
    """One GPU's power cap, mirroring proto ``GpuPowerCap``. Watts; ``lease_end_ns`` 0 = no lease."""

    uuid: str
    index: int
    rank: int
    node: str
    cap_w: float
    default_w: float
    min_w: float
    max_w: float
    enforced_w: float
    lease_end_ns: int
    simulated: bool


def caps_reply(statuses: list[CapStatus], backend: str):
    """A ``llmwatts.v1.PowerCapsReply`` for the statuses."""
    from llmwatts.v1 import llmwatts_pb2

    return llmwatts_pb2.PowerCapsReply(
        gpus=[
            llmwatts_pb2.GpuPowerCap(
                uuid=s.uuid, index=s.index, rank=s.rank, node=s.node, cap_w=s.cap_w, default_w=s.default_w,
                min_w=s.min_w, max_w=s.max_w, enforced_w=s.enforced_w, lease_end_ns=s.lease_end_ns,
                simulated=s.simulated,
            )
            for s in statuses
        ],
        backend=backend,
    )


class PowerCap(Setting[int]):
    """The power limit, milliwatts; requests in watts. Events: ``cap_events`` (old_cap_w, new_cap_w)."""

    noun = "power cap"
    state_key = "original_mw"
    fix_hint = "check the caps with `llmwatts cap get` or nvidia-smi -q -d POWER"

    def read(self, g: GPU) -> int:
        return g.power_limit_mw()

    def write(self, g: GPU, value: int) -> None:
        g.set_power_limit_mw(value)

    def validate(self, cap_w, gpus: list[GPU]) -> int:
        try:
            cap_w = float(cap_w)
        except (TypeError, ValueError):
            raise InvalidArgument(f"cap_w must be a number of watts, got {cap_w!r}") from None
        low_mw = max(g.power_limit_constraints_mw()[0] for g in gpus)
        high_mw = min(g.power_limit_constraints_mw()[1] for g in gpus)
        allowed = f"[{low_mw / 1000:g}, {high_mw / 1000:g}] W"
        if low_mw > high_mw:
            raise InvalidArgument("the selected GPUs share no power-limit range; cap them in separate calls")
        if not math.isfinite(cap_w) or cap_w <= 0:
            raise InvalidArgument(f"cap_w {cap_w!r} is not a power limit; give watts in {allowed}")
        cap_mw = int(round(cap_w * 1000))
        if not low_mw <= cap_mw <= high_mw:
            raise InvalidArgument(f"cap_w {cap_w:g} is outside the allowed range {allowed} of the selected GPUs")
        return cap_mw

    def read_only_error(self) -> ReadOnlyPowerError:
        return ReadOnlyPowerError(
            "power caps are read-only on this server (power backend nvml-readonly, used on shared GPUs); "
            "start it with --power-backend nvml on GPUs you own, or --power-backend simulated")

    def encode(self, value: int) -> int:
        return int(value)

    def decode(self, obj) -> int:
        if isinstance(obj, bool) or not isinstance(obj, (int, float)):
            raise ValueError(f"not milliwatts: {obj!r}")
        return int(obj)

    def event(self, g: GPU, old: int, new: int) -> dict:
        return {"old_cap_w": old / 1000, "new_cap_w": new / 1000}

    def describe(self, value: int) -> str:
        return f"{value / 1000:g} W"

    def status(self, g: GPU, lease_end_ns: int) -> CapStatus:
        low_mw, high_mw = g.power_limit_constraints_mw()
        return CapStatus(
            uuid=g.uuid, index=g.index, rank=g.rank, node=g.node,
            cap_w=g.power_limit_mw() / 1000, default_w=g.default_power_limit_mw() / 1000,
            min_w=low_mw / 1000, max_w=high_mw / 1000, enforced_w=g.enforced_power_limit_mw() / 1000,
            lease_end_ns=lease_end_ns, simulated=g.simulated,
        )


POWER_CAP = PowerCap()


class PowerCapManager(SettingManager[int]):
    """Sets, leases, persists and restores GPU power caps: ``set(selector, cap_w, lease_s, who, reason)``.

    ``record_event`` gets one dict per change with the ``cap_events`` columns (ts_ns, gpu_uuid, node,
    rank, kind, old_cap_w, new_cap_w, who, reason).
    """

    def __init__(self, gpus: list[GPU], backend: str, *, state_path: Path, record_event: Callable[[dict], None],
                 **kwargs):
        super().__init__(POWER_CAP, gpus, backend, state_path=state_path, record_event=record_event, **kwargs)
