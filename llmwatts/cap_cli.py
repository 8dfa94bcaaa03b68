"""``llmwatts cap get|set|reset``: read and change a running server's GPU power caps (``CapClient``)."""

from __future__ import annotations

import argparse
import time

from llmwatts.control_cli import add_actions, client_of, lease_left
from llmwatts.credentials import CONTROL_TOKEN_ENV, CONTROL_TOKEN_FILE_ENV


def call_control(args: argparse.Namespace):
    """Make the Control call ``args.cap_command`` names; the ``PowerCapsReply``."""
    from llmwatts.cap_client import CapClient  # grpc: once the command runs, not when `llmwatts` builds its parsers

    with client_of(CapClient, args) as caps:
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
        table.add_row(f"{g.rank}:{g.index}", g.uuid, g.node, f"{g.cap_w:g}", f"{g.enforced_w:g}", f"{g.default_w:g}",
                      f"{g.min_w:g}–{g.max_w:g}", lease_left(g.lease_end_ns, now_ns))
    console().print(table)


def run(args: argparse.Namespace) -> int:
    print_caps(call_control(args), args.target)
    return 0


def add_parser(subparsers) -> None:
    def set_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--watts", type=float, required=True, help="the power cap in watts")

    add_actions(
        subparsers, "cap", run=run, noun="cap", set_options=set_options,
        help="read or change a running server's GPU power caps",
        description=(
            "Read or change the GPU power caps of a running llmwatts server. Changing caps needs the "
            f"server's control token: --control-token-file, ${CONTROL_TOKEN_FILE_ENV} or ${CONTROL_TOKEN_ENV}. "
            "Caps revert when their lease runs out and when the server stops."
        ),
        get=("show caps, defaults, ranges and leases",
             "Show each selected GPU's cap, enforced cap, default, range and lease."),
        set=("cap GPUs for a lease", "Cap the selected GPUs; the cap reverts when the lease runs out."),
        reset=("return GPUs to their caps from before llmwatts changed them",
               "Return the selected GPUs to their original caps now."),
    )
