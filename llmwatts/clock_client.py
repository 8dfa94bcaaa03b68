"""Locked GPU clocks of a running server, as a library: what ``llmwatts clocks`` and a study's clock
dimension call (docs/clocks.md).

    with ClockClient("127.0.0.1:50051", token=token) as clocks:
        with clocks.locked(1395, lease_s=900, reason="study s1: clock 1395"):
            ...  # run the load; the lock is reset on leaving, and its lease resets it if we die

Every call is one Control RPC with a deadline; a failed call raises ``ClockCommandError`` (an
``LlmwattsError``) with the status code and what to do.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import grpc

from llmwatts.errors import InvalidArgument
from llmwatts.client import ClientError, client_channel, control_token, gpu_selector, rpc_error


class ClockCommandError(ClientError):
    """A clock Control RPC failed; the message is ``CODE: details``."""


class ClockClient:
    """One control channel to ``target``; ``token`` defaults to the control token of the environment."""

    def __init__(self, target: str, *, token: str | None = None, ca=None, cert=None, key=None,
                 timeout_s: float = 10.0, gpus: str | list[str] | None = None):
        from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise InvalidArgument(f"timeout_s must be a positive number of seconds, got {timeout_s:g}")
        self.target, self.timeout_s = target, timeout_s
        self.selector = gpu_selector(gpus)
        self._channel = client_channel(target, ca=ca, cert=cert, key=key, token=token or control_token())
        self._stub = pb_grpc.ControlStub(self._channel)

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise ClockCommandError(str(rpc_error(e, self.target))) from None

    def get(self):
        """The selected GPUs' clocks: current, maximum, supported, the lock held and its lease
        (``llmwatts.v1.ClocksReply``)."""
        from llmwatts.v1 import llmwatts_pb2 as pb

        return self._call("GetClocks", pb.GetClocksRequest(selector=self.selector))

    def lock(self, sm_min_mhz: int, sm_max_mhz: int | None = None, *, mem_min_mhz: int = 0, mem_max_mhz: int = 0,
             lease_s: float = 0.0, reason: str = ""):
        """Lock the SM clock to [min, max] MHz (max defaults to min: a pinned clock) for ``lease_s``
        seconds (0: the server's default); memory too where the GPU supports it."""
        from llmwatts.v1 import llmwatts_pb2 as pb

        request = pb.SetLockedClocksRequest(
            selector=self.selector, sm_min_mhz=int(sm_min_mhz),
            sm_max_mhz=int(sm_min_mhz if sm_max_mhz is None else sm_max_mhz), mem_min_mhz=int(mem_min_mhz),
            mem_max_mhz=int(mem_max_mhz), lease_s=lease_s, reason=reason)
        return self._call("SetLockedClocks", request)

    def reset(self, reason: str = ""):
        """Unlock the selected GPUs' clocks (those this server locked)."""
        from llmwatts.v1 import llmwatts_pb2 as pb

        return self._call("ResetClocks", pb.ResetClocksRequest(selector=self.selector, reason=reason))

    @contextmanager
    def locked(self, sm_min_mhz: int, sm_max_mhz: int | None = None, *, lease_s: float = 0.0,
               reason: str = "", **memory) -> Iterator[object]:
        """Hold a lock for the ``with`` block; reset on leaving, however it is left (the lease covers a
        client that dies)."""
        reply = self.lock(sm_min_mhz, sm_max_mhz, lease_s=lease_s, reason=reason, **memory)
        try:
            yield reply
        finally:
            self.reset(reason=f"{reason} done" if reason else "done")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "ClockClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
