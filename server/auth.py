"""Authentication and transport security: a bearer-token server interceptor and TLS/mTLS server credentials
(tokens and PEM files are read by ``llmwatts/credentials.py``, shared with the clients).

Security model (docs/power-caps.md): mutating Control calls (SetPowerCap, ResetPowerCap) need the
control bearer token; Inference calls need the inference token when one is configured. Without a control
token, mutating calls are refused unless the server listens on loopback only *and* was started with
``--allow-insecure-loopback-control``. Tokens come from the environment or a file, never from argv
(argv is visible to every user through ``ps``). TLS is server-authenticated; a client CA turns on mTLS.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from typing import Iterable

import grpc

from llmwatts.credentials import (CONTROL_TOKEN_ENV, CONTROL_TOKEN_FILE_ENV, INFERENCE_TOKEN_ENV,
                                  INFERENCE_TOKEN_FILE_ENV, is_loopback_host, read_pem)

log = logging.getLogger(__name__)

CONTROL_MUTATING_METHODS = frozenset({
    "/llmwatts.v1.Control/SetPowerCap",
    "/llmwatts.v1.Control/ResetPowerCap",
    "/llmwatts.v1.Control/ExportRecords",  # reads every record: only for the study's owner
    "/llmwatts.v1.Control/SetLockedClocks",
    "/llmwatts.v1.Control/ResetClocks",
})
INFERENCE_PREFIX = "/llmwatts.v1.Inference/"
# Run markers bound a study's window: where an inference token is configured, they need it too.
RUN_MARKER_METHODS = frozenset({"/llmwatts.v1.Control/BeginRun", "/llmwatts.v1.Control/EndRun"})
_BEARER = "bearer "


# -------------------------------------------------------------------------------------------------
# Tokens
# -------------------------------------------------------------------------------------------------


def token_fingerprint(token: str) -> str:
    """First 8 hex digits of sha256(token): names a token in logs without revealing it."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def _bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization":
            value = value.decode() if isinstance(value, bytes) else value
            if value.lower().startswith(_BEARER):
                return value[len(_BEARER):].strip()
            return ""  # present but not a bearer token
    return None


def _token_matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def who(context: grpc.ServicerContext) -> str:
    """A short caller identity for cap events: peer, TLS client CN when mTLS, token fingerprint."""
    parts = [context.peer() or "unknown-peer"]
    try:
        auth = context.auth_context() or {}
    except Exception:  # not every context implementation has TLS information
        auth = {}
    for name in auth.get("x509_common_name", []):
        parts.append(f"cn={name.decode() if isinstance(name, bytes) else name}")
    token = _bearer_token(context.invocation_metadata())
    parts.append(f"token={token_fingerprint(token)}" if token else "no-token")
    return " ".join(parts)


# -------------------------------------------------------------------------------------------------
# Server side
# -------------------------------------------------------------------------------------------------


def _denying_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with ``code``."""

    def abort(request_or_iterator, context):
        context.abort(code, details)

    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Checks ``authorization: Bearer <token>`` on protected methods (constant-time compare).

    ``loopback_only``: the server listens on loopback only; with ``allow_insecure_loopback_control``
    mutating Control calls then pass without a control token (single-user development machines).
    """

    def __init__(
        self,
        control_token: str | None,
        *,
        inference_token: str | None = None,
        loopback_only: bool = False,
        allow_insecure_loopback_control: bool = False,
        control_methods: Iterable[str] = CONTROL_MUTATING_METHODS,
    ):
        self.control_token = control_token or None
        self.inference_token = inference_token or None
        self.loopback_only = loopback_only
        self.allow_insecure_loopback_control = allow_insecure_loopback_control
        self.control_methods = frozenset(control_methods)
        if allow_insecure_loopback_control and not loopback_only and not self.control_token:
            log.warning("--allow-insecure-loopback-control ignored: the server is not loopback-only")

    @classmethod
    def from_config(cls, config) -> "BearerTokenInterceptor":
        """From a ``ServerConfig`` (control_token, inference_token, host, allow_insecure_loopback_control)."""
        return cls(
            config.control_token,
            inference_token=config.inference_token,
            loopback_only=is_loopback_host(config.host),
            allow_insecure_loopback_control=config.allow_insecure_loopback_control,
        )

    def check(self, method: str, metadata) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the (code, message) to refuse it with."""
        if method in self.control_methods:
            if self.control_token is None:
                if self.loopback_only and self.allow_insecure_loopback_control:
                    return None
                return grpc.StatusCode.PERMISSION_DENIED, (
                    f"{method} needs the control token and this server has none: start it with "
                    f"${CONTROL_TOKEN_ENV} or ${CONTROL_TOKEN_FILE_ENV} set (or --control-token-file PATH), "
                    "or bind it to 127.0.0.1 with --allow-insecure-loopback-control on a single-user machine"
                )
            return self._check_token(method, metadata, self.control_token,
                                     f"${CONTROL_TOKEN_ENV} or --control-token-file PATH")
        if self.inference_token is not None and (method.startswith(INFERENCE_PREFIX) or method in RUN_MARKER_METHODS):
            how = f"${INFERENCE_TOKEN_FILE_ENV}, ${INFERENCE_TOKEN_ENV} or --inference-token-file PATH"
            return self._check_token(method, metadata, self.inference_token, how)
        return None

    @staticmethod
    def _check_token(method: str, metadata, expected: str, how: str) -> tuple[grpc.StatusCode, str] | None:
        given = _bearer_token(metadata)
        if given is None:
            return grpc.StatusCode.UNAUTHENTICATED, (
                f"{method} needs 'authorization: Bearer <token>' metadata; give the client the token via {how}"
            )
        if not _token_matches(given, expected):
            return grpc.StatusCode.UNAUTHENTICATED, (
                f"{method}: the bearer token is wrong (fingerprint {token_fingerprint(given) if given else 'empty'}); "
                f"give the client the server's token via {how}"
            )
        return None

    def intercept_service(self, continuation, handler_call_details):
        refusal = self.check(handler_call_details.method, handler_call_details.invocation_metadata)
        handler = continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler
        log.info("refused %s: %s", handler_call_details.method, refusal[0].name)
        return _denying_handler(handler, *refusal)


def server_credentials(
    cert: str | os.PathLike, key: str | os.PathLike, client_ca: str | os.PathLike | None = None
) -> grpc.ServerCredentials:
    """TLS server credentials from PEM files; with ``client_ca`` clients must present a certificate
    signed by it (mutual TLS)."""
    return grpc.ssl_server_credentials(
        [(read_pem(key, "TLS key"), read_pem(cert, "TLS certificate"))],
        root_certificates=read_pem(client_ca, "client CA"),
        require_client_auth=client_ca is not None,
    )
