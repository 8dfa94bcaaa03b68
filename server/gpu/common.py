"""The GPU interface every backend implements, the records it returns, and lockstep pacing.

After Zeus ``zeus/device/gpu/common.py``: units in every name (``power_mw``, ``energy_mj``); backends turn
vendor errors into the project exceptions of ``llmwatts.errors`` (``ReadOnlyPowerError``,
``PermissionDenied``, ``InvalidArgument``, ``Unavailable``) at their edge, ``raise ... from e``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSample:
    """One telemetry reading of one GPU. ``power_instant_mw`` is None when the GPU lacks the field."""

    ts_ns: int                     # wall clock, time.time_ns()
    power_mw: int                  # NVML's (averaged) power usage
    power_instant_mw: int | None   # NVML_FI_DEV_POWER_INSTANT (Ampere+ drivers), None when unsupported
    energy_mj: int                 # cumulative energy counter
    sm_pct: float                  # "GPU utilisation": share of time a kernel ran
    mem_pct: float                 # memory-controller busy %
    mem_used_bytes: int
    sm_clock_mhz: int
    temp_c: float
    cap_mw: int                    # enforced power limit


@dataclass(frozen=True)
class EnergySample:
    """What a batch boundary needs of one GPU: the energy counter, and power for short batches."""

    ts_ns: int                     # wall clock, time.time_ns()
    energy_mj: int
    power_mw: int
    power_instant_mw: int | None
    # Set on the reading a rank takes at the end of its own batch (``remote.bracket_batch``): the reading
    # it took when that batch began. The meter then takes the batch's joules from the rank's own pair of
    # reads, so a batch costs no extra round trip to the rank (``EnergyMeter.between``).
    bracket_start: EnergySample | None = None


class GPU(abc.ABC):
    """One GPU. Implementations: ``NvmlGPU``, ``NvmlReadOnlyGPU`` (nvml.py), ``SimulatedGPU`` (simulated.py)
    and ``RemoteGPU`` (remote.py, another rank's GPU)."""

    index: int
    uuid: str
    name: str
    node: str
    rank: int
    simulated: bool
    memory_total_bytes: int
    power_source: str

    @abc.abstractmethod
    def sample(self) -> GpuSample:
        """Read every telemetry field at once."""

    @abc.abstractmethod
    def energy_mj(self) -> int:
        """The cumulative energy counter, millijoules (monotone; zero point arbitrary)."""

    def energy_sample(self) -> EnergySample:
        """The fields a batch boundary reads (``EnergyMeter``); a GPU whose full sample is costly reads
        only these."""
        s = self.sample()
        return EnergySample(s.ts_ns, s.energy_mj, s.power_mw, s.power_instant_mw)

    @abc.abstractmethod
    def power_limit_mw(self) -> int:
        """The power limit currently set, milliwatts."""

    @abc.abstractmethod
    def enforced_power_limit_mw(self) -> int:
        """The limit the GPU enforces (may be below the set one, e.g. under a system-wide cap), mW."""

    @abc.abstractmethod
    def default_power_limit_mw(self) -> int:
        """The board's default power limit, milliwatts."""

    @abc.abstractmethod
    def power_limit_constraints_mw(self) -> tuple[int, int]:
        """(min, max) settable power limit, milliwatts."""

    @abc.abstractmethod
    def set_power_limit_mw(self, limit_mw: int) -> None:
        """Set the power limit, milliwatts. No-op when it already holds.

        Raises ``ReadOnlyPowerError`` on read-only backends, ``PermissionDenied`` without privilege,
        ``InvalidArgument`` outside the constraints.
        """

    def set_load(self, n_sequences: int) -> None:
        """Engine hook: how many sequences are in flight now (0 = idle). Real GPUs ignore it."""

    def pace(self, busy_s: float) -> None:
        """Engine hook after ``busy_s`` seconds of GPU work: a simulated GPU under a binding cap sleeps
        so the work takes as long as the throttled clock needs. Real GPUs return at once."""

    def slowdown(self) -> float:
        """How much longer work takes now than at full clock (1.0: not throttled by us). A real GPU's own
        throttling is already in the time the work took, so it reports 1.0."""
        return 1.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(node={self.node!r}, rank={self.rank}, index={self.index}, uuid={self.uuid!r})"


def pace_slowest(gpus: list[GPU], busy_s: float) -> None:
    """After a lockstep step of ``busy_s`` seconds: the most throttled GPU sets everyone's pace."""
    if gpus:
        max(gpus, key=lambda g: g.slowdown()).pace(busy_s)
