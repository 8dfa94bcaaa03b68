"""The GPU interface every backend implements, the records it returns, and lockstep pacing.

After Zeus ``zeus/device/gpu/common.py``: units in every name (``power_mw``, ``energy_mj``); backends turn
vendor errors into the project exceptions of ``llmwatts.errors`` (``ReadOnlyPowerError``,
``PermissionDenied``, ``InvalidArgument``, ``Unavailable``) at their edge, ``raise ... from e``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from llmwatts.errors import InvalidArgument


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
    mem_clock_mhz: int = 0
    clock_event_reasons: int = 0   # NVML's clock-event (throttle) reason bits: CLOCK_EVENT_REASONS


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


# NVML's clock-event ("throttle") reason bits (nvmlClocksEventReason*), by the name the telemetry shows.
CLOCK_EVENT_REASONS: dict[int, str] = {
    0x001: "idle",
    0x002: "applications_clocks",  # application clocks, or clocks locked by SetLockedClocks
    0x004: "sw_power_cap",         # the power cap binds
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal",
    0x040: "hw_thermal",
    0x080: "hw_power_brake",
    0x100: "display_clocks",
}


def clock_event_names(mask: int) -> list[str]:
    """The names of the reason bits set in ``mask`` (unknown bits as hex)."""
    names = [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]
    unknown = mask & ~sum(CLOCK_EVENT_REASONS)
    return names + ([f"0x{unknown:x}"] if unknown else [])


@dataclass(frozen=True)
class LockedClocks:
    """A locked clock range, MHz. ``min == max`` pins the clock. Memory 0/0 leaves the memory clock alone
    (few boards support memory locks: H100 and A100 have one memory clock)."""

    sm_min_mhz: int
    sm_max_mhz: int
    mem_min_mhz: int = 0
    mem_max_mhz: int = 0

    def describe(self) -> str:
        mem = f", memory {self.mem_min_mhz}-{self.mem_max_mhz} MHz" if self.mem_max_mhz else ""
        return f"SM {self.sm_min_mhz}-{self.sm_max_mhz} MHz{mem}"


@dataclass(frozen=True)
class ClockReading:
    """A GPU's clocks now, MHz, and the clock-event reason bits (``CLOCK_EVENT_REASONS``)."""

    sm_mhz: int
    mem_mhz: int
    sm_max_mhz: int
    mem_max_mhz: int
    event_reasons: int


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

    @abc.abstractmethod
    def clocks(self) -> ClockReading:
        """Current and maximum SM and memory clocks, and why the clocks are held back now."""

    @abc.abstractmethod
    def supported_clocks_mhz(self) -> dict[int, tuple[int, ...]]:
        """NVML's supported clocks: memory MHz -> the SM MHz supported with it (highest first)."""

    @abc.abstractmethod
    def locked_clocks(self) -> LockedClocks | None:
        """The clock lock this process set (None: none). NVML has no reader for locked clocks, so a lock
        set by someone else is not seen; a fresh server assumes none."""

    @abc.abstractmethod
    def set_locked_clocks(self, lock: LockedClocks | None) -> None:
        """Lock the clocks to ``lock``'s ranges, or reset them to the driver's default (None). A lock that
        already holds is a no-op; a reset always runs (the driver may hold a lock nobody here set).

        Raises ``ReadOnlyPowerError`` on read-only backends, ``PermissionDenied`` without privilege,
        ``InvalidArgument`` for clocks the GPU does not support.
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


def format_mhz(values: tuple[int, ...] | list[int], most: int = 40) -> str:
    """A supported-clock list for a message: an even ladder as its ends and step, else the values
    (at most ``most``, then how many more)."""
    values = sorted(set(values), reverse=True)
    steps = {a - b for a, b in zip(values, values[1:])}
    if len(values) >= 4 and len(steps) == 1:
        return f"{values[0]} down to {values[-1]} MHz in steps of {steps.pop()} MHz ({len(values)} values)"
    shown = ", ".join(str(v) for v in values[:most])
    return f"{shown} MHz" + (f" (and {len(values) - most} more)" if len(values) > most else "")


def check_lock(lock: LockedClocks, supported: dict[int, tuple[int, ...]], where: str) -> None:
    """Refuse (``InvalidArgument``, naming the supported clocks) a lock ``supported`` does not allow:
    SM clocks must be ones NVML lists for the locked memory clock (the highest one when memory is left
    alone), memory clocks ones it lists at all."""
    if not supported:
        raise InvalidArgument(f"{where}: the GPU reports no supported clocks; it cannot lock them")
    if not 0 < lock.sm_min_mhz <= lock.sm_max_mhz:
        raise InvalidArgument(f"{where}: SM clocks {lock.sm_min_mhz}-{lock.sm_max_mhz} MHz are not a range; "
                              "give 0 < min <= max (min = max pins the clock)")
    mem_mhz = max(supported)
    if lock.mem_min_mhz or lock.mem_max_mhz:
        if not 0 < lock.mem_min_mhz <= lock.mem_max_mhz:
            raise InvalidArgument(f"{where}: memory clocks {lock.mem_min_mhz}-{lock.mem_max_mhz} MHz are not a "
                                  "range; give 0 < min <= max, or 0 and 0 to leave the memory clock alone")
        bad = [m for m in (lock.mem_min_mhz, lock.mem_max_mhz) if m not in supported]
        if bad:
            raise InvalidArgument(f"{where}: memory clock {bad[0]} MHz is not supported; supported memory "
                                  f"clocks: {format_mhz(tuple(supported))}")
        mem_mhz = lock.mem_max_mhz
    sm = supported[mem_mhz]
    bad = [f for f in (lock.sm_min_mhz, lock.sm_max_mhz) if f not in sm]
    if bad:
        raise InvalidArgument(f"{where}: SM clock {bad[0]} MHz is not supported; supported SM clocks at memory "
                              f"{mem_mhz} MHz: {format_mhz(sm)}")
