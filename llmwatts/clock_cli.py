"""``llmwatts clocks get|set|reset``: read and lock a running server's GPU clocks (``ClockClient``)."""

from __future__ import annotations

import argparse
import time

from llmwatts.control_cli import add_actions, client_of, lease_left
from llmwatts.credentials import CONTROL_TOKEN_ENV, CONTROL_TOKEN_FILE_ENV


def print_clocks(reply, target: str) -> None:
    from rich.table import Table

    from llmwatts.console import console
    from llmwatts.server.gpu.common import format_mhz

    table = Table(title=f"clocks on {target} (backend {reply.backend})")
    for column in ("gpu", "uuid", "SM MHz", "memory MHz", "locked", "held back by", "supported", "lease left"):
        table.add_column(column, no_wrap=column in ("uuid",))
    now_ns = time.time_ns()
    for g in reply.gpus:
        locked = "-"
        if g.locked_sm_max_mhz:
            locked = f"SM {g.locked_sm_min_mhz}-{g.locked_sm_max_mhz}"
            if g.locked_mem_max_mhz:
                locked += f", mem {g.locked_mem_min_mhz}-{g.locked_mem_max_mhz}"
        supported = "; ".join(f"memory {s.mem_mhz}: SM {format_mhz(tuple(s.sm_mhz), most=12)}" for s in g.supported)
        table.add_row(f"{g.rank}:{g.index}", g.uuid, f"{g.sm_mhz} / {g.sm_max_mhz}", f"{g.mem_mhz} / {g.mem_max_mhz}",
                      locked, ", ".join(g.event_reasons) or "-", supported, lease_left(g.lease_end_ns, now_ns))
    console().print(table)


def run(args: argparse.Namespace) -> int:
    from llmwatts.clock_client import ClockClient  # grpc: once the command runs, not when `llmwatts` builds its parsers

    with client_of(ClockClient, args) as clocks:
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
    def set_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--sm-min-mhz", type=int, required=True, help="lowest SM clock, MHz")
        p.add_argument("--sm-max-mhz", type=int, default=None,
                       help="highest SM clock, MHz (default: --sm-min-mhz, a pinned clock)")
        p.add_argument("--mem-min-mhz", type=int, default=0, help="lowest memory clock (0: leave alone)")
        p.add_argument("--mem-max-mhz", type=int, default=0, help="highest memory clock (0: leave alone)")

    add_actions(
        subparsers, "clocks", run=run, noun="clock", set_options=set_options,
        help="read or lock a running server's GPU clocks",
        description=(
            "Read the GPU clocks of a running llmwatts server (current, maximum, supported, and what holds "
            "them back), or lock them. Locking needs the server's control token: "
            f"--control-token-file, ${CONTROL_TOKEN_FILE_ENV} or ${CONTROL_TOKEN_ENV}. Locks are reset when their "
            "lease runs out and when the server stops. Servers on shared GPUs (nvml-readonly) only read."
        ),
        get=("show current, maximum and supported clocks, locks and throttle reasons",
             "Show each selected GPU's clocks, lock, lease, supported clocks and the reasons its clocks are held "
             "back now."),
        set=("lock GPU clocks for a lease",
             "Lock the selected GPUs' SM clock (and memory clock where the GPU supports it) to clocks it lists as "
             "supported."),
        reset=("unlock GPU clocks", "Unlock the selected GPUs' clocks now."),
    )
