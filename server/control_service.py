"""The Control servicer: server info, run markers and power caps (clocks: clock_service.py)."""

import time

from llmwatts.server import auth
from llmwatts.server.clock_service import ClockControl
from llmwatts.server.export import ExportServicerMixin
from llmwatts.server.grpc_errors import mapped
from llmwatts.server.host import Host, versions
from llmwatts.server.limits import MAX_RUN_ID_CHARS, check_labels, check_name, check_reason, check_selector
from llmwatts.server.power import caps_reply
from llmwatts.server.runs import END_RUN_WAIT_S
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc


class ControlServicer(ClockControl, ExportServicerMixin, pb_grpc.ControlServicer):
    def __init__(self, host: Host):
        self.host = host

    @mapped
    def GetServerInfo(self, request, context):
        now_ns = time.time_ns()  # first: clients estimate their clock offset from it and the round trip
        h, c = self.host, self.host.config
        gpus = [pb.GpuInfo(index=g.index, uuid=g.uuid, name=g.name, node=g.node, rank=g.rank,
                           memory_total_bytes=g.memory_total_bytes, simulated=g.simulated) for g in h.gpus]
        return pb.ServerInfo(
            model=h.loaded.name, dtype=h.dtype_text, devices=h.devices,
            gpus=gpus, shard_count=h.shard_count, engine=h.engine.name, power_source=h.power_source, versions=versions(),
            max_batch_size=c.max_batch_size, max_new_tokens_limit=c.max_new_tokens_limit,
            context_length=h.loaded.context_length, default_max_new_tokens=c.default_max_new_tokens,
            server_id=h.server_id, server_time_ns=now_ns, node=h.node, telemetry_hz=int(c.telemetry_hz))

    @mapped
    def BeginRun(self, request, context):
        check_name(request.run_id, "run_id (name the run)", MAX_RUN_ID_CHARS)
        check_labels(dict(request.labels))
        now, energy_j, secret = self.host.runs.begin(request.run_id, dict(request.labels), client_of(context))
        return pb.RunMarker(run_id=request.run_id, server_ns=now, energy_j=energy_j, simulated=self.host.simulated,
                            run_secret=secret)

    @mapped
    def EndRun(self, request, context):
        check_name(request.run_id, "run_id", MAX_RUN_ID_CHARS)
        remaining = context.time_remaining()  # wait for the run's requests until just before our deadline
        wait_s = END_RUN_WAIT_S if remaining is None else max(0.0, remaining - 0.5)
        now, energy_j, pending = self.host.runs.end(request.run_id, request.run_secret, wait_s)
        return pb.RunMarker(run_id=request.run_id, server_ns=now, energy_j=energy_j, simulated=self.host.simulated,
                            pending_requests=pending)

    @mapped
    def GetPowerCaps(self, request, context):
        check_selector(list(request.selector.gpus))
        return caps_reply(self.host.caps.get(list(request.selector.gpus)), self.host.power_source)

    @mapped
    def SetPowerCap(self, request, context):
        check_selector(list(request.selector.gpus))
        check_reason(request.reason)
        statuses = self.host.caps.set(list(request.selector.gpus), request.cap_w, request.lease_s,
                                      who=auth.who(context), reason=request.reason)
        return caps_reply(statuses, self.host.power_source)

    @mapped
    def ResetPowerCap(self, request, context):
        check_selector(list(request.selector.gpus))
        check_reason(request.reason)
        statuses = self.host.caps.reset(list(request.selector.gpus), who=auth.who(context), reason=request.reason)
        return caps_reply(statuses, self.host.power_source)



def client_of(context) -> str:
    """The caller's host (its peer address without the port): open runs are bounded per client."""
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
