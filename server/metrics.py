"""Live Prometheus metrics (``llmwatts serve --metrics-port PORT``), read at each scrape.

Per GPU (labels gpu_uuid, node, rank, index, simulated): power W, cumulative energy J (a counter), power
cap W, SM %, memory-controller %. Per server: queue depth, in-flight Inference calls, output tokens
(a counter, and a gauge of tokens/s over the last ``TOKENS_WINDOW_S``), requests by status (a counter).
Values come from the GPUs (one sample per scrape), the batcher's queue, a gRPC interceptor counting live
Inference calls, and the server DB (a read-only connection, WAL: never blocks the writers).
"""

from __future__ import annotations

import sqlite3
import threading
import time

import grpc
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server

from llmwatts.errors import Unavailable

TOKENS_WINDOW_S = 10.0
INFERENCE_PREFIX = "/llmwatts.v1.Inference/"


class InFlightInterceptor(grpc.ServerInterceptor):
    """Counts Inference calls between their arrival and their handler's return (streams: the last chunk)."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def _add(self, n: int) -> None:
        with self._lock:
            self.count += n

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(INFERENCE_PREFIX):
            return handler
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request, context):
                self._add(1)
                try:
                    return inner(request, context)
                finally:
                    self._add(-1)
            return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def stream(request, context):
                self._add(1)
                try:
                    yield from inner_stream(request, context)
                finally:
                    self._add(-1)
            return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
        return handler


class HostCollector:
    """A prometheus_client collector over one server's host."""

    def __init__(self, host, in_flight: InFlightInterceptor):
        self.host, self.in_flight = host, in_flight

    def collect(self):
        labels = ["gpu_uuid", "node", "rank", "index", "simulated"]
        power = GaugeMetricFamily("llmwatts_gpu_power_watts", "GPU power draw (simulated when simulated=1)", labels=labels)
        energy = CounterMetricFamily("llmwatts_gpu_energy_joules", "GPU cumulative energy counter", labels=labels)
        cap = GaugeMetricFamily("llmwatts_gpu_power_cap_watts", "GPU power limit set", labels=labels)
        sm = GaugeMetricFamily("llmwatts_gpu_sm_percent", "GPU SM utilisation, percent", labels=labels)
        mem = GaugeMetricFamily("llmwatts_gpu_memory_controller_percent",
                                "GPU memory-controller utilisation (DCGM's memory utilisation), percent", labels=labels)
        for gpu in self.host.gpus:
            s = gpu.sample()
            values = [gpu.uuid, gpu.node, str(gpu.rank), str(gpu.index), str(int(gpu.simulated))]
            power.add_metric(values, s.power_mw / 1000)
            energy.add_metric(values, s.energy_mj / 1000)
            if s.cap_mw is not None:
                cap.add_metric(values, s.cap_mw / 1000)
            if s.sm_pct is not None:
                sm.add_metric(values, s.sm_pct)
            if s.mem_pct is not None:
                mem.add_metric(values, s.mem_pct)
        yield from (power, energy, cap, sm, mem)
        queue = getattr(self.host.batcher, "_queue", None)
        yield GaugeMetricFamily("llmwatts_queue_depth", "requests waiting for a batch",
                                value=queue.qsize() if queue is not None else 0)
        yield GaugeMetricFamily("llmwatts_inflight_requests", "Inference calls being served", value=self.in_flight.count)
        yield from self._from_db()

    def _from_db(self):
        by_status = CounterMetricFamily("llmwatts_requests", "requests answered, by status (ok or a gRPC code)",
                                        labels=["status"])
        tokens = CounterMetricFamily("llmwatts_output_tokens", "output tokens of answered requests")
        rate = GaugeMetricFamily("llmwatts_tokens_per_second",
                                 f"output tokens per second over the last {TOKENS_WINDOW_S:g} s")
        since_ns = time.time_ns() - int(TOKENS_WINDOW_S * 1e9)
        try:
            conn = sqlite3.connect(f"file:{self.host.store.path}?mode=ro", uri=True, timeout=1)
            try:
                rows = conn.execute("select status, count(*), coalesce(sum(output_tokens), 0) from requests "
                                    "group by status").fetchall()
                recent = conn.execute("select coalesce(sum(output_tokens), 0) from requests where done_ns >= ?",
                                      [since_ns]).fetchone()[0]
            finally:
                conn.close()
        except sqlite3.Error:
            return  # no DB yet: the server has written nothing
        for status, n, _ in rows:
            by_status.add_metric([status], n)
        tokens.add_metric([], sum(t for _, _, t in rows))
        rate.add_metric([], recent / TOKENS_WINDOW_S)
        yield from (by_status, tokens, rate)


class LiveMetrics:
    """The metrics HTTP endpoint of one server: bound at construction (port 0 picks one), served from a thread."""

    def __init__(self, host, port: int, addr: str = "127.0.0.1"):
        self.interceptor = InFlightInterceptor()
        self.registry = CollectorRegistry()
        self.registry.register(HostCollector(host, self.interceptor))
        try:
            self.httpd, self.thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            raise Unavailable(f"cannot serve metrics on {addr}:{port} ({e.strerror}): pick another --metrics-port") from e
        self.port = self.httpd.server_port

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
