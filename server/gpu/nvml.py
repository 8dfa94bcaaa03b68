"""NVML GPUs: ``NvmlReadOnlyGPU`` (backend ``nvml-readonly``: reads only, no code path to a setter) and
``NvmlGPU`` (backend ``nvml``: also sets, needs root or CAP_SYS_ADMIN). After Zeus
``zeus/device/gpu/nvidia.py``: every NVML error becomes a project exception through one table
(``_NVML_ERRORS``), and a setter is a no-op when the value already holds.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from llmwatts.errors import (
    FailedPrecondition,
    InvalidArgument,
    LlmwattsError,
    NotFound,
    PermissionDenied,
    ReadOnlyPowerError,
    Unavailable,
)
from llmwatts.server.gpu.common import GPU, ClockReading, EnergySample, GpuSample, LockedClocks, check_lock

try:  # nvidia-ml-py; absent on some CPU-only installs
    import pynvml
except ImportError:  # pragma: no cover - nvidia-ml-py is a dependency
    pynvml = None

PERMISSION_FIX = (
    "changing a GPU's power limit or clocks needs root or CAP_SYS_ADMIN: run the server as root, or grant "
    "the capability (sudo setcap cap_sys_admin+ep $(readlink -f $(which python))); on shared or lent GPUs "
    "use --power-backend nvml-readonly instead"
)


# One table: NVML return code -> (project exception, what it means to the user). Anything else is
# Unavailable. Keyed by name so a pynvml without a newer code still imports.
_NVML_ERRORS: dict[str, tuple[type[LlmwattsError], str]] = {
    "NVML_ERROR_NO_PERMISSION": (PermissionDenied, "NVML says no permission; " + PERMISSION_FIX),
    "NVML_ERROR_NOT_SUPPORTED": (FailedPrecondition, "not supported by this GPU or driver"),
    "NVML_ERROR_INVALID_ARGUMENT": (InvalidArgument, "NVML rejected the value"),
    "NVML_ERROR_NOT_FOUND": (NotFound, "NVML found no such GPU"),
    "NVML_ERROR_GPU_IS_LOST": (Unavailable, "the GPU fell off the bus or stopped answering; check dmesg"),
    "NVML_ERROR_UNINITIALIZED": (Unavailable, "NVML is not initialised"),
}


def nvml_error(e: Exception, what: str) -> LlmwattsError:
    """The project exception for an NVMLError (the caller raises it ``from e``), by ``_NVML_ERRORS``."""
    code = getattr(e, "value", None)
    for name, (cls, meaning) in _NVML_ERRORS.items():
        if code is not None and code == getattr(pynvml, name, object()):
            return cls(f"{what}: {meaning} ({e})")
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
    ``set_power_limit_mw`` and ``set_locked_clocks`` raise ``ReadOnlyPowerError``. ``NvmlGPU`` adds the
    setters."""

    simulated = False
    power_source = "nvml-readonly"

    def __init__(self, index: int, *, node: str, rank: int = 0):
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.uuid = _text(pynvml.nvmlDeviceGetUUID(self._handle))
            self.name = _text(pynvml.nvmlDeviceGetName(self._handle))
            self.memory_total_bytes = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).total)
        except pynvml.NVMLError as e:
            raise nvml_error(e, f"opening GPU {index}") from e
        self.index = index
        self.node = node
        self.rank = rank
        # Probed once: drivers that lack the field fail per call, and a failing call costs time.
        self._has_power_instant = self._read_power_instant_mw() is not None
        self._event_reasons_fn = self._probe_event_reasons()
        self._supported: dict[int, tuple[int, ...]] | None = None
        self._locked: LockedClocks | None = None

    def _probe_event_reasons(self) -> Callable | None:
        """NVML's current clock-event reasons call: ``...ClocksEventReasons`` (drivers 535+), else the older
        ``...ClocksThrottleReasons``, else None (reported as 0)."""
        for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
            fn = getattr(pynvml, name, None)
            if fn is None:
                continue
            try:
                fn(self._handle)
            except pynvml.NVMLError:
                continue
            return fn
        return None

    def _event_reasons(self) -> int:
        if self._event_reasons_fn is None:
            return 0
        return int(self._call("clock event reasons", self._event_reasons_fn))

    def _clock_mhz(self, what: str, fn: Callable, clock_type: int) -> int:
        return int(self._call(what, fn, clock_type))

    def _call(self, what: str, fn: Callable, *args):
        try:
            return fn(self._handle, *args)
        except pynvml.NVMLError as e:
            raise nvml_error(e, f"GPU {self.index} ({self.uuid}): {what}") from e

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
            sm_clock_mhz=self._clock_mhz("SM clock", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM),
            temp_c=float(self._call("temperature", pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU)),
            cap_mw=self.enforced_power_limit_mw(),
            mem_clock_mhz=self._clock_mhz("memory clock", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_MEM),
            clock_event_reasons=self._event_reasons(),
        )

    def clocks(self) -> ClockReading:
        get, top = pynvml.nvmlDeviceGetClockInfo, pynvml.nvmlDeviceGetMaxClockInfo
        return ClockReading(
            sm_mhz=self._clock_mhz("SM clock", get, pynvml.NVML_CLOCK_SM),
            mem_mhz=self._clock_mhz("memory clock", get, pynvml.NVML_CLOCK_MEM),
            sm_max_mhz=self._clock_mhz("max SM clock", top, pynvml.NVML_CLOCK_SM),
            mem_max_mhz=self._clock_mhz("max memory clock", top, pynvml.NVML_CLOCK_MEM),
            event_reasons=self._event_reasons(),
        )

    def supported_clocks_mhz(self) -> dict[int, tuple[int, ...]]:
        if self._supported is None:  # fixed by the board: read once
            memory = self._call("supported memory clocks", pynvml.nvmlDeviceGetSupportedMemoryClocks)
            self._supported = {
                int(m): tuple(sorted((int(f) for f in self._call(
                    f"supported SM clocks at memory {m} MHz", pynvml.nvmlDeviceGetSupportedGraphicsClocks, m)),
                    reverse=True))
                for m in sorted(memory, reverse=True)}
        return dict(self._supported)

    def locked_clocks(self) -> LockedClocks | None:
        return self._locked

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

    def _read_only(self, what: str) -> ReadOnlyPowerError:
        return ReadOnlyPowerError(
            f"GPU {self.index} ({self.uuid}) is read-only (power backend nvml-readonly): {what} "
            "are not changed on shared GPUs; start the server with --power-backend nvml on a GPU you own "
            "(as root or with CAP_SYS_ADMIN), or use --power-backend simulated"
        )

    def set_power_limit_mw(self, limit_mw: int) -> None:
        raise self._read_only("power limits")

    def set_locked_clocks(self, lock: LockedClocks | None) -> None:
        raise self._read_only("clocks")


class NvmlGPU(NvmlReadOnlyGPU):
    """A GPU read, capped and clock-locked through NVML (backend ``nvml``)."""

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

    def set_locked_clocks(self, lock: LockedClocks | None) -> None:
        where = f"GPU {self.index} ({self.uuid})"
        if lock is None:
            self._call("reset locked SM clocks", pynvml.nvmlDeviceResetGpuLockedClocks)
            try:
                self._call("reset locked memory clocks", pynvml.nvmlDeviceResetMemoryLockedClocks)
            except FailedPrecondition:  # the board has no memory locks, so none is held
                pass
            self._locked = None
            return
        if lock == self._locked:  # Zeus: no privileged call when the value already holds
            return
        check_lock(lock, self.supported_clocks_mhz(), where)
        had_memory_lock = self._locked is not None and self._locked.mem_max_mhz > 0
        self._call("lock SM clocks", pynvml.nvmlDeviceSetGpuLockedClocks, lock.sm_min_mhz, lock.sm_max_mhz)
        self._locked = LockedClocks(lock.sm_min_mhz, lock.sm_max_mhz)  # what holds if the memory call fails
        if lock.mem_max_mhz:
            self._call("lock memory clocks", pynvml.nvmlDeviceSetMemoryLockedClocks, lock.mem_min_mhz, lock.mem_max_mhz)
        elif had_memory_lock:
            self._call("reset locked memory clocks", pynvml.nvmlDeviceResetMemoryLockedClocks)
        self._locked = lock


def nvml_init() -> int:
    """Initialise NVML; the number of visible GPUs. Raises ``Unavailable`` when NVML is missing."""
    if pynvml is None:
        raise Unavailable("NVML is not available: install nvidia-ml-py")
    try:
        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except pynvml.NVMLError as e:
        raise Unavailable(f"NVML did not initialise ({e}); is an NVIDIA driver installed?") from e


def nvml_index_of_cuda_device(cuda_index: int) -> int:
    """The NVML index of torch's ``cuda:<cuda_index>``. NVML lists every GPU of the node in PCI order and
    ignores ``CUDA_VISIBLE_DEVICES`` (numbers or UUIDs) and ``CUDA_DEVICE_ORDER``; the UUID is what both
    agree on. Falls back to the first visible number, then to the index itself, when no UUID matches."""
    import torch

    count = nvml_init()
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
