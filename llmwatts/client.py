"""The one client module every command uses (load, sweep, cap, clocks, demo, report --server): target
parsing (``llmwatts/targets.py``, re-exported here), credentials (TLS files, bearer tokens), the channel
factory, and one error text for a failed call.

Library code: it imports no CLI module, and no Locust (loadgen's users make their channels here too).
"""

from __future__ import annotations

import collections
import math
import os
import warnings

import grpc

from llmwatts.errors import InvalidArgument, LlmwattsError
from llmwatts.credentials import (CONTROL_TOKEN_ENV, CONTROL_TOKEN_FILE_ENV, INFERENCE_TOKEN_ENV,
                                  INFERENCE_TOKEN_FILE_ENV, is_loopback_host, load_token, read_pem)
from llmwatts.targets import DEFAULT_TARGET, MAX_TARGET_CHARS, parse_target, strip_scheme  # noqa: F401


class ClientError(LlmwattsError):
    """A call to the server failed; the message is ``CODE: details`` and what to do."""


def control_token(path: str | os.PathLike | None = None) -> str | None:
    """The control token (power caps, clocks): ``--control-token-file``, else $LLMWATTS_CONTROL_TOKEN_FILE,
    else $LLMWATTS_CONTROL_TOKEN."""
    return load_token(CONTROL_TOKEN_ENV, CONTROL_TOKEN_FILE_ENV, path=path)


def inference_token(path: str | os.PathLike | None = None) -> str | None:
    """The inference token: ``--inference-token-file``, else $LLMWATTS_INFERENCE_TOKEN_FILE, else
    $LLMWATTS_INFERENCE_TOKEN."""
    return load_token(INFERENCE_TOKEN_ENV, INFERENCE_TOKEN_FILE_ENV, path=path)


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Per-call metadata carrying ``token`` (for channels made without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def gpu_selector(gpus: str | list[str] | None):
    """A ``GpuSelector`` from ``--gpus``: uuids, indices or rank:index, comma-separated (every command the
    same way); empty selects every GPU."""
    from llmwatts.v1 import llmwatts_pb2

    entries = [gpus] if isinstance(gpus, str) else list(gpus or [])
    names = [name.strip() for entry in entries for name in entry.split(",") if name.strip()]
    return llmwatts_pb2.GpuSelector(gpus=names)


def rpc_error(e: grpc.RpcError, target: str) -> ClientError:
    """One readable line for a failed call to ``target``."""
    code = e.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return ClientError(
            f"UNAVAILABLE: could not reach {target} ({e.details()}); check the server is running "
            "(llmwatts serve) and the address, and whether it uses TLS (--ca)"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ClientError(f"DEADLINE_EXCEEDED: {target} did not answer in time; check the server is running")
    return ClientError(f"{code.name}: {e.details()}")


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class _MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata to every call (bearer token on plaintext channels, where grpc refuses
    call credentials)."""

    def __init__(self, metadata: list[tuple[str, str]]):
        self._metadata = metadata

    def _details(self, d):
        return _CallDetails(d.method, d.timeout, list(d.metadata or []) + self._metadata, d.credentials,
                            d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def client_channel(
    target: str,
    *,
    ca: str | os.PathLike | None = None,
    cert: str | os.PathLike | None = None,
    key: str | os.PathLike | None = None,
    token: str | None = None,
    options: list[tuple[str, object]] | None = None,
) -> grpc.Channel:
    """A channel to ``target`` (HOST:PORT). TLS when ``ca`` or ``cert`` is given (``ca`` verifies the
    server, default the system roots; ``cert`` + ``key`` present a client certificate for mTLS).
    ``token`` is sent as ``authorization: Bearer``: as call credentials under TLS, as metadata on
    plaintext (where it travels in clear text; keep plaintext to loopback)."""
    if (cert is None) != (key is None):
        raise InvalidArgument("a client certificate needs both --cert and --key")
    if ca is not None or cert is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read_pem(ca, "CA certificate"),
            private_key=read_pem(key, "client key"),
            certificate_chain=read_pem(cert, "client certificate"),
        )
        if token:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
        return grpc.secure_channel(target, credentials, options=options)
    plain = grpc.insecure_channel(target, options=options)
    if token:
        host = target.rsplit(":", 1)[0] if ":" in target else target
        if not is_loopback_host(host.removeprefix("dns:").removeprefix("ipv4:").removeprefix("ipv6:")):
            warnings.warn(f"sending a bearer token to {target} without TLS: anyone on the path can read it; "
                          "use --ca (and a TLS server)", stacklevel=2)
        return grpc.intercept_channel(plain, _MetadataInterceptor([("authorization", f"Bearer {token}")]))
    return plain


class ControlClient:
    """One control channel to ``target`` (``CapClient``, ``ClockClient``): the GPU selector, the deadline,
    and one error type for a failed call (``error_class``, a ``ClientError``: "CODE: details"). ``token``
    defaults to the control token of the environment."""

    error_class: type[ClientError] = ClientError

    def __init__(self, target: str, *, token: str | None = None, ca=None, cert=None, key=None,
                 timeout_s: float = 10.0, gpus: str | list[str] | None = None):
        from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise InvalidArgument(f"--timeout-s must be a positive number of seconds, got {timeout_s:g}")
        self.target, self.timeout_s = parse_target(target), timeout_s
        self.selector = gpu_selector(gpus)
        self._channel = client_channel(self.target, ca=ca, cert=cert, key=key, token=token or control_token())
        self._stub = pb_grpc.ControlStub(self._channel)

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise self.error_class(str(rpc_error(e, self.target))) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
