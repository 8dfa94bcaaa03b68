"""A server's lifecycle: start it, announce it, serve until SIGTERM/SIGINT, stop it in order.

``serve(config)`` is what ``llmwatts serve`` runs; ``sharded.py``'s rank 0 calls ``run_until_stopped``
with its own server. CLI modules call this; this calls no CLI module.
"""

import errno
import logging
import signal
import socket
import threading
from pathlib import Path

from llmwatts.errors import Unavailable
from llmwatts.server.config import ServerConfig

log = logging.getLogger(__name__)


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on, in one line and before the model loads. (The server binds
    exclusively too, so a port taken in between still fails; this is the early, quiet check.)"""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise Unavailable(f"cannot listen on {host}:{port}: {e.strerror}; check --host") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no owner
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise Unavailable(f"port {port} on {host} is already in use (another llmwatts serve?): "
                                      f"stop it, or pick another with --port (0 picks a free one)") from None
                if e.errno == errno.EACCES:
                    raise Unavailable(f"no permission to listen on port {port}: ports below 1024 need root; "
                                      f"pick another with --port") from None
                # Anything else (an address family this host lacks): gRPC's own bind decides.


def write_port_file(port_file: Path | None, port: int) -> None:
    """Tell scripts the bound port once serving: written whole (temp file + rename) or not at all."""
    if port_file:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.replace(port_file)


def simulated_notice(host) -> str | None:
    """One line saying the server's joules are modelled, when any of its GPUs is simulated (else None)."""
    sims = [g for g in getattr(host, "gpus", []) if getattr(g, "simulated", False)]
    if not sims:
        return None
    return (f"llmwatts: power is SIMULATED on {len(sims)} GPU(s) ({sims[0].name}): every watt and joule this server "
            "records is modelled (docs/power-caps.md), not measured; on a shared CPU box it follows the model "
            "times this host's wall time, so it is noisy (docs/energy.md)")


def run_until_stopped(server, banner: str, port: int, port_file: Path | None) -> int:
    """Start ``server``, announce it, and serve until SIGTERM/SIGINT, which stop it in order (caps restored,
    followers stopped) on a thread of its own; that stop finishes before this returns."""
    stopping = threading.Event()
    stopper = threading.Thread(target=server.stop, args=(5.0,), name="stop")

    def on_signal(signum, frame):
        if not stopping.is_set():
            stopping.set()
            log.info("signal %d: stopping (restoring caps)", signum)
            stopper.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
        notice = simulated_notice(getattr(server, "host", None))
        print(banner if notice is None else f"{banner}\n{notice}", flush=True)
        write_port_file(port_file, port)
        server.wait_for_termination()
    finally:
        if stopping.is_set():
            stopper.join()
        else:
            server.stop(0)
    return 0


def serve(config: ServerConfig, port_file: Path | None = None) -> int:
    """Build, bind and serve ``config`` until a signal stops it (``llmwatts serve``, one shard)."""
    from llmwatts.server.service import create_server

    server, port = create_server(config)
    banner = f"llmwatts serving {config.model} on {config.host}:{port} (db {config.db_path})"
    return run_until_stopped(server, banner, port, port_file)
