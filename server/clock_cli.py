"""``llmwatts clocks get|set|reset``: read and lock a running server's GPU clocks (``ClockClient``)."""

from __future__ import annotations

import argparse
import time

from llmwatts.clock_client import ClockClient
from llmwatts.cap_cli import add_control_options
from llmwatts.client import control_token
from llmwatts.server.auth import CONTROL_TOKEN_ENV, CONTROL_TOKEN_FILE_ENV
from llmwatts.server.gpu.common import format_mhz


def print_clocks(reply, target: str) -> None:
    from rich.table import Table

    from llmwatts.console import console

    table = Table(title=f"clocks on {target} (backend {reply.backend})")
    for column in ("gpu", "uuid", "SM MHz", "memory MHz", "locked", "held back by", "supported", "lease left"):
        table.add_column(column, no_wrap=column in ("uuid",))
    now_ns = time.time_ns()
    for g in reply.gpus:
        lease = f"{max(0.0, (g.lease_end_ns - now_ns) / 1e9):.0f} s" if g.lease_end_ns else "-"
        locked = "-"
        if g.locked_sm_max_mhz:
            locked = f"SM {g.locked_sm_min_mhz}-{g.locked_sm_max_mhz}"
            if g.locked_mem_max_mhz:
                locked += f", mem {g.locked_mem_min_mhz}-{g.locked_mem_max_mhz}"
        supported = "; ".join(f"memory {s.mem_mhz}: SM {format_mhz(tuple(s.sm_mhz), most=12)}" for s in g.supported)
        table.add_row(f"{g.rank}:{g.index}", g.uuid, f"{g.sm_mhz} / {g.sm_max_mhz}", f"{g.mem_mhz} / {g.mem_max_mhz}",
                      locked, ", ".join(g.event_reasons) or "-", supported, lease)
    console().print(table)


def run(args: argparse.Namespace) -> int:
    with ClockClient(args.target, token=control_token(args.control_token_file), ca=args.ca, cert=args.cert, key=args.key,
                     timeout_s=args.timeout_s, gpus=args.gpus) as clocks:
        if args.clocks_command == "get":
            reply = clocks.get()
        elif args.clocks_command == "set":
            reply = clocks.lock(args.sm_min_mhz, args.sm_max_mhz, mem_min_mhz=args.mem_min_mhz,
                                mem_max_mhz=args.mem_max_mhz, lease_s=args.lease_s, reason=args.reason)
        else:
            reply = clocks.reset(reason=args.reason)
    print_clocks(reply, args.target)
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "clocks",
        help="read or lock a running server's GPU clocks",
        description=(
            "Read the GPU clocks of a running llmwatts server (current, maximum, supported, and what holds "
            "them back), or lock them. Locking needs the server's control token: "
            f"--control-token-file, ${CONTROL_TOKEN_FILE_ENV} or ${CONTROL_TOKEN_ENV}. Locks are reset when their "
            "lease runs out and when the server stops. Servers on shared GPUs (nvml-readonly) only read."
        ),
    )
    actions = parser.add_subparsers(dest="clocks_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        add_control_options(p)
        p.set_defaults(func=run)

    common(actions.add_parser("get", help="show current, maximum and supported clocks, locks and throttle reasons",
                              description="Show each selected GPU's clocks, lock, lease, supported clocks and "
                                          "the reasons its clocks are held back now."))
    set_parser = actions.add_parser("set", help="lock GPU clocks for a lease",
                                    description="Lock the selected GPUs' SM clock (and memory clock where the "
                                                "GPU supports it) to clocks it lists as supported.")
    common(set_parser)
    set_parser.add_argument("--sm-min-mhz", type=int, required=True, help="lowest SM clock, MHz")
    set_parser.add_argument("--sm-max-mhz", type=int, default=None,
                            help="highest SM clock, MHz (default: --sm-min-mhz, a pinned clock)")
    set_parser.add_argument("--mem-min-mhz", type=int, default=0, help="lowest memory clock (0: leave alone)")
    set_parser.add_argument("--mem-max-mhz", type=int, default=0, help="highest memory clock (0: leave alone)")
    set_parser.add_argument("--lease-s", type=float, default=0.0,
                            help="seconds until the lock is reset (0 = the server's default lease)")
    set_parser.add_argument("--reason", default="", help="recorded with the clock-change event")
    reset_parser = actions.add_parser("reset", help="unlock GPU clocks", description="Unlock the selected GPUs' clocks now.")
    common(reset_parser)
    reset_parser.add_argument("--reason", default="", help="recorded with the clock-change event")
