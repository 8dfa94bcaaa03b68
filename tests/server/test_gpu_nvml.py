"""The GPU seam's NVML side (NVML faked at the pynvml seam) and the factory that picks a backend."""

import types
from unittest import mock

import pynvml
import pytest

from llmwatts.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ReadOnlyPowerError,
    Unavailable,
)
from llmwatts.server import gpu as gpu_mod
from llmwatts.server.gpu import nvml as nvml_mod
from llmwatts.server.gpu import (
    LockedClocks,
    NvmlGPU,
    NvmlReadOnlyGPU,
    open_gpus,
    power_source,
)


def _field(value_mw, ret=pynvml.NVML_SUCCESS):
    f = pynvml.c_nvmlFieldValue_t()
    f.fieldId = pynvml.NVML_FI_DEV_POWER_INSTANT
    f.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    f.nvmlReturn = ret
    f.value.uiVal = value_mw
    return f


@pytest.fixture
def fake_nvml():
    """A pynvml whose functions are autospecced mocks and whose constants and errors are real."""
    fake = mock.create_autospec(pynvml, spec_set=False)
    for name in dir(pynvml):
        value = getattr(pynvml, name)
        if name.startswith("NVML") and not callable(value) or isinstance(value, type) and issubclass(value, Exception):
            setattr(fake, name, value)
    fake.NVMLError = pynvml.NVMLError
    handle = object()
    fake.nvmlDeviceGetCount.return_value = 2
    fake.nvmlDeviceGetHandleByIndex.return_value = handle
    fake.nvmlDeviceGetUUID.return_value = "GPU-1234"
    fake.nvmlDeviceGetName.return_value = "NVIDIA A100-PCIE-40GB"
    fake.nvmlDeviceGetMemoryInfo.return_value = types.SimpleNamespace(total=40 * 1024**3, used=3 * 1024**3, free=0)
    fake.nvmlDeviceGetFieldValues.return_value = [_field(201_500)]
    fake.nvmlDeviceGetPowerUsage.return_value = 198_000
    fake.nvmlDeviceGetTotalEnergyConsumption.return_value = 123_456_789
    fake.nvmlDeviceGetUtilizationRates.return_value = types.SimpleNamespace(gpu=87, memory=64)
    fake.nvmlDeviceGetTemperature.return_value = 61
    fake.nvmlDeviceGetPowerManagementLimit.return_value = 250_000
    fake.nvmlDeviceGetEnforcedPowerLimit.return_value = 240_000
    fake.nvmlDeviceGetPowerManagementDefaultLimit.return_value = 250_000
    fake.nvmlDeviceGetPowerManagementLimitConstraints.return_value = [150_000, 250_000]
    fake.nvmlDeviceGetClockInfo.side_effect = lambda h, kind: {pynvml.NVML_CLOCK_SM: 1395, pynvml.NVML_CLOCK_MEM: 1215}[kind]
    fake.nvmlDeviceGetMaxClockInfo.side_effect = lambda h, kind: {pynvml.NVML_CLOCK_SM: 1410, pynvml.NVML_CLOCK_MEM: 1215}[kind]
    fake.nvmlDeviceGetCurrentClocksEventReasons.return_value = 0x4 | 0x40  # power cap and HW thermal
    fake.nvmlDeviceGetSupportedMemoryClocks.return_value = [1215]
    fake.nvmlDeviceGetSupportedGraphicsClocks.return_value = [1410, 1395, 1005, 210]
    with mock.patch.object(nvml_mod, "pynvml", fake):
        fake.handle = handle
        yield fake


def test_nvml_reads_map_to_sample(fake_nvml):
    g = NvmlGPU(1, node="n", rank=2)
    assert (g.uuid, g.name, g.index, g.rank, g.simulated, g.memory_total_bytes) == (
        "GPU-1234", "NVIDIA A100-PCIE-40GB", 1, 2, False, 40 * 1024**3)
    s = g.sample()
    assert (s.power_mw, s.power_instant_mw, s.energy_mj) == (198_000, 201_500, 123_456_789)
    assert (s.sm_pct, s.mem_pct, s.mem_used_bytes) == (87.0, 64.0, 3 * 1024**3)
    assert (s.sm_clock_mhz, s.temp_c, s.cap_mw, s.mem_clock_mhz) == (1395, 61.0, 240_000, 1215)
    assert gpu_mod.clock_event_names(s.clock_event_reasons) == ["sw_power_cap", "hw_thermal"]
    h = fake_nvml.handle
    fake_nvml.nvmlDeviceGetHandleByIndex.assert_called_once_with(1)
    fake_nvml.nvmlDeviceGetFieldValues.assert_called_with(h, [pynvml.NVML_FI_DEV_POWER_INSTANT])
    assert fake_nvml.nvmlDeviceGetClockInfo.call_args_list == [mock.call(h, pynvml.NVML_CLOCK_SM),
                                                               mock.call(h, pynvml.NVML_CLOCK_MEM)]
    fake_nvml.nvmlDeviceGetTemperature.assert_called_once_with(h, pynvml.NVML_TEMPERATURE_GPU)
    fake_nvml.nvmlDeviceGetTotalEnergyConsumption.assert_called_once_with(h)
    assert (g.power_limit_mw(), g.enforced_power_limit_mw(), g.default_power_limit_mw()) == (250_000, 240_000, 250_000)
    assert g.power_limit_constraints_mw() == (150_000, 250_000)


def test_nvml_energy_sample_reads_only_the_counter_and_power(fake_nvml):
    """A batch boundary reads three values, not sample()'s eight: the counter costs ~4 ms on an H100."""
    g = NvmlReadOnlyGPU(0, node="n")
    fake_nvml.reset_mock()
    e = g.energy_sample()
    assert (e.energy_mj, e.power_mw, e.power_instant_mw) == (123_456_789, 198_000, 201_500)
    h = fake_nvml.handle
    fake_nvml.nvmlDeviceGetTotalEnergyConsumption.assert_called_once_with(h)
    fake_nvml.nvmlDeviceGetPowerUsage.assert_called_once_with(h)
    fake_nvml.nvmlDeviceGetFieldValues.assert_called_once_with(h, [pynvml.NVML_FI_DEV_POWER_INSTANT])
    for costly in ("nvmlDeviceGetUtilizationRates", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetClockInfo",
                   "nvmlDeviceGetTemperature", "nvmlDeviceGetEnforcedPowerLimit"):
        getattr(fake_nvml, costly).assert_not_called()


def test_nvml_without_power_instant_field_gives_none(fake_nvml):
    fake_nvml.nvmlDeviceGetFieldValues.return_value = [_field(0, ret=pynvml.NVML_ERROR_NOT_SUPPORTED)]
    g = NvmlReadOnlyGPU(0, node="n")
    assert g.sample().power_instant_mw is None
    calls = fake_nvml.nvmlDeviceGetFieldValues.call_count
    g.sample()
    assert fake_nvml.nvmlDeviceGetFieldValues.call_count == calls  # probed once, not per sample


def test_nvml_set_power_limit_calls_setter(fake_nvml):
    g = NvmlGPU(0, node="n")
    g.set_power_limit_mw(175_000)
    fake_nvml.nvmlDeviceSetPowerManagementLimit.assert_called_once_with(fake_nvml.handle, 175_000)


def test_nvml_set_is_noop_when_value_holds(fake_nvml):
    NvmlGPU(0, node="n").set_power_limit_mw(250_000)
    fake_nvml.nvmlDeviceSetPowerManagementLimit.assert_not_called()


def test_nvml_permission_error_says_how_to_fix(fake_nvml):
    fake_nvml.nvmlDeviceSetPowerManagementLimit.side_effect = pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
    with pytest.raises(PermissionDenied, match="root or CAP_SYS_ADMIN") as info:
        NvmlGPU(0, node="n").set_power_limit_mw(175_000)
    assert isinstance(info.value.__cause__, pynvml.NVMLError)


@pytest.mark.parametrize("code, error", [
    (pynvml.NVML_ERROR_NO_PERMISSION, PermissionDenied),
    (pynvml.NVML_ERROR_NOT_SUPPORTED, FailedPrecondition),
    (pynvml.NVML_ERROR_INVALID_ARGUMENT, InvalidArgument),
    (pynvml.NVML_ERROR_NOT_FOUND, NotFound),
    (pynvml.NVML_ERROR_GPU_IS_LOST, Unavailable),
    (pynvml.NVML_ERROR_UNKNOWN, Unavailable),
])
def test_nvml_errors_map_to_project_exceptions_by_one_table(fake_nvml, code, error):
    """Every NVML call goes through one mapping: a GPU that fell off the bus must not surface as a raw
    NVMLError (an INTERNAL status with a traceback) but as a project error naming the GPU."""
    g = NvmlReadOnlyGPU(0, node="n")
    fake_nvml.nvmlDeviceGetPowerUsage.side_effect = pynvml.NVMLError(code)
    with pytest.raises(error, match=r"GPU 0 \(GPU-1234\): power usage") as info:
        g.sample()
    assert type(info.value) is error and isinstance(info.value.__cause__, pynvml.NVMLError)


def test_nvml_readonly_refuses_and_never_calls_a_setter(fake_nvml):
    gpus = open_gpus("nvml-readonly", node="n")
    assert power_source(gpus) == "nvml-readonly" and len(gpus) == 2
    for g in gpus:
        g.sample()
        g.clocks()
        g.supported_clocks_mhz()
        with pytest.raises(ReadOnlyPowerError) as info:
            g.set_power_limit_mw(175_000)
        assert info.value.grpc_code == "FAILED_PRECONDITION"
        for lock in (LockedClocks(1005, 1005), None):
            with pytest.raises(ReadOnlyPowerError, match="clocks are not changed"):
                g.set_locked_clocks(lock)
    setters = [name for name in dir(pynvml) if name.startswith("nvmlDeviceSet") or name.startswith("nvmlDeviceReset")]
    assert {"nvmlDeviceSetPowerManagementLimit", "nvmlDeviceSetGpuLockedClocks", "nvmlDeviceResetGpuLockedClocks",
            "nvmlDeviceSetMemoryLockedClocks", "nvmlDeviceResetMemoryLockedClocks"} <= set(setters)
    for name in setters:
        getattr(fake_nvml, name).assert_not_called()
    # The read-only class has no path to the setter at all.
    assert not hasattr(NvmlReadOnlyGPU, "_set") and NvmlReadOnlyGPU.set_power_limit_mw is not NvmlGPU.set_power_limit_mw


def test_nvml_clocks_read_current_max_supported_and_reasons(fake_nvml):
    g = NvmlReadOnlyGPU(0, node="n")
    fake_nvml.reset_mock()
    c = g.clocks()
    assert (c.sm_mhz, c.mem_mhz, c.sm_max_mhz, c.mem_max_mhz, c.event_reasons) == (1395, 1215, 1410, 1215, 0x44)
    h = fake_nvml.handle
    assert fake_nvml.nvmlDeviceGetMaxClockInfo.call_args_list == [mock.call(h, pynvml.NVML_CLOCK_SM),
                                                                  mock.call(h, pynvml.NVML_CLOCK_MEM)]
    fake_nvml.nvmlDeviceGetCurrentClocksEventReasons.assert_called_once_with(h)
    assert g.supported_clocks_mhz() == {1215: (1410, 1395, 1005, 210)}
    assert g.supported_clocks_mhz() == {1215: (1410, 1395, 1005, 210)}  # read once: the board's list is fixed
    fake_nvml.nvmlDeviceGetSupportedMemoryClocks.assert_called_once_with(h)
    fake_nvml.nvmlDeviceGetSupportedGraphicsClocks.assert_called_once_with(h, 1215)
    assert g.locked_clocks() is None


def test_nvml_old_driver_reads_throttle_reasons_instead(fake_nvml):
    fake_nvml.nvmlDeviceGetCurrentClocksEventReasons.side_effect = pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    fake_nvml.nvmlDeviceGetCurrentClocksThrottleReasons.return_value = 0x2
    assert NvmlReadOnlyGPU(0, node="n").sample().clock_event_reasons == 0x2


def test_nvml_lock_and_reset_make_exactly_these_calls(fake_nvml):
    g = NvmlGPU(0, node="n")
    h = fake_nvml.handle
    g.set_locked_clocks(LockedClocks(1005, 1395))
    fake_nvml.nvmlDeviceSetGpuLockedClocks.assert_called_once_with(h, 1005, 1395)
    fake_nvml.nvmlDeviceSetMemoryLockedClocks.assert_not_called()
    g.set_locked_clocks(LockedClocks(1005, 1395))  # holds already: no privileged call
    assert fake_nvml.nvmlDeviceSetGpuLockedClocks.call_count == 1 and g.locked_clocks() == LockedClocks(1005, 1395)
    g.set_locked_clocks(LockedClocks(1005, 1005, 1215, 1215))
    fake_nvml.nvmlDeviceSetMemoryLockedClocks.assert_called_once_with(h, 1215, 1215)
    fake_nvml.nvmlDeviceResetMemoryLockedClocks.side_effect = pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
    g.set_locked_clocks(None)  # a board without memory locks holds none: its refusal is no error
    fake_nvml.nvmlDeviceResetGpuLockedClocks.assert_called_once_with(h)
    fake_nvml.nvmlDeviceResetMemoryLockedClocks.assert_called_once_with(h)
    assert g.locked_clocks() is None
    g.set_locked_clocks(None)  # a reset always runs: after a SIGKILL the driver may hold a lock nobody here set
    assert fake_nvml.nvmlDeviceResetGpuLockedClocks.call_count == 2


def test_nvml_unsupported_lock_refused_before_any_nvml_setter(fake_nvml):
    g = NvmlGPU(0, node="n")
    with pytest.raises(InvalidArgument, match=r"SM clock 1000 MHz is not supported; supported SM clocks at memory "
                                              r"1215 MHz: 1410, 1395, 1005, 210 MHz"):
        g.set_locked_clocks(LockedClocks(1000, 1000))
    fake_nvml.nvmlDeviceSetGpuLockedClocks.assert_not_called()


def test_nvml_lock_without_permission_says_how_to_fix(fake_nvml):
    fake_nvml.nvmlDeviceSetGpuLockedClocks.side_effect = pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
    with pytest.raises(PermissionDenied, match="power limit or clocks needs root or CAP_SYS_ADMIN"):
        NvmlGPU(0, node="n").set_locked_clocks(LockedClocks(1005, 1005))


def test_auto_picks_readonly_nvml_when_a_gpu_is_visible(fake_nvml):
    gpus = open_gpus("auto", node="n", device_indices=[1])
    assert [type(g) for g in gpus] == [NvmlReadOnlyGPU] and gpus[0].index == 1
    fake_nvml.nvmlInit.assert_called_once_with()


def test_auto_falls_back_to_simulated_without_nvml(fake_nvml):
    fake_nvml.nvmlInit.side_effect = pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    gpus = open_gpus("auto", node="box", sim_gpus=2)
    assert [g.uuid for g in gpus] == ["SIM-box-0", "SIM-box-1"] and power_source(gpus) == "simulated"


def test_nvml_backend_without_driver_is_unavailable(fake_nvml):
    fake_nvml.nvmlInit.side_effect = pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    with pytest.raises(Unavailable, match="NVIDIA driver"):
        open_gpus("nvml", node="n")


def test_unknown_backend_names_choices():
    with pytest.raises(InvalidArgument, match="nvml-readonly.*simulated"):
        open_gpus("cuda", node="n")


def test_bad_device_index_refused(fake_nvml):
    with pytest.raises(InvalidArgument, match="0..1"):
        open_gpus("nvml", node="n", device_indices=[5])


def test_cuda_device_maps_to_its_nvml_index_by_uuid(fake_nvml, monkeypatch):
    # Regression: cuda:0 under CUDA_VISIBLE_DEVICES=3 was read as NVML GPU 0 (NVML ignores the variable).
    import torch

    handles = [object() for _ in range(4)]
    fake_nvml.nvmlDeviceGetCount.return_value = 4
    fake_nvml.nvmlDeviceGetHandleByIndex.side_effect = lambda i: handles[i]
    fake_nvml.nvmlDeviceGetUUID.side_effect = lambda h: f"GPU-0000000{handles.index(h)}-aaaa"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-00000003-aaaa")  # a UUID: no number to fall back on
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid="00000003-aaaa"))
    assert gpu_mod.nvml_index_of_cuda_device(0) == 3
    # Without a UUID from torch, the visible number is the best guess.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=""))
    assert gpu_mod.nvml_index_of_cuda_device(1) == 3
    assert not fake_nvml.nvmlDeviceSetPowerManagementLimit.called
