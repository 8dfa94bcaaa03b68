"""The benchmarks' energy meter: one GPU's NVML energy counter, read-only, through the server's GPU class."""

import torch


class EnergyCounter:
    """NVML's cumulative energy counter of one GPU (the server's read-only GPU class), or nothing on CPU."""

    def __init__(self, device: torch.device):
        self.gpu = None
        if device.type == "cuda":
            import socket

            from llmwatts.server.gpu import nvml_index_of_cuda_device, open_gpus

            # NVML numbers GPUs in PCI order, ignoring CUDA_VISIBLE_DEVICES: map the device by uuid.
            self.gpu = open_gpus("nvml-readonly", node=socket.gethostname(),
                                 device_indices=[nvml_index_of_cuda_device(device.index or 0)])[0]
            self.name = self.gpu.name

    def energy_mj(self) -> int | None:
        return None if self.gpu is None else self.gpu.energy_mj()
