"""Power caps of a running server, as a library: what ``llmwatts cap`` and ``llmwatts sweep`` call.

    with CapClient("127.0.0.1:50051", token=token, gpus="0") as caps:
        caps.check_caps([250, 175])          # every cap within every selected GPU's range, before any change
        caps.set(175, lease_s=900, reason="sweep s1")
        ...
        caps.reset(reason="sweep s1 done")

Every call is one Control RPC with a deadline; a failed call raises ``ClientError`` ("CODE: details").
"""

from __future__ import annotations

import math

import grpc

from llmwatts.client import client_channel, control_token, gpu_selector, parse_target, rpc_error
from llmwatts.errors import InvalidArgument


class CapClient:
    """One control channel to ``target``; ``token`` defaults to the control token of the environment."""

    def __init__(self, target: str, *, token: str | None = None, ca=None, cert=None, key=None,
                 timeout_s: float = 10.0, gpus: str | list[str] | None = None):
        from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise InvalidArgument(f"--timeout-s must be a positive number of seconds, got {timeout_s:g}")
        self.target, self.timeout_s = parse_target(target), timeout_s
        self.selector = gpu_selector(gpus)
        self._channel = client_channel(self.target, ca=ca, cert=cert, key=key, token=token or control_token())
        self._stub = pb_grpc.ControlStub(self._channel)

    def _call(self, method: str, request):
        try:
            return getattr(self._stub, method)(request, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise rpc_error(e, self.target) from None

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

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "CapClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
