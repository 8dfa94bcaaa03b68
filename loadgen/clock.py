"""The client–server clock offset, measured over ``Control.GetServerInfo`` (docs/loadgen.md, "Clock offset")."""

from __future__ import annotations

import time

from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

CONTROL_DEADLINE_S = 10.0


def server_clock_offset_ns(stub: pb_grpc.ControlStub, metadata=(), deadline_s: float = CONTROL_DEADLINE_S,
                          samples: int = 5):
    """(ServerInfo, server − client clock offset in ns): server_time_ns minus the midpoint of the call, from
    the sample with the shortest round trip (NTP's rule). The first call also sets up the connection, whose
    cost would otherwise bias the midpoint."""
    best = None
    for _ in range(samples):
        sent_ns = time.time_ns()
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=deadline_s, metadata=metadata)
        received_ns = time.time_ns()
        rtt_ns = received_ns - sent_ns
        if best is None or rtt_ns < best[0]:
            best = (rtt_ns, info, info.server_time_ns - (sent_ns + received_ns) // 2)
    return best[1], best[2]
