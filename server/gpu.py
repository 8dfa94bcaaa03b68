"""The GPU seam: an abstract ``GPU``, an NVML implementation, a simulated one, and one factory.

After Zeus ``zeus/device/gpu/{common,nvidia}.py``: units in every name (``power_mw``, ``energy_mj``),
NVML errors become project exceptions at the edge (``raise ... from e``), and privileged setters are a
no-op when the value already holds.

Backends (``power_source``):

- ``nvml``: reads and may set power limits (needs root or CAP_SYS_ADMIN to set).
- ``nvml-readonly``: reads everything; its GPU class has no code path to an NVML setter. Shared or lent
  GPUs must run this backend (``auto`` picks it when NVML finds a GPU).
- ``simulated``: ``SimulatedGPU``, a power model whose power follows the engine's load and whose clock
  throttles under a cap (docs/power-caps.md describes the model and its parameters).
"""

from __future__ import annotations

import abc
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from llmwatts.errors import (
    FailedPrecondition,
    InvalidArgument,
    LlmwattsError,
    PermissionDenied,
    ReadOnlyPowerError,
    Unavailable,
)

try:  # nvidia-ml-py; absent on some CPU-only installs
    import pynvml
except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency
    pynvml = None

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nvml", "nvml-readonly", "simulated")
_PERMISSION_FIX = (
    "setting a GPU power limit needs root or CAP_SYS_ADMIN: run the server as root, or grant the "
    "capability (sudo setcap cap_sys_admin+ep $(readlink -f $(which python))); on shared or lent GPUs "
    "use --power-backend nvml-readonly instead"
)


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


class GPU(abc.ABC):
    """One GPU. Implementations: ``NvmlGPU``, ``NvmlReadOnlyGPU``, ``SimulatedGPU`` (and rank proxies)."""

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


# ---------------------------------------------------------------------------------------------------
# NVML
# ---------------------------------------------------------------------------------------------------


def _nvml_error(e: Exception, what: str) -> LlmwattsError:
    """Map an NVMLError onto a project exception (the caller raises it ``from e``)."""
    code = getattr(e, "value", None)
    if pynvml is not None and code == pynvml.NVML_ERROR_NO_PERMISSION:
        return PermissionDenied(f"{what}: NVML says no permission; {_PERMISSION_FIX}")
    if pynvml is not None and code == pynvml.NVML_ERROR_NOT_SUPPORTED:
        return FailedPrecondition(f"{what}: not supported by this GPU or driver ({e})")
    if pynvml is not None and code == pynvml.NVML_ERROR_INVALID_ARGUMENT:
        return InvalidArgument(f"{what}: NVML rejected the value ({e})")
    return Unavailable(f"{what}: NVML error: {e}")


def _field_value(field) -> int | float:
    """The value of an ``nvmlFieldValue_t`` by its valueType."""
    kind = field.valueType
    value = field.value
    if kind == pynvml.NVML_VALUE_TYPE_DOUBLE:
        return value.dVal
    if kind == pynvml.NVML_VALUE_TYPE_UNSIGNED_INT:
        return value.uiVal
    if kind == pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG:
        return value.ulVal
    if kind == pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG:
        return value.ullVal
    if kind == pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG:
        return value.sllVal
    return value.uiVal


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlReadOnlyGPU(GPU):
    """A GPU read through NVML. This class (backend ``nvml-readonly``) never calls an NVML setter:
    ``set_power_limit_mw`` raises ``ReadOnlyPowerError``. ``NvmlGPU`` adds the setter."""

    simulated = False
    power_source = "nvml-readonly"

    def __init__(self, index: int, *, node: str, rank: int = 0):
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.uuid = _text(pynvml.nvmlDeviceGetUUID(self._handle))
            self.name = _text(pynvml.nvmlDeviceGetName(self._handle))
            self.memory_total_bytes = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).total)
        except pynvml.NVMLError as e:
            raise _nvml_error(e, f"opening GPU {index}") from e
        self.index = index
        self.node = node
        self.rank = rank
        # Probed once: drivers that lack the field fail per call, and a failing call costs time.
        self._has_power_instant = self._read_power_instant_mw() is not None

    def _call(self, what: str, fn: Callable, *args):
        try:
            return fn(self._handle, *args)
        except pynvml.NVMLError as e:
            raise _nvml_error(e, f"GPU {self.index} ({self.uuid}): {what}") from e

    def _read_power_instant_mw(self) -> int | None:
        try:
            (field,) = pynvml.nvmlDeviceGetFieldValues(self._handle, [pynvml.NVML_FI_DEV_POWER_INSTANT])
        except (pynvml.NVMLError, AttributeError, ValueError):
            return None
        if field.nvmlReturn != pynvml.NVML_SUCCESS:
            return None
        return int(_field_value(field))

    def sample(self) -> GpuSample:
        ts_ns = time.time_ns()
        utilization = self._call("utilization", pynvml.nvmlDeviceGetUtilizationRates)
        return GpuSample(
            ts_ns=ts_ns,
            power_mw=int(self._call("power usage", pynvml.nvmlDeviceGetPowerUsage)),
            power_instant_mw=self._read_power_instant_mw() if self._has_power_instant else None,
            energy_mj=self.energy_mj(),
            sm_pct=float(utilization.gpu),
            mem_pct=float(utilization.memory),
            mem_used_bytes=int(self._call("memory info", pynvml.nvmlDeviceGetMemoryInfo).used),
            sm_clock_mhz=int(self._call("SM clock", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM)),
            temp_c=float(self._call("temperature", pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU)),
            cap_mw=self.enforced_power_limit_mw(),
        )

    def energy_mj(self) -> int:
        return int(self._call("total energy", pynvml.nvmlDeviceGetTotalEnergyConsumption))

    def energy_sample(self) -> EnergySample:
        # Three reads instead of sample()'s eight: the energy counter (~4 ms on an H100) and power (µs).
        return EnergySample(time.time_ns(), self.energy_mj(),
                            int(self._call("power usage", pynvml.nvmlDeviceGetPowerUsage)),
                            self._read_power_instant_mw() if self._has_power_instant else None)

    def power_limit_mw(self) -> int:
        return int(self._call("power limit", pynvml.nvmlDeviceGetPowerManagementLimit))

    def enforced_power_limit_mw(self) -> int:
        return int(self._call("enforced power limit", pynvml.nvmlDeviceGetEnforcedPowerLimit))

    def default_power_limit_mw(self) -> int:
        return int(self._call("default power limit", pynvml.nvmlDeviceGetPowerManagementDefaultLimit))

    def power_limit_constraints_mw(self) -> tuple[int, int]:
        low_mw, high_mw = self._call("power limit constraints", pynvml.nvmlDeviceGetPowerManagementLimitConstraints)
        return int(low_mw), int(high_mw)

    def set_power_limit_mw(self, limit_mw: int) -> None:
        raise ReadOnlyPowerError(
            f"GPU {self.index} ({self.uuid}) is read-only (power backend nvml-readonly): power limits "
            "are not changed on shared GPUs; start the server with --power-backend nvml on a GPU you own "
            "(as root or with CAP_SYS_ADMIN), or use --power-backend simulated"
        )


class NvmlGPU(NvmlReadOnlyGPU):
    """A GPU read and capped through NVML (backend ``nvml``)."""

    power_source = "nvml"

    def set_power_limit_mw(self, limit_mw: int) -> None:
        limit_mw = int(limit_mw)
        if self.power_limit_mw() == limit_mw:  # Zeus: no privileged call when the value already holds
            return
        low_mw, high_mw = self.power_limit_constraints_mw()
        if not low_mw <= limit_mw <= high_mw:
            raise InvalidArgument(
                f"GPU {self.index} ({self.uuid}): power limit {limit_mw / 1000:g} W is outside "
                f"[{low_mw / 1000:g}, {high_mw / 1000:g}] W"
            )
        self._call("set power limit", pynvml.nvmlDeviceSetPowerManagementLimit, limit_mw)


def _nvml_init() -> int:
    """Initialise NVML; the number of visible GPUs. Raises ``Unavailable`` when NVML is missing."""
    if pynvml is None:
        raise Unavailable("NVML is not available: install nvidia-ml-py")
    try:
        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except pynvml.NVMLError as e:
        raise Unavailable(f"NVML did not initialise ({e}); is an NVIDIA driver installed?") from e


def pace_slowest(gpus: list[GPU], busy_s: float) -> None:
    """After a lockstep step of ``busy_s`` seconds: the most throttled GPU sets everyone's pace."""
    if gpus:
        max(gpus, key=lambda g: g.slowdown()).pace(busy_s)


def nvml_index_of_cuda_device(cuda_index: int) -> int:
    """The NVML index of torch's ``cuda:<cuda_index>``. NVML lists every GPU of the node in PCI order and
    ignores ``CUDA_VISIBLE_DEVICES`` (numbers or UUIDs) and ``CUDA_DEVICE_ORDER``; the UUID is what both
    agree on. Falls back to the first visible number, then to the index itself, when no UUID matches."""
    import torch

    count = _nvml_init()
    try:
        torch_uuid = str(torch.cuda.get_device_properties(cuda_index).uuid).lower()
    except (RuntimeError, AttributeError, AssertionError):
        torch_uuid = ""
    if torch_uuid:
        for i in range(count):
            try:
                nvml_uuid = _text(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))).lower()
            except pynvml.NVMLError:
                continue
            if nvml_uuid.removeprefix("gpu-") == torch_uuid.removeprefix("gpu-"):
                return i
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if cuda_index < len(visible) and visible[cuda_index].strip().isdigit():
        return int(visible[cuda_index])
    return cuda_index


# ---------------------------------------------------------------------------------------------------
# Simulated
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimProfile:
    """Parameters of the simulated GPU's power model (docs/power-caps.md). Powers in watts.

    P(n, x) = idle_w + a(n) · (mem_w + core_w · x · v(x)²),  v(x) = max(v_floor, x),  x = f / f_max
    a(0) = 0;  a(n) = min(1, a1 + (1 − a1) · log2(n) / log2(n_sat))
    slowdown(x) = β / x + (1 − β)
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


GIB = 1024**3
SIM_PROFILES: dict[str, SimProfile] = {
    # A100-class card with a 250 W board limit. mem_w, v_floor and β were fitted so that caps of 175 W
    # and 150 W cost about the time the paper reports (docs/power-caps.md shows the comparison).
    "a100-250w": SimProfile(
        label="Simulated A100 (250 W)", idle_w=50.0, mem_w=30.0, core_w=165.0, v_floor=0.84,
        compute_fraction=0.30, a1=0.6, n_sat=32, f_max_mhz=1410, f_min_mhz=210,
        default_cap_w=250.0, min_cap_w=100.0, max_cap_w=250.0, memory_total_bytes=40 * GIB,
    ),
    # H100-SXM-class card: same shape, scaled to a 700 W board limit.
    "h100-700w": SimProfile(
        label="Simulated H100 (700 W)", idle_w=70.0, mem_w=60.0, core_w=560.0, v_floor=0.84,
        compute_fraction=0.30, a1=0.6, n_sat=32, f_max_mhz=1980, f_min_mhz=345,
        default_cap_w=700.0, min_cap_w=200.0, max_cap_w=700.0, memory_total_bytes=80 * GIB,
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
    time0, energy0 = rows[0]["time"], rows[0]["energy"]
    for row in rows:
        row["time_change_pct"] = 100 * (row.pop("time") / time0 - 1)
        row["energy_change_pct"] = 100 * (row.pop("energy") / energy0 - 1)
    return rows


class SimulatedGPU(GPU):
    """A GPU whose power follows the engine's load and whose clock throttles under a cap.

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
        self._energy_mj = 0.0
        self._last_ns = clock_ns()

    # Model state, all under self._lock.
    def _activity(self) -> float:
        return self.profile.activity(self._n_sequences)

    def _clock_ratio(self) -> float:
        return self.profile.clock_ratio(self._activity(), self._cap_mw / 1000)

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
        """t(f)/t(f_max) at the current load and cap."""
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
            )

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


# ---------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------


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
            count = _nvml_init()
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
        count = _nvml_init()
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


if __name__ == "__main__":  # python -m llmwatts.server.gpu [profile]: the model's predicted cap table
    import sys

    print("| cap W | SM clock MHz | power W | time | energy |\n|---|---|---|---|---|")
    for row in predicted_cap_table(sys.argv[1] if len(sys.argv) > 1 else "a100-250w"):
        print(f"| {row['cap_w']} | {row['sm_clock_mhz']} | {row['power_w']:.0f} | "
              f"{row['time_change_pct']:+.1f}% | {row['energy_change_pct']:+.1f}% |")
