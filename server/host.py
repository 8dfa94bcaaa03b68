"""``Host``: everything a server holds (model, engine, GPUs, store, batcher, telemetry, power caps), built
from a ``ServerConfig``; the servicers (``inference_service.py``, ``control_service.py``) read it."""

import logging
import platform
import socket
import time
import uuid
from pathlib import Path

import grpc

from llmwatts import __version__
from llmwatts.errors import InvalidArgument, Unavailable
from llmwatts.server.batcher import Batcher
from llmwatts.server.config import ServerConfig, check_engine, check_kv_cache_name
from llmwatts.server.continuous import ContinuousBatcher
from llmwatts.server.limits import max_token_bytes
from llmwatts.server.gpu import nvml_index_of_cuda_device, open_gpus, power_source
from llmwatts.server.models import LoadedModel, load_model
from llmwatts.server.clocks import ClockManager
from llmwatts.server.power import PowerCapManager
from llmwatts.server.runs import RunRegistry
from llmwatts.server.store import ServerStore
from llmwatts.server.telemetry import EnergyMeter, TelemetrySampler

log = logging.getLogger(__name__)
MAX_LEASE_S = 86400.0  # PowerCapManager's own longest lease


class Host:
    """Everything a server holds: the loaded model, engine, GPUs, store, batcher, telemetry, caps."""

    def __init__(self, config: ServerConfig, *, loaded: LoadedModel | None = None, engine=None,
                 gpus: list | None = None, local_gpus: list | None = None, layout: dict | None = None,
                 node: str | None = None):
        """Unsharded: everything is built from ``config``. Sharded (``sharded.py``, rank 0): the loaded
        slice, the lockstep engine, every rank's GPUs (``gpus``, followers' as proxies), the GPUs this
        process samples itself (``local_gpus``) and the rank layout are passed in."""
        self.config = config
        self.server_id = uuid.uuid4().hex[:12]
        self.node = node or socket.gethostname()
        self.loaded: LoadedModel = loaded or load_model(config.model, config.device, config.dtype, config.seed,
                                                              config.weights)
        self.engine = engine or make_engine(config.engine, self.loaded, config.continuous, config.kv_cache)
        self.gpus = gpus if gpus is not None else open_gpus(
            config.power_backend, node=self.node, sim_gpus=config.sim_gpus, sim_profile=config.sim_profile,
            device_indices=_nvml_indices(config, self.loaded))
        self.layout = layout or {"ranks": [{"rank": 0, "node": self.node, "device": str(self.loaded.device),
                                            "gpus": [g.uuid for g in self.gpus]}]}
        self.shard_count = len(self.layout["ranks"])
        self.devices = [r["device"] for r in self.layout["ranks"]]
        self.power_source = power_source(self.gpus)
        self.simulated = any(g.simulated for g in self.gpus)
        self.store = ServerStore(config.db_path, self.server_id)
        self.meter = EnergyMeter(self.gpus)
        self.caps = PowerCapManager(
            self.gpus, self.power_source, state_path=config.cap_state_path or _default_cap_state(config),
            record_event=self.store.record_cap_event, default_lease_s=config.default_lease_s,
            max_lease_s=MAX_LEASE_S,
        )
        self.caps.recover()
        self.clocks = ClockManager(
            self.gpus, self.power_source, state_path=_clock_state(config),
            record_event=self.store.record_clock_event, default_lease_s=config.default_lease_s,
            max_lease_s=MAX_LEASE_S)
        self.clocks.recover()
        self.sampler = TelemetrySampler(self.gpus if local_gpus is None else local_gpus, self.store,
                                        config.telemetry_hz)
        if config.continuous:
            if not hasattr(self.engine, "session"):
                raise InvalidArgument(f"continuous batching needs the fast engine on one shard, not "
                                      f"{self.engine.name!r} on {self.shard_count}")
            if config.continuous_join_tokens is not None:
                self.engine.join_tokens = config.continuous_join_tokens
            self.batcher = ContinuousBatcher(self.engine, self.gpus, self.store,
                                             max_batch_size=config.max_batch_size, queue_size=config.queue_size,
                                             cache_slots=config.continuous_slots,
                                             join_rows=config.continuous_join_rows,
                                             batch_wait_ms=config.batch_wait_ms)
        else:
            self.batcher = Batcher(self.engine, self.gpus, self.store, max_batch_size=config.max_batch_size,
                                   queue_size=config.queue_size, merge_requests=config.merge_requests,
                                   batch_wait_ms=config.batch_wait_ms)
        self.warmup_runs = self._warm_up() if config.warmup else 0  # (after the engine checks above)
        self.runs = RunRegistry(self.store, self.meter, self.simulated, self.sampler.flush)
        self.max_token_bytes = max_token_bytes(self.loaded.tokenizer)  # the prompts' cheap byte bound
        aborted = self.store.abort_unfinished()  # the DB is the truth for request ids across restarts
        if aborted:
            log.warning("%d requests of an earlier server on this DB never finished (killed?): marked ABORTED",
                        aborted)
        self._record_server()

    def _warm_up(self) -> int:
        """``--warmup``: compile every batch bucket (and row prefix) now, off the record (no batch, no
        request rows: the engine runs directly, not through the batcher)."""
        if self.engine.name != "fast":
            log.info("--warmup: the %s engine compiles nothing; nothing to warm up", self.engine.name)
            return 0
        from llmwatts.server.engine import warm_up

        tok = self.loaded.tokenizer
        token = tok.bos_token_id if tok.bos_token_id is not None else tok.pad_token_id
        t0, graphs = time.perf_counter(), getattr(self.engine, "captures", 0)
        runs = warm_up(self.engine, self.config.max_batch_size, token, self.config.continuous,
                       self.config.continuous_slots)
        log.info("warmed up: %d runs (batch buckets up to %d%s), %d CUDA graphs captured, in %.1f s", runs,
                 self.config.max_batch_size, ", continuous row prefixes" if self.config.continuous else "",
                 getattr(self.engine, "captures", 0) - graphs, time.perf_counter() - t0)
        if self.config.continuous and not self.config.continuous_slots:
            log.info("--warmup: without --continuous-slots the sessions' cache length is not known yet, so their "
                     "decode graphs are captured at first use")
        return runs

    @property
    def dtype_text(self) -> str:
        """``float16``; ``+fp8-weights`` under ``--weights fp8``, ``+fp8-kv`` under ``--kv-cache fp8``
        (servers.dtype, ServerInfo.dtype)."""
        return (str(self.loaded.dtype).removeprefix("torch.") + ("+fp8-weights" if self.loaded.weights != "fp16" else "")
                + ("+fp8-kv" if getattr(self.engine, "kv_cache", "fp16") != "fp16" else ""))

    def _record_server(self) -> None:
        self.store.record_server({
            "started_ns": time.time_ns(), "node": self.node, "model": self.loaded.name,
            "dtype": self.dtype_text,
            "engine": self.engine.name,
            "power_source": self.power_source, "shard_count": self.shard_count, "layout": self.layout,
            "simulated": int(self.simulated), "versions": versions(),
        })
        self.store.record_gpus([{"gpu_uuid": g.uuid, "node": g.node, "rank": g.rank, "gpu_index": g.index,
                                 "name": g.name, "memory_total_bytes": g.memory_total_bytes,
                                 "simulated": int(g.simulated)} for g in self.gpus])

    def start(self) -> None:
        self.sampler.start()
        self.batcher.start()

    def close(self) -> None:
        """Stop work, restore caps, flush the store. Idempotent."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.batcher.stop()
        self.caps.restore_all()
        self.caps.close()
        self.clocks.close()  # restores every clock lock first
        engine_close = getattr(self.engine, "close", None)  # sharded: stop the follower ranks
        if engine_close is not None:
            engine_close()
        self.sampler.stop()
        self.store.close()


def make_engine(name: str, loaded: LoadedModel, continuous: bool = False, kv_cache: str = "fp16"):
    check_engine(name, continuous)
    check_kv_cache_name(kv_cache)  # (the fast engine's own check says where fp8 runs)
    if name == "auto":  # continuous batching and fp8 caches are fast-engine features (the latter says where)
        name = "fast" if loaded.device.type == "cuda" or continuous or kv_cache != "fp16" else "eager"
    if name == "eager":
        if kv_cache != "fp16":
            raise InvalidArgument("--kv-cache fp8 needs the fast engine: use --engine fast (or auto on a GPU)")
        if loaded.parallel is not None and loaded.weights != "fp16":  # FairScale's layers run fp16 weights only
            raise InvalidArgument("--weights fp8 with --shards needs --engine fast")
        from llmwatts.server.engine import EagerEngine

        return EagerEngine(loaded.model, loaded.tokenizer.pad_token_id, loaded.eos_token_id, loaded.device)
    try:  # name is "fast"
        from llmwatts.server.engine import FastEngine
    except ModuleNotFoundError as e:
        raise InvalidArgument("the fast engine is not available in this build: use --engine eager") from e
    return FastEngine(loaded.model, loaded.tokenizer.pad_token_id, loaded.eos_token_id, loaded.device,
                      context_length=loaded.context_length, parallel=loaded.parallel, kv_cache=kv_cache)


def _nvml_indices(config: ServerConfig, loaded: LoadedModel) -> list[int] | None:
    """The NVML index of the model's GPU (None: let the factory choose, e.g. simulated GPUs on a CPU)."""
    if loaded.device.type != "cuda" or config.power_backend == "simulated":
        return None
    try:
        return [nvml_index_of_cuda_device(loaded.device.index or 0)]
    except Unavailable:  # no NVML: the factory says so (or falls back to simulated under auto)
        return None


def _default_cap_state(config: ServerConfig) -> Path:
    return Path(str(config.db_path) + ".caps.json")


def _clock_state(config: ServerConfig) -> Path:
    """The clock locks' originals: beside the cap state (``--cap-state`` names the pair's first file)."""
    return Path(str(config.cap_state_path or config.db_path) + ".clocks.json")


def versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"llmwatts": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "grpc": grpc.__version__}
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out

