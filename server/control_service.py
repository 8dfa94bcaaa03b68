"""The Control servicer: server info, run markers and power caps (clocks: clock_service.py)."""

import time

from llmwatts.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from llmwatts.server import auth
from llmwatts.server.clock_service import ClockControl
from llmwatts.server.export import ExportServicerMixin
from llmwatts.server.grpc_errors import mapped
from llmwatts.server.host import Host, versions
from llmwatts.server.power import caps_reply
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
            model=h.loaded.name, dtype=str(h.loaded.dtype).removeprefix("torch."), devices=h.devices,
            gpus=gpus, shard_count=h.shard_count, engine=h.engine.name, power_source=h.power_source, versions=versions(),
            max_batch_size=c.max_batch_size, max_new_tokens_limit=c.max_new_tokens_limit,
            context_length=h.loaded.context_length, default_max_new_tokens=c.default_max_new_tokens,
            server_id=h.server_id, server_time_ns=now_ns, node=h.node, telemetry_hz=int(c.telemetry_hz))

    @mapped
    def BeginRun(self, request, context):
        if not request.run_id:
            raise InvalidArgument("run_id is empty: name the run")
        now, energy_j = time.time_ns(), self.host.meter.total_j()
        if not self.host.store.begin_run(request.run_id, now, energy_j, dict(request.labels), self.host.simulated):
            raise AlreadyExists(f"run {request.run_id!r} was already begun on this server: use a new run id")
        return pb.RunMarker(run_id=request.run_id, server_ns=now, energy_j=energy_j, simulated=self.host.simulated)

    @mapped
    def EndRun(self, request, context):
        now, energy_j = time.time_ns(), self.host.meter.total_j()
        outcome = self.host.store.end_run(request.run_id, now, energy_j)
        if outcome == "unknown":
            raise NotFound(f"run {request.run_id!r} was never begun on this server: call BeginRun first")
        if outcome == "already-ended":
            raise FailedPrecondition(f"run {request.run_id!r} has already ended; its end marker stays as it was")
        return pb.RunMarker(run_id=request.run_id, server_ns=now, energy_j=energy_j, simulated=self.host.simulated)

    @mapped
    def GetPowerCaps(self, request, context):
        return caps_reply(self.host.caps.get(list(request.selector.gpus)), self.host.power_source)

    @mapped
    def SetPowerCap(self, request, context):
        statuses = self.host.caps.set(list(request.selector.gpus), request.cap_w, request.lease_s,
                                      who=auth.who(context), reason=request.reason)
        return caps_reply(statuses, self.host.power_source)

    @mapped
    def ResetPowerCap(self, request, context):
        statuses = self.host.caps.reset(list(request.selector.gpus), who=auth.who(context), reason=request.reason)
        return caps_reply(statuses, self.host.power_source)

