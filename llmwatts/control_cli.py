"""What the Control commands (``llmwatts cap``, ``llmwatts clocks``) share: their options, their
``get``/``set``/``reset`` actions, the client their options name, and a lease's time left."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from llmwatts.targets import DEFAULT_TARGET
from llmwatts.credentials import CONTROL_TOKEN_ENV, CONTROL_TOKEN_FILE_ENV


def add_control_options(p: argparse.ArgumentParser) -> None:
    """The options of a Control command (``cap``, ``clocks``): target, GPUs, TLS, token, deadline; the same
    names and forms as ``load`` and ``sweep``."""
    p.add_argument("--target", default=DEFAULT_TARGET, metavar="HOST:PORT",
                   help="address of `llmwatts serve` (default %(default)s)")
    p.add_argument("--gpus", metavar="SEL[,SEL...]",
                   help="GPUs by uuid, index or rank:index, comma-separated (default all)")
    p.add_argument("--ca", metavar="PEM", help="TLS: CA bundle that signed the server's certificate (turns TLS on)")
    p.add_argument("--cert", metavar="PEM", help="mutual TLS: client certificate (with --key)")
    p.add_argument("--key", metavar="PEM", help="mutual TLS: client private key")
    p.add_argument("--control-token-file", metavar="PATH",
                   help=f"file holding the control token (default ${CONTROL_TOKEN_FILE_ENV}, then ${CONTROL_TOKEN_ENV})")
    p.add_argument("--timeout-s", type=float, default=10.0, help="deadline of the call (default %(default)s s)")


def client_of(client_class, args: argparse.Namespace):
    """The Control client (``CapClient``, ``ClockClient``) the command's options name."""
    from llmwatts.client import control_token  # grpc: once a command runs, not when `llmwatts` builds its parsers

    return client_class(args.target, token=control_token(args.control_token_file), ca=args.ca, cert=args.cert,
                        key=args.key, timeout_s=args.timeout_s, gpus=args.gpus)


def lease_left(lease_end_ns: int, now_ns: int) -> str:
    """A lease's time left for a table ("-": no lease)."""
    return f"{max(0.0, (lease_end_ns - now_ns) / 1e9):.0f} s" if lease_end_ns else "-"


def add_actions(subparsers, name: str, *, help: str, description: str, run: Callable[[argparse.Namespace], int],
                noun: str, get: tuple[str, str], set: tuple[str, str], reset: tuple[str, str],
                set_options: Callable[[argparse.ArgumentParser], None]) -> None:
    """Command ``name`` with actions get, set and reset (each ``(help, description)``; the action in
    ``args.<name>_command``). ``set_options`` adds what ``set`` asks for; set's lease and every change's
    reason are added here. ``noun``: what a change changes (for the help)."""
    parser = subparsers.add_parser(name, help=help, description=description)
    actions = parser.add_subparsers(dest=f"{name}_command", metavar="ACTION", required=True)

    def action(action_name: str, texts: tuple[str, str]) -> argparse.ArgumentParser:
        p = actions.add_parser(action_name, help=texts[0], description=texts[1])
        add_control_options(p)
        p.set_defaults(func=run)
        return p

    action("get", get)
    set_parser = action("set", set)
    set_options(set_parser)
    set_parser.add_argument("--lease-s", type=float, default=0.0,
                            help=f"seconds until the {noun} reverts (0 = the server's default lease)")
    for p in (set_parser, action("reset", reset)):
        p.add_argument("--reason", default="", help=f"recorded with the {noun}-change event")
