"""Dependencies by role: which ``llmwatts[extra]`` brings a module, and the one line a command prints
when it is missing (``pip install 'llmwatts[server]'``), instead of a traceback.

Extras (pyproject.toml): ``server`` (torch, transformers, NVML, ...), ``shards`` (FairScale, for
``serve --shards`` only), ``loadgen`` (Locust), ``analysis`` (matplotlib), ``all`` (every one of them, what
the README installs). The base install holds what every client command needs (grpcio, protobuf, rich).
"""

from __future__ import annotations

from llmwatts.errors import FailedPrecondition

# Third-party module → the extra that brings it. Shared modules name the command's own extra (below).
EXTRA_OF_MODULE = {
    "torch": "server", "transformers": "server", "tokenizers": "server", "safetensors": "server",
    "grpc_health": "server", "grpc_reflection": "server", "pynvml": "server", "prometheus_client": "server",
    "fairscale": "shards",
    "locust": "loadgen", "gevent": "loadgen", "zmq": "loadgen",
    "matplotlib": "analysis", "jinja2": "analysis",
    "sqlite_utils": "analysis", "numpy": "analysis",
}
# Command → the extra it needs whole (cap and clocks need only the base install).
EXTRA_OF_COMMAND = {"serve": "server", "load": "loadgen", "sweep": "loadgen", "report": "analysis",
                    "demo": "all", "study": "all"}
# Subcommand module → the commands it registers (so a command whose extra is missing still says so).
COMMANDS_OF_MODULE = {
    "llmwatts.server.cli": ("serve",), "llmwatts.loadgen.cli": ("load", "sweep"),
    "llmwatts.analysis.cli": ("report",), "llmwatts.cap_cli": ("cap",), "llmwatts.clock_cli": ("clocks",),
    "llmwatts.demo": ("demo",), "llmwatts.study.cli": ("study",),
}


class MissingExtra(FailedPrecondition):
    """A command needs a module its install lacks; the message names the extra that brings it."""


def missing_extra(error: ModuleNotFoundError, command: str | None) -> MissingExtra | None:
    """The one-line error for ``error`` when an extra brings the missing module; None for anything else
    (a genuine bug keeps its traceback)."""
    module = (error.name or "").split(".")[0]
    if module not in EXTRA_OF_MODULE:
        return None
    extra = EXTRA_OF_MODULE[module] if module == "fairscale" else (
        EXTRA_OF_COMMAND.get(command or "") or EXTRA_OF_MODULE[module])
    what = "serve --shards" if module == "fairscale" else (command or "this command")
    return MissingExtra(f"`llmwatts {what}` needs {module}, which this install lacks: "
                        f"pip install 'llmwatts[{extra}]' (or 'llmwatts[all]')")
