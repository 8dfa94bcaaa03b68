"""Power caps of a running server, as a library: what ``llmwatts cap`` and ``llmwatts sweep`` call.

    with CapClient("127.0.0.1:50051", token=token, gpus="0") as caps:
        caps.check_caps([250, 175])          # every cap within every selected GPU's range, before any change
        caps.set(175, lease_s=900, reason="sweep s1")
        ...
        caps.reset(reason="sweep s1 done")

Every call is one Control RPC with a deadline; a failed call raises ``ClientError`` ("CODE: details").
"""

from __future__ import annotations

from llmwatts.client import ControlClient
from llmwatts.errors import InvalidArgument


class CapClient(ControlClient):
    """Power caps over one control channel to ``target`` (``ControlClient``)."""

    def get(self):
        """The selected GPUs' caps, enforced caps, defaults, ranges and leases (``PowerCapsReply``)."""
        from llmwatts.v1 import llmwatts_pb2 as pb

        return self._call("GetPowerCaps", pb.GetPowerCapsRequest(selector=self.selector))

    def set(self, cap_w: float, *, lease_s: float = 0.0, reason: str = ""):
        """Cap the selected GPUs at ``cap_w`` for ``lease_s`` seconds (0: the server's default lease)."""
        from llmwatts.v1 import llmwatts_pb2 as pb

        return self._call("SetPowerCap", pb.SetPowerCapRequest(selector=self.selector, cap_w=cap_w,
                                                               lease_s=lease_s, reason=reason))

    def reset(self, *, reason: str = ""):
        """Return the selected GPUs to their caps from before llmwatts changed them."""
        from llmwatts.v1 import llmwatts_pb2 as pb

        return self._call("ResetPowerCap", pb.ResetPowerCapRequest(selector=self.selector, reason=reason))

    def check_caps(self, caps_w: list[float]) -> None:
        """Refuse, before any is set, a cap outside a selected GPU's range (what SetPowerCap would refuse
        half-way through a sweep)."""
        for g in self.get().gpus:
            outside = [c for c in caps_w if not g.min_w <= c <= g.max_w]
            if outside:
                raise InvalidArgument(
                    f"{', '.join(f'{c:g} W' for c in outside)} outside GPU {g.rank}:{g.index}'s range "
                    f"{g.min_w:g}–{g.max_w:g} W: pick caps in that range")
