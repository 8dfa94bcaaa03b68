"""gRPC servicers (Inference, Control), health and reflection, and ``create_server``.

``create_server(config) -> (server, port)`` builds everything (model, engine, GPUs, telemetry, batcher,
power caps, auth) and binds; ``serve()`` in ``cli.py`` adds signals. Tests bind port 0.
"""

import json
import logging
import math
import platform
import queue
import socket
import sys
import threading
import time
import uuid
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmwatts import __version__
from llmwatts.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from llmwatts.server import auth
from llmwatts.server.batcher import Batcher, Result, Work
from llmwatts.server.continuous import ContinuousBatcher
from llmwatts.server.config import ServerConfig, check_engine
from llmwatts.server.engine import validate_sampling
from llmwatts.server.gpu import nvml_index_of_cuda_device, open_gpus, power_source
from llmwatts.server.grpc_errors import mapped
from llmwatts.server.models import LoadedModel, load_model
from llmwatts.server.power import PowerCapManager, caps_reply
from llmwatts.server.store import ServerStore
from llmwatts.server.streaming import stream_chunks
from llmwatts.server.telemetry import EnergyMeter, TelemetrySampler
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAMES = ("llmwatts.v1.Inference", "llmwatts.v1.Control")
MAX_REQUEST_ID_CHARS = 128
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
        self.loaded: LoadedModel = loaded or load_model(config.model, config.device, config.dtype, config.seed)
        self.engine = engine or make_engine(config.engine, self.loaded, config.continuous)
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
        self.seen_request_ids: set[str] = set()  # ~100 B an id: a million requests cost ~100 MB
        self.seen_lock = threading.Lock()
        self._record_server()

    def _warm_up(self) -> int:
        """``--warmup``: compile every batch bucket (and row prefix) now, off the record (no batch, no
        request rows: the engine runs directly, not through the batcher)."""
        if self.engine.name != "fast":
            log.info("--warmup: the %s engine compiles nothing; nothing to warm up", self.engine.name)
            return 0
        from llmwatts.server.fast_engine import warm_up

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

    def _record_server(self) -> None:
        self.store.record_server({
            "started_ns": time.time_ns(), "node": self.node, "model": self.loaded.name,
            "dtype": str(self.loaded.dtype).removeprefix("torch."), "engine": self.engine.name,
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
        engine_close = getattr(self.engine, "close", None)  # sharded: stop the follower ranks
        if engine_close is not None:
            engine_close()
        self.sampler.stop()
        self.store.close()


def make_engine(name: str, loaded: LoadedModel, continuous: bool = False):
    check_engine(name, continuous)
    if name == "auto":  # continuous batching is a fast-engine feature, on CPU too
        name = "fast" if loaded.device.type == "cuda" or continuous else "eager"
    if name == "eager":
        from llmwatts.server.engine import EagerEngine

        return EagerEngine(loaded.model, loaded.tokenizer.pad_token_id, loaded.eos_token_id, loaded.device)
    try:  # name is "fast"
        from llmwatts.server.fast_engine import FastEngine
    except ModuleNotFoundError as e:
        raise InvalidArgument("the fast engine is not available in this build: use --engine eager") from e
    return FastEngine(loaded.model, loaded.tokenizer.pad_token_id, loaded.eos_token_id, loaded.device,
                      context_length=loaded.context_length)


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


def versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"llmwatts": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "grpc": grpc.__version__}
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, host: Host):
        self.host = host
        self.tokenizer = host.loaded.tokenizer

    def _work(self, request: pb.GenerateRequest, stream: bool) -> Work:
        received_ns = time.time_ns()
        cfg = self.host.config
        if not request.request_id:
            raise InvalidArgument("request_id is empty: the client must make a unique id per request")
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
        if not request.prompts:
            raise InvalidArgument("prompts is empty: send at least one prompt per request")
        if len(request.prompts) > cfg.max_batch_size:
            raise InvalidArgument(f"batch of {len(request.prompts)} prompts exceeds the server's limit of "
                                  f"{cfg.max_batch_size} (--max-batch-size); split the batch")
        for i, p in enumerate(request.prompts):
            if not p.strip():
                raise InvalidArgument(f"prompt {i} is empty: every prompt needs some text")
        if request.HasField("max_new_tokens"):
            max_new = request.max_new_tokens
            if max_new <= 0 or max_new > cfg.max_new_tokens_limit:
                raise InvalidArgument(f"max_new_tokens must be between 1 and {cfg.max_new_tokens_limit} "
                                      f"(--max-new-tokens-limit), got {max_new}")
        else:
            max_new = cfg.default_max_new_tokens
        s = request.sampling
        try:
            sampling = validate_sampling(s.temperature if s.HasField("temperature") else None,
                                         s.top_p if s.HasField("top_p") else None, s.greedy,
                                         s.seed if s.HasField("seed") else None)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        prompt_limit = cfg.max_prompt_tokens or (self.host.loaded.context_length - max_new)
        ids = self.tokenizer(list(request.prompts))["input_ids"]
        for i, p in enumerate(ids):
            if len(p) > prompt_limit:
                raise InvalidArgument(
                    f"prompt {i} has {len(p)} tokens; the limit is {prompt_limit} (context "
                    f"{self.host.loaded.context_length} minus max_new_tokens {max_new}): shorten it or ask for "
                    f"fewer new tokens")
        with self.host.seen_lock:  # check-and-add as one step: two concurrent calls with one id
            if request.request_id in self.host.seen_request_ids:
                raise AlreadyExists(f"request_id {request.request_id!r} was already used: make a fresh id per request")
            self.host.seen_request_ids.add(request.request_id)
        return Work(request.request_id, request.run_id, ids, max_new, sampling, request.ignore_eos, received_ns,
                    stream=stream)

    def _record_failure(self, work: Work, err: BaseException) -> None:
        """A request that never got an answer still gets its server row, with the status it was given."""
        self.host.store.record_requests([{
            "request_id": work.request_id, "run_id": work.run_id, "received_ns": work.received_ns,
            "n_prompts": len(work.prompts), "prompt_tokens": sum(map(len, work.prompts)),
            "output_tokens": 0, "energy_j": 0.0, "status": getattr(err, "grpc_code", "INTERNAL"),
            "error": str(err)}])

    def _submit(self, work: Work) -> None:
        try:
            self.host.batcher.submit(work)
        except Exception as e:
            self._record_failure(work, e)
            raise

    def _events(self, work: Work, context):
        """The batcher's events for ``work``; stops early when the client has gone away."""
        while True:
            try:
                event = work.events.get(timeout=1.0)
            except queue.Empty:
                if not context.is_active():  # cancelled or past its deadline: free this thread
                    return
                continue
            if event[0] == "error":
                self._record_failure(work, event[1])
                self._raise(event)
            yield event
            if event[0] == "done":
                return

    def _response(self, request: pb.GenerateRequest, r: Result) -> pb.GenerateResponse:
        completions = []
        for i, (toks, reason, p_tok) in enumerate(zip(r.tokens, r.finish_reasons, r.prompt_tokens)):
            completions.append(pb.Completion(
                index=i, text=self.tokenizer.decode(toks, skip_special_tokens=True), prompt_tokens=p_tok,
                output_tokens=len(toks), finish_reason=reason,
                token_ids=toks if request.return_token_ids else []))
        return pb.GenerateResponse(
            request_id=request.request_id, run_id=request.run_id, batch_id=r.batch_id, completions=completions,
            times=pb.ServerTimes(received_ns=r.received_ns, batch_start_ns=r.batch_start_ns,
                                 first_token_ns=r.first_token_ns, done_ns=r.done_ns),
            energy_j=r.energy_j, energy_simulated=r.simulated)

    @staticmethod
    def _raise(event) -> None:
        err = event[1]
        if isinstance(err, Exception) and hasattr(err, "grpc_code"):
            raise err
        raise Unavailable(f"the engine failed while running this batch ({type(err).__name__}: {err}); "
                          f"the server is no longer serving")

    @mapped
    def Generate(self, request, context):
        work = self._work(request, stream=False)
        self._submit(work)
        for event in self._events(work, context):
            if event[0] == "done":
                return self._response(request, event[1])
        return pb.GenerateResponse()  # the client left; nobody reads this

    @mapped
    def GenerateStream(self, request, context):
        work = self._work(request, stream=True)
        self._submit(work)
        yield from stream_chunks(request, self._events(work, context), self.tokenizer, self._response)


class ControlServicer(pb_grpc.ControlServicer):
    def __init__(self, host: Host):
        self.host = host

    @mapped
    def GetServerInfo(self, request, context):
        now_ns = time.time_ns()  # first: clients estimate their clock offset from it and the round trip
        h, c = self.host, self.host.config
        gpus = [pb.GpuInfo(index=g.index, uuid=g.uuid, name=g.name, node=g.node, rank=g.rank,
                           memory_total_bytes=g.memory_total_bytes, simulated=g.simulated) for g in h.gpus]
        return pb.ServerInfo(
            model=h.loaded.name, dtype=str(h.loaded.dtype).removeprefix("torch."), devices=h.devices,
            gpus=gpus, shard_count=h.shard_count, engine=h.engine.name, power_source=h.power_source, versions=versions(),
            max_batch_size=c.max_batch_size, max_new_tokens_limit=c.max_new_tokens_limit,
            context_length=h.loaded.context_length, default_max_new_tokens=c.default_max_new_tokens,
            server_id=h.server_id, server_time_ns=now_ns, node=h.node, telemetry_hz=int(c.telemetry_hz))

    @mapped
    def BeginRun(self, request, context):
        if not request.run_id:
            raise InvalidArgument("run_id is empty: name the run")
        now, energy_j = time.time_ns(), self.host.meter.total_j()
        if not self.host.store.begin_run(request.run_id, now, energy_j, dict(request.labels), self.host.simulated):
            raise AlreadyExists(f"run {request.run_id!r} was already begun on this server: use a new run id")
        return pb.RunMarker(run_id=request.run_id, server_ns=now, energy_j=energy_j, simulated=self.host.simulated)

    @mapped
    def EndRun(self, request, context):
        now, energy_j = time.time_ns(), self.host.meter.total_j()
        outcome = self.host.store.end_run(request.run_id, now, energy_j)
        if outcome == "unknown":
            raise NotFound(f"run {request.run_id!r} was never begun on this server: call BeginRun first")
        if outcome == "already-ended":
            raise FailedPrecondition(f"run {request.run_id!r} has already ended; its end marker stays as it was")
        return pb.RunMarker(run_id=request.run_id, server_ns=now, energy_j=energy_j, simulated=self.host.simulated)

    @mapped
    def GetPowerCaps(self, request, context):
        return caps_reply(self.host.caps.get(list(request.selector.gpus)), self.host.power_source)

    @mapped
    def SetPowerCap(self, request, context):
        statuses = self.host.caps.set(list(request.selector.gpus), request.cap_w, request.lease_s,
                                      who=auth.who(context), reason=request.reason)
        return caps_reply(statuses, self.host.power_source)

    @mapped
    def ResetPowerCap(self, request, context):
        statuses = self.host.caps.reset(list(request.selector.gpus), who=auth.who(context), reason=request.reason)
        return caps_reply(statuses, self.host.power_source)


class LlmwattsServer:
    """A started-or-not gRPC server and the host behind it; ``stop`` also stops the host."""

    def __init__(self, grpc_server: grpc.Server, host: Host, health_servicer: health.HealthServicer):
        self.grpc_server, self.host, self.health = grpc_server, host, health_servicer
        host.batcher.on_failure = lambda err: self.set_not_serving()  # a dead engine or rank: NOT_SERVING

    def start(self) -> None:
        self.host.start()
        self.grpc_server.start()
        for name in ("",) + SERVICE_NAMES:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def set_not_serving(self) -> None:
        for name in ("",) + SERVICE_NAMES:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self, grace: float | None = 5.0) -> None:
        self.set_not_serving()
        self.host.batcher.stop()  # finish the batch in flight so its callers get answers
        self.grpc_server.stop(grace).wait()
        self.host.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


def create_server(config: ServerConfig, host: Host | None = None) -> tuple[LlmwattsServer, int]:
    """Build the host (unless given: the sharded rank 0 builds its own) and a bound (not started) gRPC
    server. Returns the server and its port."""
    loopback = auth.is_loopback_host(config.host)
    if config.allow_insecure_loopback_control and not loopback:
        raise InvalidArgument("--allow-insecure-loopback-control needs a loopback --host (127.0.0.1, ::1, "
                              "localhost); configure a control token for other interfaces")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise InvalidArgument("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")
    credentials = auth.server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca) \
        if config.tls_cert else None
    if not math.isfinite(config.telemetry_hz):
        raise InvalidArgument("--telemetry-hz must be a number")
    if not (math.isfinite(config.default_lease_s) and 0 < config.default_lease_s <= MAX_LEASE_S):
        raise InvalidArgument(f"--default-lease-s must be between 0 and {MAX_LEASE_S:g} seconds, "
                              f"got {config.default_lease_s:g}")
    host = host or Host(config)
    try:
        interceptor = auth.BearerTokenInterceptor(
            config.control_token, inference_token=config.inference_token, loopback_only=loopback,
            allow_insecure_loopback_control=config.allow_insecure_loopback_control)
        # Every queued request, the batch in flight (up to max_batch_size merged requests) and room for
        # Control and health calls, so a full queue never starves SetPowerCap or a health check.
        workers = config.queue_size + config.max_batch_size + 16
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                             interceptors=[interceptor], maximum_concurrent_rpcs=workers)
        pb_grpc.add_InferenceServicer_to_server(InferenceServicer(host), server)
        pb_grpc.add_ControlServicer_to_server(ControlServicer(host), server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(SERVICE_NAMES + (health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{config.host}:{config.port}"
        try:
            port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        except RuntimeError:  # grpc raises (older releases returned 0) when the address cannot be bound
            port = 0
        if port == 0:
            raise Unavailable(f"cannot listen on {address}: is the port in use? pick another with --port")
    except BaseException:
        host.close()
        raise
    return LlmwattsServer(server, host, health_servicer), port
