"""Sharded serving: one process per GPU (per CPU process on gloo), tensor parallel, in lockstep.

``llmwatts serve --shards N`` starts N-1 follower processes beside itself (rank 0); under ``torchrun``
(several nodes) every process runs ``python -m llmwatts.server.sharded [serve flags]`` and finds its rank
in the environment. docs/sharding.md describes the design; in short:

- Two process groups: the default one (NCCL on GPUs, gloo on CPU) carries the model's tensors (FairScale
  all-reduces / all-gathers); a gloo group carries control messages (pickled commands and replies).
- Rank 0 runs the gRPC server and the batcher. ``ShardedEngine`` broadcasts each ``BatchSpec`` (with a
  seed, so sampling is identical everywhere) and every rank runs its local engine in lockstep.
- Every command is one broadcast from rank 0 and one gather of every follower's reply; replies carry the
  follower's buffered telemetry rows. An idle rank 0 sends a ``collect`` each second: the heartbeat
  (rank 0's end: ``shard_control.Controller``).
- Followers' GPUs appear on rank 0 as ``RemoteGPU`` proxies (server/gpu/remote.py: the ``GPU`` interface
  over commands), so the batcher's energy meter, the power-cap manager and GetServerInfo see every rank's
  GPUs. Each follower brackets its own batch's energy and returns it with its step reply.
- A cancelled request's rows stop on every rank at the same step: at each step every rank's tracker asks
  the batch's ``stopped``; rank 0 answers from its batcher and broadcasts the answer on the gloo group,
  the followers take it (``agreed_stops``): one small broadcast per step.
- A dead rank makes the next command fail (gloo reports the closed connection; the process-group timeout
  bounds a hung one): the server goes NOT_SERVING with a message naming what happened.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from llmwatts.errors import InvalidArgument, LlmwattsError, Unavailable
from llmwatts.server.lifecycle import run_until_stopped
from llmwatts.server.config import ServerConfig
from llmwatts.server.engine import BatchOutput, BatchSpec
from llmwatts.server.engine.batch import StopCheck
from llmwatts.server.gpu import GPU, pace_slowest
from llmwatts.server.gpu.remote import RemoteGPU, bracket_batch
from llmwatts.server.ranks import Rank, hello, init_rank, load_rank, open_rank_gpus, rank_device
from llmwatts.server.shard_control import Controller
from llmwatts.server.telemetry import TelemetrySampler

log = logging.getLogger(__name__)

CONFIG_ENV = "LLMWATTS_SHARD_CONFIG"   # follower config (JSON) when rank 0 spawned the followers
MAX_BUFFERED_ROWS = 100_000
FOLLOWER_FIELDS = ("model", "device", "dtype", "weights", "engine", "seed", "power_backend", "telemetry_hz",
                   "sim_profile")


class _RowBuffer:
    """A ``ServerStore`` stand-in for a follower's telemetry sampler: rows wait for rank 0 to collect."""

    def __init__(self):
        self._rows: list[dict] = []
        self._lock = threading.Lock()

    def add_telemetry(self, rows: list[dict]) -> None:
        with self._lock:
            self._rows.extend(rows)
            del self._rows[:-MAX_BUFFERED_ROWS]  # a rank 0 that stopped collecting must not exhaust memory

    def drain(self) -> list[dict]:
        with self._lock:
            rows, self._rows = self._rows, []
        return rows

    def flush(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------
# Followers
# ---------------------------------------------------------------------------------------------------


def agreed_stops(check: StopCheck | None, rows: int, group) -> StopCheck:
    """A ``BatchSpec.stopped`` every rank calls at every step: rank 0 asks ``check`` (its batcher's) and
    broadcasts the rows to stop; followers (``check`` None) take rank 0's answer. So a cancelled request's
    rows stop at the same step everywhere and the ranks stay in lockstep."""

    def stopped(step: int, live: list[int]) -> list[int]:
        mask = torch.zeros(rows, dtype=torch.uint8)
        if check is not None:
            for row in check(step, live):
                mask[row] = 1
        dist.broadcast(mask, src=0, group=group)
        return [row for row in live if mask[row]]

    return stopped


def run_follower(config: ServerConfig, r: Rank, loaded, engine, gpus: list[GPU], shard) -> int:
    """Follow rank 0's commands until ``shutdown`` (0) or until rank 0 goes away (1)."""
    dist.gather_object(hello(r, loaded, gpus, shard), None, dst=0, group=r.ctrl)
    by_uuid = {g.uuid: g for g in gpus}
    buffer = _RowBuffer()
    sampler = TelemetrySampler(gpus, buffer, config.telemetry_hz)
    sampler.start()

    def pace(busy_s: float) -> None:  # a capped simulated GPU here slows every rank: lockstep
        pace_slowest(gpus, busy_s)

    try:
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=r.ctrl)
            cmd = box[0]
            reply = {"result": None, "error": None}
            try:
                if cmd["op"] == "generate":  # this rank brackets its own batch's energy: no extra round trip
                    n = len(cmd["batch"].prompts)
                    batch = dataclasses.replace(cmd["batch"], stopped=agreed_stops(None, n, r.ctrl))
                    out, reply["energy"] = bracket_batch(gpus, n, lambda: engine.generate(batch, pace=pace))
                    reply["result"] = out.tokens
                elif cmd["op"] == "gpu" and cmd["target"] == r.rank:
                    reply["result"] = getattr(by_uuid[cmd["uuid"]], cmd["method"])(*cmd["args"])
            except LlmwattsError as e:  # a refused cap and the like: rank 0 re-raises it to the caller
                reply["error"] = e
            reply["telemetry"] = buffer.drain()
            dist.gather_object(reply, None, dst=0, group=r.ctrl)
            if cmd["op"] == "shutdown":
                return 0
    except (RuntimeError, dist.DistBackendError) as e:
        log.error("rank %d: lost rank 0 (%s); exiting", r.rank, e)
        return 1
    finally:
        sampler.stop()


# ---------------------------------------------------------------------------------------------------
# Rank 0: lockstep engine (over ``shard_control.Controller``), proxies
# ---------------------------------------------------------------------------------------------------


class ShardedEngine:
    """The Engine interface on rank 0: every rank runs the wrapped engine on the same batch in lockstep."""

    lockstep = True  # every rank runs every step; cancelled rows stop at the same step on all (``agreed_stops``)

    def __init__(self, inner, controller: Controller):
        self.inner, self.controller = inner, controller
        self.name = inner.name
        self.kv_cache = getattr(inner, "kv_cache", "fp16")  # (the server's dtype names an fp8 cache)

    @property
    def failure(self) -> Unavailable | None:
        """Set once a rank is lost: the batcher refuses new requests with it instead of running a batch."""
        return self.controller.failure

    def generate(self, batch: BatchSpec, on_step=None, pace=None) -> BatchOutput:
        sampling = batch.sampling
        if sampling.seed is None:  # one seed for every rank: identical sampling, identical tokens
            sampling = dataclasses.replace(sampling, seed=random.getrandbits(63))
        spec = dataclasses.replace(batch, sampling=sampling, stopped=None)  # (what crosses to the followers)
        mine = dataclasses.replace(spec, stopped=agreed_stops(batch.stopped, len(spec.prompts), self.controller.r.ctrl))
        out, replies = self.controller.call(
            "generate", batch=spec, local=lambda: self.inner.generate(mine, on_step=on_step, pace=pace))
        for rank, rep in enumerate(replies[1:], start=1):
            if rep["result"] != out.tokens:
                raise Unavailable(f"rank {rank} generated other tokens than rank 0: the shards diverged; restart")
        return out

    def close(self) -> None:
        self.controller.close()


def _layout(infos: list[dict]) -> dict:
    return {"tp": "fairscale", "world": len(infos), "ranks": [
        {"rank": i["rank"], "node": i["node"], "node_rank": i["node_rank"], "local_rank": i["local_rank"],
         "device": i["device"], "pid": i["pid"], "gpus": [g["uuid"] for g in i["gpus"]],
         "clock_offset_ns": i["clock_offset_ns"], **{k: i["shard"][k] for k in (
             "param_numel", "full_numel", "read_numel", "shapes")}} for i in infos]}


def run_leader(config: ServerConfig, r: Rank, loaded, engine, gpus: list[GPU], shard,
               port_file: Path | None = None, children: dict | None = None) -> int:
    from llmwatts.server.host import Host
    from llmwatts.server.service import create_server

    controller = Controller(r, children)
    infos = controller.hello(hello(r, loaded, gpus, shard))
    controller.start_heartbeat()
    proxies = [RemoteGPU(controller, g) for info in infos[1:] for g in info["gpus"]]
    try:
        host = Host(config, loaded=loaded, engine=ShardedEngine(engine, controller), gpus=gpus + proxies,
                    local_gpus=gpus, layout=_layout(infos), node=r.node)
    except BaseException:
        controller.close()
        raise
    controller.attach_store(host.store)
    server, port = create_server(config, host=host)
    controller.on_failure = lambda err: server.set_not_serving()
    # The stop joins before return: the host's close stops the followers, before the groups go.
    return run_until_stopped(
        server, f"llmwatts serving {config.model} on {config.host}:{port} over {r.world} shards "
                f"(db {config.db_path})", port, port_file)


def run_rank(config: ServerConfig, port_file: Path | None = None, children: dict | None = None) -> int:
    """Run this process's rank (from the environment) until shutdown."""
    r = init_rank(config)
    try:
        loaded, engine, shard = load_rank(config, r)
        gpus = open_rank_gpus(config, r)
        log.info("rank %d/%d on %s (%s): %d of %d parameters", r.rank, r.world, r.node, r.device,
                 shard.param_numel, shard.full_numel)
        if r.rank == 0:
            return run_leader(config, r, loaded, engine, gpus, shard, port_file, children)
        if os.environ.get(CONFIG_ENV):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0, which stops us in order
        return run_follower(config, r, loaded, engine, gpus, shard)
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # a broken group (a rank died) may refuse a clean teardown
            pass


# ---------------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_sharded(config: ServerConfig, shards: int, port_file: Path | None = None) -> int:
    """``llmwatts serve --shards N``: under torchrun, run this rank; otherwise spawn N-1 followers on
    this node and become rank 0."""
    if shards < 1:
        raise InvalidArgument("--shards must be at least 1")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        if int(os.environ["WORLD_SIZE"]) != shards:
            raise InvalidArgument(f"--shards {shards} but torchrun started {os.environ['WORLD_SIZE']} processes")
        return run_rank(config, port_file)
    if config.device not in ("auto", "cpu", "cuda"):
        raise InvalidArgument("with --shards use --device auto, cuda or cpu: each rank takes cuda:LOCAL_RANK")
    if rank_device(config.device, 0).type == "cuda" and torch.cuda.device_count() < shards:
        raise InvalidArgument(f"--shards {shards} needs {shards} GPUs; {torch.cuda.device_count()} are visible")
    follower_config = {k: getattr(config, k) for k in FOLLOWER_FIELDS}
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(shards),
               LOCAL_WORLD_SIZE=str(shards), GROUP_RANK="0", **{CONFIG_ENV: json.dumps(follower_config)})
    for secret in ("LLMWATTS_CONTROL_TOKEN", "LLMWATTS_INFERENCE_TOKEN"):  # followers serve no RPCs
        env.pop(secret, None)
    children = {}
    for rank in range(1, shards):
        children[rank] = subprocess.Popen([sys.executable, "-m", "llmwatts.server.sharded"],
                                          env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)))
    os.environ.update({k: env[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                           "GROUP_RANK")}, RANK="0", LOCAL_RANK="0")
    try:
        return run_rank(config, port_file, children)
    finally:
        for p in children.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def main(argv: list[str] | None = None) -> int:
    """Entry point of every rank (``python -m llmwatts.server.sharded``): a follower ``serve_sharded``
    spawned (its config in the environment), or a torchrun rank (argv: ``llmwatts serve``'s flags, which
    ``server/cli.py`` parses: the program's CLI, imported here only when run as one)."""
    spawned = os.environ.get(CONFIG_ENV)
    try:
        if spawned:
            logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            return run_rank(ServerConfig(**json.loads(spawned)))
        from llmwatts.server.cli import rank_config_from_argv  # noqa: cli-import (this is a program's entry)

        config, port_file = rank_config_from_argv(sys.argv[1:] if argv is None else argv)
        return run_rank(config, port_file)
    except LlmwattsError as e:
        print(f"llmwatts: rank {os.environ.get('RANK', '?')}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
