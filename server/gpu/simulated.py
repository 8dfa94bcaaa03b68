"""The simulated GPU: a power model whose power follows the engine's load and whose clock throttles under a
cap (docs/power-caps.md gives the model, its parameters and the published numbers it was fitted to).
Every number it reports is simulated: its GPUs say ``simulated=True`` and every row they make is marked.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

from llmwatts.errors import InvalidArgument
from llmwatts.server.gpu.common import GPU, ClockReading, GpuSample, LockedClocks, check_lock


@dataclass(frozen=True)
class SimProfile:
    """Parameters of the simulated GPU's power model (docs/power-caps.md, docs/clocks.md). Powers in watts.

    P(n, x) = idle_w + a(n) · (mem_w + core_w · x · v(x)²),  v(x) = max(v_floor, x),  x = f / f_max
    a(0) = 0;  a(n) = min(1, a1 + (1 − a1) · log2(n) / log2(n_sat))
    slowdown(x) = β / x + (1 − β)
    x = min(x_cap, f_lock_max / f_max): a locked clock is a ceiling; the cap still throttles below it.
    """

    label: str
    idle_w: float            # board power with nothing running
    mem_w: float             # load power that does not scale with the SM clock (HBM, fabric)
    core_w: float            # SM power at full activity and f_max
    v_floor: float           # voltage floor as a fraction of V(f_max): below it, P ∝ f only
    compute_fraction: float  # β: share of a decode step that scales with the SM clock
    a1: float                # activity of a single sequence
    n_sat: int               # sequences in flight at which activity saturates
    f_max_mhz: int
    f_min_mhz: int
    default_cap_w: float
    min_cap_w: float
    max_cap_w: float
    memory_total_bytes: int
    mem_clock_mhz: int       # the board's one memory clock (HBM boards list one)
    sm_step_mhz: int = 15    # the ladder of supported SM clocks, f_max down to f_min
    temp_ambient_c: float = 30.0
    temp_c_per_w: float = 0.18

    def activity(self, n_sequences: int) -> float:
        if n_sequences <= 0:
            return 0.0
        return min(1.0, self.a1 + (1.0 - self.a1) * math.log2(n_sequences) / math.log2(self.n_sat))

    def power_w(self, activity: float, clock_ratio: float) -> float:
        voltage = max(self.v_floor, clock_ratio)
        return self.idle_w + activity * (self.mem_w + self.core_w * clock_ratio * voltage * voltage)

    def clock_ratio(self, activity: float, cap_w: float) -> float:
        """The largest f/f_max whose power stays within cap_w, floored at f_min."""
        x_min = self.f_min_mhz / self.f_max_mhz
        if self.power_w(activity, 1.0) <= cap_w:
            return 1.0
        if self.power_w(activity, x_min) >= cap_w:
            return x_min
        low, high = x_min, 1.0  # power is monotone in x: bisect
        for _ in range(50):
            mid = (low + high) / 2
            if self.power_w(activity, mid) <= cap_w:
                low = mid
            else:
                high = mid
        return low

    def slowdown(self, clock_ratio: float) -> float:
        """t(f)/t(f_max) of one engine step."""
        return self.compute_fraction / clock_ratio + (1.0 - self.compute_fraction)

    def supported_clocks_mhz(self) -> dict[int, tuple[int, ...]]:
        return {self.mem_clock_mhz: tuple(range(self.f_max_mhz, self.f_min_mhz - 1, -self.sm_step_mhz))}


GIB = 1024**3
SIM_PROFILES: dict[str, SimProfile] = {
    # A100-class card with a 250 W board limit. mem_w, v_floor and β were fitted so that caps of 175 W
    # and 150 W cost about the time the paper reports (docs/power-caps.md shows the comparison).
    "a100-250w": SimProfile(
        label="Simulated A100 (250 W)", idle_w=50.0, mem_w=30.0, core_w=165.0, v_floor=0.84,
        compute_fraction=0.30, a1=0.6, n_sat=32, f_max_mhz=1410, f_min_mhz=210,
        default_cap_w=250.0, min_cap_w=100.0, max_cap_w=250.0, memory_total_bytes=40 * GIB, mem_clock_mhz=1215,
    ),
    # H100-SXM-class card: same shape, scaled to a 700 W board limit.
    "h100-700w": SimProfile(
        label="Simulated H100 (700 W)", idle_w=70.0, mem_w=60.0, core_w=560.0, v_floor=0.84,
        compute_fraction=0.30, a1=0.6, n_sat=32, f_max_mhz=1980, f_min_mhz=345,
        default_cap_w=700.0, min_cap_w=200.0, max_cap_w=700.0, memory_total_bytes=80 * GIB, mem_clock_mhz=2619,
    ),
}


def sim_profile(name: str) -> SimProfile:
    try:
        return SIM_PROFILES[name]
    except KeyError:
        raise InvalidArgument(f"unknown simulated GPU profile {name!r}; choose one of: {', '.join(SIM_PROFILES)}") from None


def predicted_cap_table(
    profile: str | SimProfile = "a100-250w", caps_w: tuple[float, ...] | None = None, n_sequences: int = 64
) -> list[dict]:
    """The model's steady-state prediction for a GPU kept busy with ``n_sequences`` in flight: per cap
    (default: 100% down to 50% of the default cap), the SM clock, the power drawn, and the change in
    time and energy per unit of work relative to the first cap."""
    p = profile if isinstance(profile, SimProfile) else sim_profile(profile)
    if caps_w is None:
        caps_w = tuple(round(p.default_cap_w * share) for share in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5))
    activity = p.activity(n_sequences)
    rows = []
    for cap_w in caps_w:
        x = p.clock_ratio(activity, cap_w)
        rows.append({"cap_w": cap_w, "sm_clock_mhz": round(x * p.f_max_mhz), "power_w": p.power_w(activity, x),
                     "time": p.slowdown(x), "energy": p.power_w(activity, x) * p.slowdown(x)})
    return _relative_to_first(rows)


def predicted_clock_table(
    profile: str | SimProfile = "h100-700w", clocks_mhz: tuple[int, ...] | None = None, n_sequences: int = 1
) -> list[dict]:
    """As ``predicted_cap_table``, per locked SM clock (default: f_max down to 40% of it) at the
    default cap: the clock the GPU runs at, the power drawn, the change in time and energy per unit of
    work relative to the first row."""
    p = profile if isinstance(profile, SimProfile) else sim_profile(profile)
    ladder = p.supported_clocks_mhz()[p.mem_clock_mhz]
    if clocks_mhz is None:
        clocks_mhz = tuple(min(ladder, key=lambda f: abs(f - p.f_max_mhz * share)) for share in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4))
    activity = p.activity(n_sequences)
    x_cap = p.clock_ratio(activity, p.default_cap_w)
    rows = []
    for lock_mhz in clocks_mhz:
        x = min(x_cap, lock_mhz / p.f_max_mhz)
        rows.append({"lock_mhz": lock_mhz, "sm_clock_mhz": round(x * p.f_max_mhz), "power_w": p.power_w(activity, x),
                     "time": p.slowdown(x), "energy": p.power_w(activity, x) * p.slowdown(x)})
    return _relative_to_first(rows)


def _relative_to_first(rows: list[dict]) -> list[dict]:
    """Turn each row's ``time`` and ``energy`` into % changes against the first row's."""
    time0, energy0 = rows[0]["time"], rows[0]["energy"]
    for row in rows:
        row["time_change_pct"] = 100 * (row.pop("time") / time0 - 1)
        row["energy_change_pct"] = 100 * (row.pop("energy") / energy0 - 1)
    return rows


class SimulatedGPU(GPU):
    """A GPU whose power follows the engine's load and whose clock throttles under a cap or a clock lock.

    The energy counter is the exact integral of the modelled power over (monotonic) wall time: power is
    piecewise constant between load/cap changes, so every change and every read closes a segment.
    """

    simulated = True
    power_source = "simulated"

    def __init__(
        self,
        index: int,
        *,
        node: str,
        rank: int = 0,
        profile: str | SimProfile = "a100-250w",
        clock_ns: Callable[[], int] = time.monotonic_ns,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.profile = profile if isinstance(profile, SimProfile) else sim_profile(profile)
        self.index = index
        self.node = node
        self.rank = rank
        self.uuid = f"SIM-{node}-{index}"
        self.name = self.profile.label
        self.memory_total_bytes = self.profile.memory_total_bytes
        self._clock_ns = clock_ns
        self._sleep = sleep
        self._lock = threading.Lock()
        self._n_sequences = 0
        self._cap_mw = int(self.profile.default_cap_w * 1000)
        self._locked: LockedClocks | None = None
        self._energy_mj = 0.0
        self._last_ns = clock_ns()

    # Model state, all under self._lock.
    def _activity(self) -> float:
        return self.profile.activity(self._n_sequences)

    def _cap_ratio(self) -> float:
        return self.profile.clock_ratio(self._activity(), self._cap_mw / 1000)

    def _lock_ratio(self) -> float:
        return 1.0 if self._locked is None else self._locked.sm_max_mhz / self.profile.f_max_mhz

    def _clock_ratio(self) -> float:
        """The clock the GPU runs at: the locked clock is a ceiling, and the cap throttles below it (a
        real GPU's power cap overrides a clock lock too)."""
        return min(self._cap_ratio(), self._lock_ratio())

    def _event_reasons(self) -> int:
        if self._activity() == 0:
            return 0x001  # idle
        cap_ratio, lock_ratio = self._cap_ratio(), self._lock_ratio()
        if lock_ratio < 1.0 and lock_ratio <= cap_ratio:
            return 0x002  # the lock holds the clock back (NVML reports locks as application clocks)
        return 0x004 if cap_ratio < 1.0 else 0  # the power cap binds

    def _power_w(self) -> float:
        return self.profile.power_w(self._activity(), self._clock_ratio())

    def _advance(self) -> None:
        """Close the current constant-power segment into the energy counter."""
        now_ns = self._clock_ns()
        # W · ns = 1e-9 J = 1e-6 mJ
        self._energy_mj += self._power_w() * (now_ns - self._last_ns) * 1e-6
        self._last_ns = now_ns

    def power_mw(self) -> int:
        with self._lock:
            return int(round(self._power_w() * 1000))

    def slowdown(self) -> float:
        """t(f)/t(f_max) at the current load, cap and clock lock."""
        with self._lock:
            return self.profile.slowdown(self._clock_ratio())

    def sample(self) -> GpuSample:
        with self._lock:
            self._advance()
            activity = self._activity()
            clock_ratio = self._clock_ratio()
            power_w = self.profile.power_w(activity, clock_ratio)
            power_mw = int(round(power_w * 1000))
            return GpuSample(
                ts_ns=time.time_ns(),
                power_mw=power_mw,
                power_instant_mw=power_mw,
                energy_mj=int(self._energy_mj),
                sm_pct=100.0 * activity,
                # Decode streams weights and KV cache: the memory controller stays busier than the SMs
                # at small batches. A rough shape, not a calibrated one.
                mem_pct=100.0 * min(1.0, 0.3 + 0.7 * activity) if activity > 0 else 0.0,
                mem_used_bytes=GIB + self._n_sequences * 64 * 1024**2,
                sm_clock_mhz=int(round(clock_ratio * self.profile.f_max_mhz)),
                temp_c=self.profile.temp_ambient_c + self.profile.temp_c_per_w * power_w,
                cap_mw=self._cap_mw,
                mem_clock_mhz=self.profile.mem_clock_mhz if activity > 0 else 405,  # HBM idles at a low clock
                clock_event_reasons=self._event_reasons(),
            )

    def clocks(self) -> ClockReading:
        with self._lock:
            active = self._activity() > 0
            return ClockReading(
                sm_mhz=int(round(self._clock_ratio() * self.profile.f_max_mhz)),
                mem_mhz=self.profile.mem_clock_mhz if active else 405, sm_max_mhz=self.profile.f_max_mhz,
                mem_max_mhz=self.profile.mem_clock_mhz, event_reasons=self._event_reasons())

    def supported_clocks_mhz(self) -> dict[int, tuple[int, ...]]:
        return self.profile.supported_clocks_mhz()

    def locked_clocks(self) -> LockedClocks | None:
        with self._lock:
            return self._locked

    def set_locked_clocks(self, lock: LockedClocks | None) -> None:
        if lock is not None:
            check_lock(lock, self.supported_clocks_mhz(), f"GPU {self.index} ({self.uuid})")
        with self._lock:
            if lock == self._locked:
                return
            self._advance()
            self._locked = lock

    def energy_mj(self) -> int:
        with self._lock:
            self._advance()
            return int(self._energy_mj)

    def power_limit_mw(self) -> int:
        with self._lock:
            return self._cap_mw

    enforced_power_limit_mw = power_limit_mw

    def default_power_limit_mw(self) -> int:
        return int(self.profile.default_cap_w * 1000)

    def power_limit_constraints_mw(self) -> tuple[int, int]:
        return int(self.profile.min_cap_w * 1000), int(self.profile.max_cap_w * 1000)

    def set_power_limit_mw(self, limit_mw: int) -> None:
        limit_mw = int(limit_mw)
        low_mw, high_mw = self.power_limit_constraints_mw()
        if not low_mw <= limit_mw <= high_mw:
            raise InvalidArgument(
                f"GPU {self.index} ({self.uuid}): power limit {limit_mw / 1000:g} W is outside "
                f"[{low_mw / 1000:g}, {high_mw / 1000:g}] W"
            )
        with self._lock:
            if limit_mw == self._cap_mw:
                return
            self._advance()
            self._cap_mw = limit_mw

    def set_load(self, n_sequences: int) -> None:
        with self._lock:
            self._advance()
            self._n_sequences = max(0, int(n_sequences))

    def pace(self, busy_s: float) -> None:
        extra_s = busy_s * (self.slowdown() - 1.0)
        if extra_s > 0:
            self._sleep(extra_s)
