"""``llmwatts cap get|set|reset``: read and change a running server's GPU power caps."""

from __future__ import annotations

import argparse
import math
import time

import grpc

from llmwatts.errors import LlmwattsError
from llmwatts.server.auth import CONTROL_TOKEN_ENV, CONTROL_TOKEN_FILE_ENV, client_channel, load_token


class CapCommandError(LlmwattsError):
    """A Control RPC of ``llmwatts cap`` failed; the message is ``CODE: details``."""


def selector_of(gpus: list[str] | None):
    from llmwatts.v1 import llmwatts_pb2

    names = [name.strip() for entry in gpus or [] for name in entry.split(",") if name.strip()]
    return llmwatts_pb2.GpuSelector(gpus=names)


def rpc_error(e: grpc.RpcError, target: str) -> CapCommandError:
    code = e.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return CapCommandError(
            f"UNAVAILABLE: could not reach {target} ({e.details()}); check the server is running "
            "(llmwatts serve) and the address, and whether it uses TLS (--ca)"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CapCommandError(f"DEADLINE_EXCEEDED: {target} did not answer in time; check the server is running")
    return CapCommandError(f"{code.name}: {e.details()}")


def call_control(args: argparse.Namespace):
    """Make the Control call ``args.cap_command`` names; the ``PowerCapsReply``."""
    from llmwatts.v1 import llmwatts_pb2, llmwatts_pb2_grpc

    if not (math.isfinite(args.timeout_s) and args.timeout_s > 0):
        raise CapCommandError(f"--timeout-s must be a positive number of seconds, got {args.timeout_s:g}")
    token = load_token(path=args.token_file)
    channel = client_channel(args.target, ca=args.ca, cert=args.cert, key=args.key, token=token)
    try:
        stub = llmwatts_pb2_grpc.ControlStub(channel)
        selector = selector_of(args.gpus)
        if args.cap_command == "get":
            return stub.GetPowerCaps(llmwatts_pb2.GetPowerCapsRequest(selector=selector), timeout=args.timeout_s)
        if args.cap_command == "set":
            request = llmwatts_pb2.SetPowerCapRequest(
                selector=selector, cap_w=args.watts, lease_s=args.lease_s, reason=args.reason
            )
            return stub.SetPowerCap(request, timeout=args.timeout_s)
        request = llmwatts_pb2.ResetPowerCapRequest(selector=selector, reason=args.reason)
        return stub.ResetPowerCap(request, timeout=args.timeout_s)
    except grpc.RpcError as e:
        raise rpc_error(e, args.target) from None
    finally:
        channel.close()


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
    """The options of a Control command (``cap``, ``clocks``): target, GPUs, TLS, token, deadline."""
    p.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT (default %(default)s)")
    p.add_argument("--gpus", nargs="*", default=[], metavar="GPU",
                   help="GPUs by uuid, 'index' or 'rank:index' (comma or space separated; default all)")
    p.add_argument("--ca", help="PEM CA certificate to verify a TLS server (turns TLS on)")
    p.add_argument("--cert", help="PEM client certificate for mutual TLS (with --key)")
    p.add_argument("--key", help="PEM client key for mutual TLS")
    p.add_argument("--token-file", help=f"file holding the control token (default ${CONTROL_TOKEN_FILE_ENV} "
                                        f"or ${CONTROL_TOKEN_ENV})")
    p.add_argument("--timeout-s", type=float, default=10.0, help="deadline of the call (default %(default)s s)")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "cap",
        help="read or change a running server's GPU power caps",
        description=(
            "Read or change the GPU power caps of a running llmwatts server. Changing caps needs the "
            f"server's control token: ${CONTROL_TOKEN_ENV}, ${CONTROL_TOKEN_FILE_ENV} or --token-file. "
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
