"""Credentials both ends read from files and the environment: the bearer-token variables and
``load_token``, PEM files (``read_pem``), and which hosts only loopback clients reach
(``is_loopback_host``).

The shared core, beside ``llmwatts/client.py`` (a client's channel) and ``server/auth.py`` (the server's
interceptor and TLS credentials), which both import it. Standard library only.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

from llmwatts.errors import InvalidArgument

log = logging.getLogger(__name__)

CONTROL_TOKEN_ENV = "LLMWATTS_CONTROL_TOKEN"
CONTROL_TOKEN_FILE_ENV = "LLMWATTS_CONTROL_TOKEN_FILE"
INFERENCE_TOKEN_ENV = "LLMWATTS_INFERENCE_TOKEN"
INFERENCE_TOKEN_FILE_ENV = "LLMWATTS_INFERENCE_TOKEN_FILE"


def load_token(
    env_var: str = CONTROL_TOKEN_ENV,
    file_env_var: str = CONTROL_TOKEN_FILE_ENV,
    path: str | os.PathLike | None = None,
) -> str | None:
    """The token from ``path`` (a ``--*-token-file`` flag), else the file named by ``$file_env_var``,
    else ``$env_var``; None when none is configured. Surrounding whitespace is stripped."""
    source = None
    if path is None and os.environ.get(file_env_var):
        path = os.environ[file_env_var]
        source = f"${file_env_var}"
    if path is not None:
        path = Path(path)
        source = source or str(path)
        try:
            text = path.read_text()
            mode = path.stat().st_mode
        except OSError as e:
            raise InvalidArgument(f"cannot read the token file {path} (from {source}): {e.strerror}") from e
        if mode & 0o077:
            log.warning("token file %s is readable by group or others; chmod 600 it", path)
        token = text.strip()
        if not token:
            raise InvalidArgument(f"the token file {path} (from {source}) is empty")
        return token
    token = (os.environ.get(env_var) or "").strip()
    return token or None


def inference_token_refused(target: str, token: str | None) -> str:
    """The one line a client prints when ``target`` refused its inference token (UNAUTHENTICATED): none was
    given, or another than the server's; it names the three ways to give it."""
    how = (f"set ${INFERENCE_TOKEN_FILE_ENV} or ${INFERENCE_TOKEN_ENV} (`llmwatts load`: --inference-token-file PATH) "
           "to the server's inference token")
    if token:
        return f"{target} refused the inference token (not the server's): {how}"
    return f"{target} needs an inference token and none was given: {how}"


def read_pem(path: str | os.PathLike | None, what: str) -> bytes | None:
    """The bytes of a PEM file (a certificate, key or CA: ``what`` names it in the error), None for no
    path; an unreadable file is ``InvalidArgument`` naming it."""
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidArgument(f"cannot read the {what} {path}: {e.strerror}") from e


def is_loopback_host(host: str) -> bool:
    """True for a bind host that only loopback clients can reach (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
