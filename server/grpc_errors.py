"""The one place that maps project exceptions to gRPC status codes."""

import functools
import inspect
import logging

import grpc

from llmwatts.errors import LlmwattsError

log = logging.getLogger(__name__)


def status_code(err: BaseException) -> grpc.StatusCode:
    if isinstance(err, LlmwattsError):
        return getattr(grpc.StatusCode, err.grpc_code)
    return grpc.StatusCode.INTERNAL


def abort(context: grpc.ServicerContext, err: BaseException) -> None:
    """Abort the call with the precise status; unexpected errors are logged and sent as INTERNAL."""
    if not isinstance(err, LlmwattsError):
        log.exception("unexpected error", exc_info=err)
        context.abort(grpc.StatusCode.INTERNAL, f"internal server error: {type(err).__name__}: {err}")
    context.abort(status_code(err), str(err))


def mapped(method):
    """Decorate a servicer method (unary or server-streaming) so project errors become statuses."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as e:  # project errors get their status; anything else INTERNAL, logged
                abort(context, e)
        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:  # project errors get their status; anything else INTERNAL, logged
            abort(context, e)
    return unary
