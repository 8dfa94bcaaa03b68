"""The ``llmwatts`` command: one subcommand per box, each a thin wrapper over one library function.

Each box contributes ``add_parser(subparsers)`` which registers its subcommand and sets ``func`` to a
callable taking the parsed args. User mistakes (``LlmwattsError``) exit 2 with one readable line.
"""

import argparse
import sys

from llmwatts import __version__
from llmwatts.errors import LlmwattsError
from llmwatts.extras import COMMANDS_OF_MODULE, missing_extra

# (module, attribute): every box's subcommands. Imported lazily so `llmwatts --help` stays fast.
SUBCOMMANDS = [
    "llmwatts.server.cli",
    "llmwatts.loadgen.cli",
    "llmwatts.analysis.cli",
    "llmwatts.cap_cli",
    "llmwatts.clock_cli",
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

    parser.missing_extras = {}  # command → MissingExtra: its module needs an extra this install lacks
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a box not built yet
                continue
            missing = missing_extra(e, None)
            if missing is None:
                raise
            for command in COMMANDS_OF_MODULE.get(name, ()):
                parser.missing_extras[command] = missing_extra(e, command)
                subparsers.add_parser(command, help=f"(not installed: {missing_extra(e, command)})",
                                      add_help=False)
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in parser.missing_extras:
        print(f"llmwatts {argv[0]}: error: {parser.missing_extras[argv[0]]}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LlmwattsError as e:
        print(f"llmwatts {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        missing = missing_extra(e, args.command)
        if missing is None:
            raise
        print(f"llmwatts {args.command}: error: {missing}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmwatts {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
