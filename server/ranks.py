"""A sharded server's ranks (sharded.py runs them): joining the process groups, and this rank's device,
GPU and slice of the model.

Two process groups: the default one (NCCL on GPUs, gloo on CPU) carries the model's tensors (FairScale
all-reduces / all-gathers); a gloo group (``Rank.ctrl``) carries control messages.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from llmwatts.errors import InvalidArgument
from llmwatts.server.config import ServerConfig
from llmwatts.server.gpu import GPU, nvml_index_of_cuda_device, open_gpus
from llmwatts.server.gpu.remote import gpu_info

NODE_ENV = "LLMWATTS_NODE"             # node name override (two "nodes" on one host in tests)
TIMEOUT_ENV = "LLMWATTS_SHARD_TIMEOUT_S"


@dataclasses.dataclass
class Rank:
    rank: int
    world: int
    local_rank: int
    node_rank: int
    node: str
    device: torch.device
    ctrl: object            # gloo process group for control messages


def _timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "300")))


def rank_device(device: str, local_rank: int) -> torch.device:
    """One device per local rank: ``cuda:LOCAL_RANK`` when CUDA is asked for (or auto), else CPU."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InvalidArgument(f"device {device!r} asked for, but no CUDA GPU is visible: use --device cpu")
    if local_rank >= torch.cuda.device_count():
        raise InvalidArgument(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible on this node")
    return torch.device("cuda", local_rank)


def init_rank(config: ServerConfig) -> Rank:
    """Join the process groups (env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    from fairscale.nn.model_parallel.initialize import initialize_model_parallel

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = rank_device(config.device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on lent GPUs
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=_timeout())
    ctrl = dist.new_group(backend="gloo", timeout=_timeout())
    initialize_model_parallel(world, model_parallel_backend=backend)
    node = os.environ.get(NODE_ENV) or socket.gethostname()
    return Rank(rank, world, local_rank, int(os.environ.get("GROUP_RANK", 0)), node, device, ctrl)


def open_rank_gpus(config: ServerConfig, r: Rank) -> list[GPU]:
    """This rank's GPU: its CUDA device through NVML, or one simulated GPU named after the global rank."""
    if r.device.type == "cuda" and config.power_backend != "simulated":
        indices = [nvml_index_of_cuda_device(r.device.index or 0)]
    else:
        indices = [r.rank]
    return open_gpus(config.power_backend, node=r.node, rank=r.rank, sim_profile=config.sim_profile,
                     device_indices=indices)


def load_rank(config: ServerConfig, r: Rank):
    from llmwatts.server.models import resolve_dtype
    from llmwatts.server.host import make_engine
    from llmwatts.server.tp import load_sharded

    dtype = resolve_dtype(config.dtype, r.device)
    loaded, shard = load_sharded(config.model, r.device, dtype, config.seed, r.rank, r.world, config.weights)
    # auto: the fast engine on GPUs (its CUDA graphs capture the NCCL all-reduces; measured on 4 H100s,
    # docs/results.md), eager on CPU.
    engine = make_engine(config.engine, loaded, kv_cache=config.kv_cache)
    return loaded, engine, shard


def hello(r: Rank, loaded, gpus: list[GPU], shard) -> dict:
    """What a rank tells rank 0 once loaded: where it runs, its GPUs (``gpu_info``) and its shard."""
    return {"rank": r.rank, "node": r.node, "node_rank": r.node_rank, "local_rank": r.local_rank,
            "device": str(loaded.device), "pid": os.getpid(), "gpus": [gpu_info(g) for g in gpus],
            "shard": shard.as_dict(), "time_ns": time.time_ns()}
