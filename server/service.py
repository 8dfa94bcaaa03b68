"""The gRPC server: servicers (``inference_service.py``, ``control_service.py``), health and reflection
over a ``Host`` (``host.py``), and ``create_server``.

``create_server(config) -> (server, port)`` builds everything (model, engine, GPUs, telemetry, batcher,
power caps, auth) and binds; ``serve()`` in ``lifecycle.py`` starts it and adds signals. Tests bind port 0.
"""

import logging
import math
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmwatts.errors import InvalidArgument, Unavailable
from llmwatts.credentials import is_loopback_host
from llmwatts.server import auth
from llmwatts.server.config import ServerConfig
from llmwatts.server.control_service import ControlServicer
from llmwatts.server.host import MAX_LEASE_S, Host, make_engine, versions  # noqa: F401 (re-exported)
from llmwatts.server.inference_service import InferenceServicer
from llmwatts.server.guard import GuardInterceptor, class_limits, pool_size
from llmwatts.server.limits import MAX_RECEIVE_MESSAGE_BYTES, check_token_length
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAMES = ("llmwatts.v1.Inference", "llmwatts.v1.Control")
# grpc refuses calls beyond this many times the pool's threads itself (RESOURCE_EXHAUSTED on its polling
# thread, the pool never sees them); below it every refusal is the guard's. Both are counted in
# ``refusals`` (guard.GuardInterceptor.watch).
GRPC_BACKSTOP = 4


def grpc_limit(workers: int) -> int:
    """grpc's own limit of calls in flight for a pool of ``workers`` threads."""
    return GRPC_BACKSTOP * workers


class LlmwattsServer:
    """A started-or-not gRPC server and the host behind it; ``stop`` also stops the host."""

    def __init__(self, grpc_server: grpc.Server, host: Host, health_servicer: health.HealthServicer, metrics=None):
        self.grpc_server, self.host, self.health = grpc_server, host, health_servicer
        self.metrics = metrics  # server.metrics.LiveMetrics (--metrics-port) or None
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
        if self.metrics is not None:
            self.metrics.stop()
        self.host.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


def create_server(config: ServerConfig, host: Host | None = None) -> tuple[LlmwattsServer, int]:
    """Build the host (unless given: the sharded rank 0 builds its own) and a bound (not started) gRPC
    server. Returns the server and its port."""
    loopback = is_loopback_host(config.host)
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
    check_token_length(config.control_token, "control token", config.allow_short_token)
    check_token_length(config.inference_token, "inference token", config.allow_short_token)
    host = host or Host(config)
    live = None
    try:
        if config.metrics_port is not None:
            from llmwatts.server.metrics import LiveMetrics

            live = LiveMetrics(host, config.metrics_port, config.host)
        interceptor = auth.BearerTokenInterceptor(
            config.control_token, inference_token=config.inference_token, loopback_only=loopback,
            allow_insecure_loopback_control=config.allow_insecure_loopback_control)
        # Control and health have slots of their own (guard.py): no data-plane call or idle stream starves
        # SetPowerCap or a health check. grpc's own limit is only a backstop far above the slots.
        limits = class_limits(config.queue_size, config.max_batch_size)
        guard = GuardInterceptor(limits, on_refused=host.store.count_refusal)
        workers = pool_size(limits)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                             interceptors=[guard, interceptor] + ([live.interceptor] if live else []),
                             maximum_concurrent_rpcs=grpc_limit(workers),
                             options=[("grpc.so_reuseport", 0),  # a taken port is an error, never shared
                                      ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES)])
        guard.watch(server)
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
        if live is not None:
            live.stop()
        host.close()
        raise
    return LlmwattsServer(server, host, health_servicer, live), port
