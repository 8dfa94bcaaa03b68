"""Capacity per class of method, and undecodable messages, checked for every call before its handler.

grpc's one ``maximum_concurrent_rpcs`` counts every call alike: ~144 idle streams (reflection, health
Watch) filled it and health checks, GetServerInfo and Set/ResetPowerCap were refused. Here each class
has its own slots, and a call over its class's limit is refused at once (RESOURCE_EXHAUSTED, counted in
the store's ``refusals``):

- ``data``: Inference calls (the queue, the batch in flight and a margin);
- ``control``: llmwatts.v1.Control and grpc.health.v1.Health/Check, never starved by the others;
- ``other``: everything else, long-lived streams included (reflection, Health/Watch), a few slots.

The thread pool has a thread for every slot and some to spare for refusals (``pool_size``). A message
that does not decode is INVALID_ARGUMENT (grpc answers INTERNAL with a traceback per message), logged
once per ``LOG_EVERY_S`` with the count since.

grpc's own ``maximum_concurrent_rpcs`` stays as a backstop far above the slots (a flood of calls is
refused on grpc's polling thread, never queued for the pool). Its refusals never reach a handler, but
grpc runs the interceptors first, under the lock that guards its count of calls in flight: ``watch``
gives the guard that count, and a call grpc is about to refuse is counted there (same code,
RESOURCE_EXHAUSTED), so every refused call is in ``refusals``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import grpc

log = logging.getLogger(__name__)

CONTROL_PREFIXES = ("/llmwatts.v1.Control/", "/grpc.health.v1.Health/Check")
DATA_PREFIX = "/llmwatts.v1.Inference/"
CONTROL_SLOTS = 16
OTHER_SLOTS = 8
SPARE_THREADS = 16  # refusals run on a pool thread too: a burst of them never waits behind admitted calls
LOG_EVERY_S = 60.0


def method_class(method: str) -> str:
    if method.startswith(DATA_PREFIX):
        return "data"
    if method.startswith(CONTROL_PREFIXES):
        return "control"
    return "other"


def class_limits(queue_size: int, max_batch_size: int) -> dict[str, int]:
    """Slots per class: every queued request and the batch in flight (a request per row at most)."""
    return {"data": queue_size + max_batch_size + 4, "control": CONTROL_SLOTS, "other": OTHER_SLOTS}


def pool_size(limits: dict[str, int]) -> int:
    return sum(limits.values()) + SPARE_THREADS


class _Undecodable:
    def __init__(self, error: Exception):
        self.error = error


class _RateLimitedLog:
    """Logs the first event, then at most once per ``every_s`` with the count since the last line."""

    def __init__(self, every_s: float):
        self.every_s, self._last, self._count = every_s, float("-inf"), 0
        self._lock = threading.Lock()

    def __call__(self, msg: str, *args) -> None:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._last < self.every_s:
                return
            count, self._count, self._last = self._count, 0, now
        log.warning(msg + " (%d such since the last line; next line in %.0f s at most)", *args, count, self.every_s)


class GuardInterceptor(grpc.ServerInterceptor):
    """Per-class concurrency slots and decode errors (see the module docstring). ``on_refused(code)`` is
    called for each refusal (the store counts them)."""

    def __init__(self, limits: dict[str, int], on_refused: Callable[[str], None] | None = None):
        self.limits = dict(limits)
        self._slots = {name: threading.BoundedSemaphore(n) for name, n in limits.items()}
        self._on_refused = on_refused or (lambda code: None)
        self._log_undecodable = _RateLimitedLog(LOG_EVERY_S)
        self._log_busy = _RateLimitedLog(LOG_EVERY_S)
        self._grpc_state = None  # grpc's server state (``watch``): its calls in flight and its limit

    def watch(self, server: grpc.Server) -> None:
        """Count the calls ``server``'s own concurrency limit refuses (see the module docstring). grpc keeps
        that count in its server state (``active_rpc_count``, ``maximum_concurrent_rpcs``, grpc 1.5x-1.8x);
        without them this says so once and those refusals stay uncounted (tests/server/test_guard.py
        fails then)."""
        state = getattr(server, "_state", None)
        if state is None or not hasattr(state, "active_rpc_count") or not hasattr(state, "maximum_concurrent_rpcs"):
            log.warning("this grpc release hides its count of calls in flight: calls refused by grpc's own "
                        "limit are not counted in refusals")
            return
        self._grpc_state = state

    def _grpc_refuses(self) -> bool:
        """grpc will refuse this call itself (its limit reached). Read under grpc's own lock: interceptors
        run inside it, so the count cannot move between this read and grpc's check."""
        state = self._grpc_state
        return (state is not None and state.maximum_concurrent_rpcs is not None
                and state.active_rpc_count >= state.maximum_concurrent_rpcs)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if self._grpc_refuses():  # grpc answers RESOURCE_EXHAUSTED without running any handler: count it here
            self._log_busy("grpc refused %s: its limit of %d calls in flight is reached", method,
                           self._grpc_state.maximum_concurrent_rpcs)
            self._count("RESOURCE_EXHAUSTED")
            return handler
        return self._guarded(handler, method, method_class(method))

    def _count(self, code: str) -> None:
        try:
            self._on_refused(code)
        except Exception:  # counting must never turn a refusal into INTERNAL
            log.exception("counting a refusal failed")

    def _refuse(self, context, code: grpc.StatusCode, details: str) -> None:
        self._count(code.name)
        context.abort(code, details)

    def _check(self, request, method: str, context) -> None:
        if isinstance(request, _Undecodable):
            self._log_undecodable("undecodable %s message from %s: %s", method, context.peer(), request.error)
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"the {method} message does not decode as its protobuf type: send a valid message")

    def _admit(self, method: str, kind: str, context) -> threading.BoundedSemaphore:
        slot = self._slots[kind]
        if not slot.acquire(blocking=False):
            self._log_busy("refused %s: all %d %s slots are busy", method, self.limits[kind], kind)
            self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"the server is busy: all {self.limits[kind]} {kind} call slots are taken; retry later")
        return slot

    def _guarded(self, handler: grpc.RpcMethodHandler, method: str, kind: str) -> grpc.RpcMethodHandler:
        decode = handler.request_deserializer

        def deserialize(data: bytes):
            try:
                return decode(data) if decode is not None else data
            except Exception as e:  # protobuf's DecodeError, or anything a custom deserializer raises
                return _Undecodable(e)

        def checked_requests(iterator, context):
            for request in iterator:
                self._check(request, method, context)
                yield request

        inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

        def admitted(request, context):
            """(the request checked, or its stream checked as it is read; the call's slot)."""
            if not handler.request_streaming:
                self._check(request, method, context)
            else:
                request = checked_requests(request, context)
            return request, self._admit(method, kind, context)

        def unary_response(request, context):
            request, slot = admitted(request, context)
            try:
                return inner(request, context)
            finally:
                slot.release()

        def stream_response(request, context):
            request, slot = admitted(request, context)
            try:
                yield from inner(request, context)
            finally:
                slot.release()

        kwargs = {"request_deserializer": deserialize, "response_serializer": handler.response_serializer}
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(stream_response, **kwargs)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(unary_response, **kwargs)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(stream_response, **kwargs)
        return grpc.unary_unary_rpc_method_handler(unary_response, **kwargs)
