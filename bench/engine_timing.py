"""Timed regions of the engine benches: tok/s, J/token and W over a region repeated for at least a minimum
time (NVML's energy counter read only at its ends), and the device's memory-copy bandwidth."""

import time

import torch
from nvml_energy import EnergyCounter


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run, tokens_per_run: int, counter: EnergyCounter, device: torch.device, min_s: float) -> dict:
    """Repeat ``run`` until ``min_s`` passed; tok/s, J/token and W over the whole region."""
    sync(device)
    e0, t0, runs = counter.energy_mj(), time.perf_counter(), 0
    while True:
        run()
        runs += 1
        sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            break
    e1 = counter.energy_mj()
    tokens = tokens_per_run * runs
    row = {"tok_s": tokens / elapsed, "seconds": elapsed, "runs": runs, "tokens": tokens}
    if e0 is not None:
        joules = (e1 - e0) / 1000.0
        row.update(j_per_token=joules / tokens, watts=joules / elapsed)
    return row


def copy_bandwidth_bytes_s(device: torch.device) -> float:
    """Device-memory copy rate (bytes read + written per second) of a 1 GiB buffer."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(1 << 29, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    t0, iters = time.perf_counter(), 20
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    rate = 2 * src.numel() * src.element_size() * iters / (time.perf_counter() - t0)
    del src, dst
    return rate

