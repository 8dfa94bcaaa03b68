"""The ``llmwatts`` command: one subcommand per box, each a thin wrapper over one library function.

Each box contributes ``add_parser(subparsers)`` which registers its subcommand and sets ``func`` to a
callable taking the parsed args. User mistakes (``LlmwattsError``) exit 2 with one readable line.
"""

import argparse
import sys

from llmwatts import __version__
from llmwatts.errors import LlmwattsError

# (module, attribute): every box's subcommands. Imported lazily so `llmwatts --help` stays fast.
SUBCOMMANDS = [
    "llmwatts.server.cli",
    "llmwatts.loadgen.cli",
    "llmwatts.analysis.cli",
    "llmwatts.cap_cli",
    "llmwatts.server.clock_cli",
    "llmwatts.demo",
    "llmwatts.study.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmwatts",
        description="Measure what LLM inference costs in joules, and what power caps do to latency.",
    )
    parser.add_argument("--version", action="version", version=f"llmwatts {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    import importlib

    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a box not built yet
                continue
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LlmwattsError as e:
        print(f"llmwatts {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmwatts {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
