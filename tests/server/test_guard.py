"""Issue 16 on the server's guard (server/guard.py): per-class slots keep health and the control plane
answering, calls refused by grpc's own limit are counted, an undecodable message is INVALID_ARGUMENT. Each
test names the defect it guards against; all run against a real tiny server on CPU."""

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc
from tests.conftest import db_of, serving, start_server


def idle_streams(channel, n: int, stop):
    """``n`` reflection streams that send nothing until ``stop`` is set (a careless client's idle calls)."""
    from grpc_reflection.v1alpha import reflection_pb2_grpc

    def quiet():
        stop.wait()
        return
        yield

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return [stub.ServerReflectionInfo(quiet()) for _ in range(n)]


def test_idle_streams_never_starve_health_and_the_control_plane(tmp_path):
    """#16.2: ~144 idle streaming calls filled the server's one concurrent-RPC limit; health checks,
    GetServerInfo, SetPowerCap and ResetPowerCap then got RESOURCE_EXHAUSTED."""
    import threading

    srv, port = start_server(tmp_path, allow_insecure_loopback_control=True)
    stop = threading.Event()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        streams = idle_streams(channel, 200, stop)
        time.sleep(1.0)
        control = pb_grpc.ControlStub(channel)
        t0 = time.perf_counter()
        assert serving(channel) == health_pb2.HealthCheckResponse.SERVING
        control.GetServerInfo(pb.GetServerInfoRequest(), timeout=1)
        control.GetPowerCaps(pb.GetPowerCapsRequest(), timeout=1)
        control.SetPowerCap(pb.SetPowerCapRequest(cap_w=200, reason="test"), timeout=1)
        control.ResetPowerCap(pb.ResetPowerCapRequest(reason="test"), timeout=1)
        assert time.perf_counter() - t0 < 5
        refused = db_of(srv)["refusals"].get((srv.host.server_id, "RESOURCE_EXHAUSTED"))["count"]
        assert refused >= 150  # idle streams beyond the few "other" slots were refused at once, and counted
    finally:
        stop.set()
        for s in streams:
            s.cancel()
        srv.stop(1)


def test_calls_refused_by_grpcs_own_limit_are_counted(tmp_path, monkeypatch):
    """#16.7: calls refused by grpc's own limit of calls in flight (``maximum_concurrent_rpcs``, the backstop
    above the guard's slots) never reached a handler and were counted nowhere on the server."""
    import threading

    from llmwatts.server import service

    monkeypatch.setattr(service, "grpc_limit", lambda workers: 3)  # (4 x the pool's threads in production)
    srv, port = start_server(tmp_path)
    stop = threading.Event()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        streams = idle_streams(channel, 3, stop)  # admitted (the "other" slots): they fill grpc's 3 places
        time.sleep(1.0)
        refused = []
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as e:
                serving(channel)
            refused.append(e.value)
        assert all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "Concurrent RPC limit" in r.details()
                   for r in refused)  # grpc's own refusal, not the guard's
        assert db_of(srv)["refusals"].get((srv.host.server_id, "RESOURCE_EXHAUSTED"))["count"] == 5
    finally:
        stop.set()
        for s in streams:
            s.cancel()
        srv.stop(1)


@pytest.mark.parametrize("method", ["/llmwatts.v1.Inference/Generate", "/llmwatts.v1.Control/BeginRun",
                                    "/llmwatts.v1.Control/SetPowerCap", "/grpc.health.v1.Health/Check"])
def test_an_undecodable_message_is_invalid_argument(server, method, caplog):
    """#16.8: an undecodable message returned INTERNAL and logged a full traceback each time."""
    srv, target = server
    call = grpc.insecure_channel(target).unary_unary(method)  # raw bytes both ways
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as e:
            call(b"\xff\xff\xff\xff", timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not decode" in e.value.details()
    assert caplog.text.count("undecodable") <= 1 and "Traceback" not in caplog.text
