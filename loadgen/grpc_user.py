"""An abstract gRPC Locust user: one channel per user, a deadline on every call, Locust request events.

After Locust's ``examples/grpc/grpc_user.py``, but as a thin client wrapper instead of an interceptor so
that each call can carry its own ``context`` and a streaming call can report its time to first chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User
from locust.exception import LocustError

from llmwatts.client import call_metadata, client_channel, inference_token, strip_scheme  # noqa: F401 (call_metadata: users import it here)

_gevent_ready = False


def init_gevent_once() -> None:
    """grpc must cooperate with gevent before any channel exists; calling it twice is harmless but wasteful."""
    global _gevent_ready
    if not _gevent_ready:
        grpc_gevent.init_gevent()
        _gevent_ready = True


init_gevent_once()

DEFAULT_DEADLINE_S = 600.0  # generous: a large batch of long completions on a capped GPU is slow


@dataclass(frozen=True)
class ChannelOptions:
    """How to reach the server. TLS when ``ca`` is set (mutual TLS when ``cert``/``key`` are too)."""

    target: str
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    token: str | None = None  # sent as ``authorization: Bearer <token>``


def normalise_target(host: str) -> str:
    """``HOST:PORT`` from what users type into Locust's host field (``grpc://h:p`` or ``h:p``)."""
    return strip_scheme(host)


def make_channel(options: ChannelOptions) -> grpc.Channel:
    """An insecure or TLS channel to ``options.target`` (the token goes on each call's metadata)."""
    return client_channel(options.target, ca=options.ca, cert=options.cert, key=options.key)


class StoppedByLoadGenerator(Exception):
    """What Locust's statistics record for a call the load generator itself cut short (its user was stopped,
    e.g. after ``--run-time`` and its grace period): a failure, as the client DB's ``CANCELLED`` row says."""

    def __init__(self, message: str = "stopped by the load generator before the reply"):
        super().__init__(message)


class IncompleteStream(grpc.RpcError):
    """A stream that ended without its final chunk (status INTERNAL)."""

    def __init__(self, details: str = "the stream ended without a final chunk"):
        super().__init__(details)
        self._details = details

    def code(self):
        return grpc.StatusCode.INTERNAL

    def details(self):
        return self._details


class GrpcClient:
    """Calls a stub's methods with a deadline and fires ``events.request`` (request_type ``grpc``).

    ``unary`` returns the response; ``stream`` yields ``(chunk, arrival_perf_ns, arrival_ns)`` (perf_counter
    and wall clock) and fires two events: the call (``name``, full duration) and ``grpc-ttfc`` (``name``, time
    to first chunk). Failures fire the event with the ``grpc.RpcError`` as ``exception`` and then re-raise
    it; a call cut short by the load generator (its greenlet killed, the consumer gone) fires
    ``StoppedByLoadGenerator``, so Locust's stats, web UI and exit code count it as the failure it is.
    """

    def __init__(self, environment, stub, deadline_s: float, metadata=()):
        self._env = environment
        self._stub = stub
        self.deadline_s = deadline_s
        self._metadata = tuple(metadata)

    def unary(self, method: str, request, *, context: dict | None = None):
        start_time = time.time()
        start_perf_ns = time.perf_counter_ns()
        response, exception = None, None
        try:
            response = getattr(self._stub, method)(request, timeout=self.deadline_s, metadata=self._metadata)
            return response
        except BaseException as e:
            exception = _failure(e)
            raise
        finally:
            self._fire(method, start_time, start_perf_ns, response.ByteSize() if response is not None else 0,
                       exception, context)

    def stream(self, method: str, request, *, context: dict | None = None,
               is_final: Callable[[object], bool] | None = None) -> Iterator[tuple[object, int, int]]:
        """Yield the stream's chunks; with ``is_final``, a stream whose last chunk is not final fails
        (``IncompleteStream``, status INTERNAL) instead of passing for a success."""
        start_time = time.time()
        start_perf_ns = time.perf_counter_ns()
        length, exception, first, last = 0, None, True, None
        call = getattr(self._stub, method)(request, timeout=self.deadline_s, metadata=self._metadata)
        try:
            for chunk in call:
                arrival_perf_ns, arrival_ns = time.perf_counter_ns(), time.time_ns()
                if first:
                    first = False
                    self._fire(method, start_time, start_perf_ns, 0, None, context, request_type="grpc-ttfc")
                length += chunk.ByteSize()
                last = chunk
                yield chunk, arrival_perf_ns, arrival_ns
            if is_final is not None and (last is None or not is_final(last)):
                raise IncompleteStream()
        except BaseException as e:
            exception = _failure(e)
            raise
        finally:
            call.cancel()  # no-op once finished; frees the call if the consumer stopped early
            self._fire(method, start_time, start_perf_ns, length, exception, context)

    def _fire(self, name, start_time, start_perf_ns, length, exception, context, request_type="grpc"):
        self._env.events.request.fire(
            request_type=request_type,
            name=name,
            start_time=start_time,
            response_time=(time.perf_counter_ns() - start_perf_ns) / 1e6,
            response_length=length,
            response=None,
            context=context or {},
            exception=exception,
        )


def _failure(e: BaseException) -> Exception:
    """The exception Locust records for a call that raised ``e``: itself, or (GreenletExit, GeneratorExit:
    the user was killed or stopped reading) ``StoppedByLoadGenerator``."""
    return e if isinstance(e, Exception) else StoppedByLoadGenerator()


class GrpcUser(User):
    """Abstract: set ``stub_class``; the user's ``host`` is ``HOST:PORT``. ``self.client`` is a GrpcClient."""

    abstract = True
    stub_class: type | None = None
    deadline_s: float = DEFAULT_DEADLINE_S

    def __init__(self, environment):
        super().__init__(environment)
        if self.stub_class is None:
            raise LocustError("GrpcUser subclasses must set stub_class")
        if not self.host:
            raise LocustError("no host: pass --host HOST:PORT (or --target to `llmwatts load`)")
        options = self.channel_options()
        self._channel = make_channel(options)
        self.client = GrpcClient(environment, self.stub_class(self._channel), self.deadline_s,
                                 call_metadata(options.token))

    def channel_options(self) -> ChannelOptions:
        """Override to add TLS; the default is plaintext with the inference token (``llmwatts.client.inference_token``:
        $LLMWATTS_INFERENCE_TOKEN_FILE, else $LLMWATTS_INFERENCE_TOKEN)."""
        return ChannelOptions(target=normalise_target(self.host), token=inference_token())

    def on_stop(self):
        self._channel.close()
