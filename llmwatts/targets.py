"""The one target parser (``HOST:PORT`` from what users type) of every command and library.

Standard library only, without grpc: the parsers every ``llmwatts`` command builds at start-up
(``llmwatts/cli.py:build_parser``) import it, and a command that never opens a channel should not pay for
grpc. ``llmwatts/client.py`` re-exports it.
"""

from __future__ import annotations

from llmwatts.errors import InvalidArgument

DEFAULT_TARGET = "127.0.0.1:50051"
# What users put before HOST:PORT (Locust's host field is a URL); grpc itself would read "grpc://h:p" as a
# DNS name and fail only when connecting.
_SCHEMES = ("grpc://", "grpcs://", "http://", "https://")
# A DNS name is at most 253 characters; with brackets, a port and a resolver prefix ("dns:///") this is
# ample, and it keeps an error's echo of the input short.
MAX_TARGET_CHARS = 300


def strip_scheme(text: str) -> str:
    """``h:p`` from ``grpc://h:p/`` (what users type into Locust's host field): surrounding whitespace,
    one leading scheme (any case) and trailing slashes removed; unchecked (``parse_target`` checks)."""
    target = text.strip()
    for scheme in _SCHEMES:
        if target[:len(scheme)].lower() == scheme:
            target = target[len(scheme):]
            break
    return target.rstrip("/")


def parse_target(text: str | None, flag: str = "--target") -> str:
    """``HOST:PORT`` from what users type (``grpc://h:p/``, ``h:p``, ``[::1]:p``), checked: a host, a port
    1-65535, at most ``MAX_TARGET_CHARS`` characters. The one target check of every command and library."""
    text = text or ""
    target = strip_scheme(text[:MAX_TARGET_CHARS + 1])
    host, _, port = target.rpartition(":")
    if (len(text) > MAX_TARGET_CHARS or not host.strip("[]") or any(c.isspace() for c in host)
            or not port.isascii() or not port.isdigit() or not 0 < int(port) <= 65535):
        shown = repr(text)  # its escapes (\U0001b2fc: 10 characters for one) count, not the text's length
        if len(shown) > 80:
            shown = f"{shown[:80]}... ({len(text)} characters)"
        raise InvalidArgument(f"{flag} wants HOST:PORT with a port from 1 to 65535 (at most {MAX_TARGET_CHARS} "
                              f"characters), e.g. {DEFAULT_TARGET}; got {shown}")
    return target
