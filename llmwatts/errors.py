"""Project exceptions. Vendor and library errors become these at the edge (``raise ... from e``).

``server/grpc_errors.py`` maps each to a gRPC status; CLIs print ``str(err)`` on one line and exit 2.
"""


class LlmwattsError(Exception):
    """Base of every error a user can act on. The message says what to do."""

    grpc_code = "INTERNAL"


class InvalidArgument(LlmwattsError):
    grpc_code = "INVALID_ARGUMENT"


class NotFound(LlmwattsError):
    grpc_code = "NOT_FOUND"


class AlreadyExists(LlmwattsError):
    grpc_code = "ALREADY_EXISTS"


class ResourceExhausted(LlmwattsError):
    grpc_code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(LlmwattsError):
    grpc_code = "FAILED_PRECONDITION"


class PermissionDenied(LlmwattsError):
    grpc_code = "PERMISSION_DENIED"


class Unauthenticated(LlmwattsError):
    grpc_code = "UNAUTHENTICATED"


class Unavailable(LlmwattsError):
    grpc_code = "UNAVAILABLE"


class ReadOnlyPowerError(FailedPrecondition):
    """A power limit was to be set on a backend that only reads (``nvml-readonly``)."""


class EngineError(LlmwattsError):
    """The engine failed on one batch; the server still serves."""

    grpc_code = "INTERNAL"


class CallEnded(LlmwattsError):
    """The call was cancelled or ran past its deadline before its answer; ``grpc_code`` says which."""

    def __init__(self, grpc_code: str):
        super().__init__(f"the call ended ({grpc_code}) before its answer")
        self.grpc_code = grpc_code
