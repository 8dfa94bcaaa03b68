"""``llmwatts cap get|set|reset``: read and change a running server's GPU power caps."""

from __future__ import annotations

import argparse
import time

from llmwatts.cap_client import CapClient
from llmwatts.client import DEFAULT_TARGET, control_token
from llmwatts.server.auth import CONTROL_TOKEN_ENV, CONTROL_TOKEN_FILE_ENV


def call_control(args: argparse.Namespace):
    """Make the Control call ``args.cap_command`` names; the ``PowerCapsReply``."""
    with CapClient(args.target, token=control_token(args.control_token_file), ca=args.ca, cert=args.cert,
                   key=args.key, timeout_s=args.timeout_s, gpus=args.gpus) as caps:
        if args.cap_command == "get":
            return caps.get()
        if args.cap_command == "set":
            return caps.set(args.watts, lease_s=args.lease_s, reason=args.reason)
        return caps.reset(reason=args.reason)


def print_caps(reply, target: str) -> None:
    from rich.table import Table

    from llmwatts.console import console

    table = Table(title=f"power caps on {target} (backend {reply.backend})")
    for column in ("gpu", "uuid", "node", "cap W", "enforced W", "default W", "range W", "lease left"):
        table.add_column(column, no_wrap=column in ("uuid", "range W"))
    now_ns = time.time_ns()
    for g in reply.gpus:
        lease = f"{max(0.0, (g.lease_end_ns - now_ns) / 1e9):.0f} s" if g.lease_end_ns else "-"
        table.add_row(
            f"{g.rank}:{g.index}", g.uuid, g.node, f"{g.cap_w:g}",
            f"{g.enforced_w:g}", f"{g.default_w:g}", f"{g.min_w:g}–{g.max_w:g}", lease,
        )
    console().print(table)


def run(args: argparse.Namespace) -> int:
    print_caps(call_control(args), args.target)
    return 0


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


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "cap",
        help="read or change a running server's GPU power caps",
        description=(
            "Read or change the GPU power caps of a running llmwatts server. Changing caps needs the "
            f"server's control token: --control-token-file, ${CONTROL_TOKEN_FILE_ENV} or ${CONTROL_TOKEN_ENV}. "
            "Caps revert when their lease runs out and when the server stops."
        ),
    )
    actions = parser.add_subparsers(dest="cap_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        add_control_options(p)
        p.set_defaults(func=run)

    common(actions.add_parser("get", help="show caps, defaults, ranges and leases",
                              description="Show each selected GPU's cap, enforced cap, default, range and lease."))
    set_parser = actions.add_parser("set", help="cap GPUs for a lease",
                                    description="Cap the selected GPUs; the cap reverts when the lease runs out.")
    common(set_parser)
    set_parser.add_argument("--watts", type=float, required=True, help="the power cap in watts")
    set_parser.add_argument("--lease-s", type=float, default=0.0,
                            help="seconds until the cap reverts (0 = the server's default lease)")
    set_parser.add_argument("--reason", default="", help="recorded with the cap-change event")
    reset_parser = actions.add_parser("reset", help="return GPUs to their caps from before llmwatts changed them",
                                      description="Return the selected GPUs to their original caps now.")
    common(reset_parser)
    reset_parser.add_argument("--reason", default="", help="recorded with the cap-change event")
