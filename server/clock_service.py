"""The Control RPCs for locked GPU clocks (GetClocks, SetLockedClocks, ResetClocks): a mixin of
``ControlServicer`` over the host's ``ClockManager`` (server/clocks.py). The bearer-token check of the
two mutating calls is the auth interceptor's (auth.CONTROL_MUTATING_METHODS)."""

from llmwatts.server import auth
from llmwatts.server.clocks import clocks_reply
from llmwatts.server.gpu import LockedClocks
from llmwatts.server.grpc_errors import mapped


class ClockControl:
    """Clock RPCs; the class using it has ``self.host`` (a ``Host``)."""

    @mapped
    def GetClocks(self, request, context):
        return clocks_reply(self.host.clocks.get(list(request.selector.gpus)), self.host.power_source)

    @mapped
    def SetLockedClocks(self, request, context):
        lock = LockedClocks(request.sm_min_mhz, request.sm_max_mhz, request.mem_min_mhz, request.mem_max_mhz)
        statuses = self.host.clocks.set(list(request.selector.gpus), lock, request.lease_s,
                                        who=auth.who(context), reason=request.reason)
        return clocks_reply(statuses, self.host.power_source)

    @mapped
    def ResetClocks(self, request, context):
        statuses = self.host.clocks.reset(list(request.selector.gpus), who=auth.who(context), reason=request.reason)
        return clocks_reply(statuses, self.host.power_source)
