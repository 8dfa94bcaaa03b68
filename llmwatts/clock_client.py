"""Locked GPU clocks of a running server, as a library: what ``llmwatts clocks`` and a study's clock
dimension call (docs/clocks.md).

    with ClockClient("127.0.0.1:50051", token=token) as clocks:
        with clocks.locked(1395, lease_s=900, reason="study s1: clock 1395"):
            ...  # run the load; the lock is reset on leaving, and its lease resets it if we die

Every call is one Control RPC with a deadline; a failed call raises ``ClockCommandError`` (an
``LlmwattsError``) with the status code and what to do.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from llmwatts.client import ClientError, ControlClient


class ClockCommandError(ClientError):
    """A clock Control RPC failed; the message is ``CODE: details``."""


class ClockClient(ControlClient):
    """Locked clocks over one control channel to ``target`` (``ControlClient``)."""

    error_class = ClockCommandError

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
