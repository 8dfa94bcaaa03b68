"""Issue 16 acceptance: a property-based fuzz of the live server over real gRPC calls.

Hypothesis draws rounds of calls (random and mutated messages of every RPC, and raw bytes to every
method) and sends each round concurrently to one tiny server on CPU. Properties: no call ends INTERNAL or
UNKNOWN (an unexpected error: the server's own bug), the server is SERVING afterwards, no request is left
"running", and the DB is consistent (every batch's energy is its requests' sum). ``LLMWATTS_FUZZ_CALLS``
sets how many calls (default 10,000; docs/reliability.md gives the time).
"""

import concurrent.futures
import math
import os
import threading
import time

import grpc
import pytest
import sqlite_utils
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmwatts.v1 import llmwatts_pb2 as pb
from tests.conftest import start_server

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CALLS = int(os.environ.get("LLMWATTS_FUZZ_CALLS", "10000"))
ROUND = 25  # calls per Hypothesis example, sent together
UNEXPECTED = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

METHODS = {  # method -> request type
    "/llmwatts.v1.Inference/Generate": pb.GenerateRequest,
    "/llmwatts.v1.Inference/GenerateStream": pb.GenerateRequest,
    "/llmwatts.v1.Control/GetServerInfo": pb.GetServerInfoRequest,
    "/llmwatts.v1.Control/BeginRun": pb.BeginRunRequest,
    "/llmwatts.v1.Control/EndRun": pb.EndRunRequest,
    "/llmwatts.v1.Control/GetPowerCaps": pb.GetPowerCapsRequest,
    "/llmwatts.v1.Control/SetPowerCap": pb.SetPowerCapRequest,
    "/llmwatts.v1.Control/ResetPowerCap": pb.ResetPowerCapRequest,
    "/grpc.health.v1.Health/Check": health_pb2.HealthCheckRequest,
}
STREAMING = {"/llmwatts.v1.Inference/GenerateStream"}

text = st.one_of(st.text(max_size=40), st.sampled_from(["", "run", "0", "²", "٠", "a\nb", "x" * 300]),
                 st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=2000))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.sampled_from([0.0, 1e-45, 1e-30, 0.01, 0.5, 1.0, 10.0, 250.0, -1.0]))
ids = st.one_of(st.uuids().map(str), text)
prompts = st.lists(st.one_of(st.text(min_size=1, max_size=30), st.sampled_from(["hello", " ", "x" * 5000])),
                   max_size=6)


@st.composite
def generate_request(draw):
    r = pb.GenerateRequest(request_id=draw(ids), run_id=draw(st.sampled_from(["", "fuzz", "none"]) | text),
                           prompts=draw(prompts), ignore_eos=draw(st.booleans()),
                           return_token_ids=draw(st.booleans()), run_secret=draw(st.sampled_from(["", "x"])))
    if draw(st.booleans()):
        r.max_new_tokens = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 2**31, 2**32 - 1]))
    if draw(st.booleans()):
        s = r.sampling
        s.greedy = draw(st.booleans())
        if draw(st.booleans()):
            s.temperature = draw(floats)
        if draw(st.booleans()):
            s.top_p = draw(floats)
        if draw(st.booleans()):
            s.seed = draw(st.integers(0, 2**64 - 1))
    return r


def selector(draw):
    return pb.GpuSelector(gpus=draw(st.lists(st.sampled_from(["0", "0:0", "1", "-1", "²", "٠", "SIM-x"]) | text,
                                             max_size=4)))


@st.composite
def control_request(draw):
    kind = draw(st.sampled_from(["BeginRun", "EndRun", "GetPowerCaps", "SetPowerCap", "ResetPowerCap",
                                 "GetServerInfo", "Check"]))
    if kind == "BeginRun":
        msg = pb.BeginRunRequest(run_id=draw(ids), labels=draw(st.dictionaries(text, text, max_size=4)))
    elif kind == "EndRun":
        msg = pb.EndRunRequest(run_id=draw(ids), run_secret=draw(text))
    elif kind == "GetPowerCaps":
        msg = pb.GetPowerCapsRequest(selector=selector(draw))
    elif kind == "SetPowerCap":
        msg = pb.SetPowerCapRequest(selector=selector(draw), cap_w=draw(floats), lease_s=draw(floats),
                                    reason=draw(text))
    elif kind == "ResetPowerCap":
        msg = pb.ResetPowerCapRequest(selector=selector(draw), reason=draw(text))
    elif kind == "GetServerInfo":
        msg = pb.GetServerInfoRequest()
    else:
        msg = health_pb2.HealthCheckRequest(service=draw(st.sampled_from(["", "llmwatts.v1.Inference"]) | text))
    method = next(m for m in METHODS if m.endswith("/" + kind))
    return method, msg.SerializeToString()


@st.composite
def mutated(draw, inner):
    method, data = draw(inner)
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if data and draw(st.booleans()):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        else:
            data[draw(st.integers(0, len(data))):0] = draw(st.binary(max_size=8))
    return method, bytes(data)


generate_call = generate_request().flatmap(
    lambda r: st.sampled_from(sorted(m for m in METHODS if ".Inference/" in m)).map(
        lambda m: (m, r.SerializeToString())))
raw_call = st.tuples(st.sampled_from(sorted(METHODS)), st.binary(max_size=64))
call = st.one_of(generate_call, control_request(), mutated(generate_call), mutated(control_request()), raw_call)


def send(channel, method: str, data: bytes) -> grpc.StatusCode:
    ident = (lambda b: b)
    try:
        if method in STREAMING:
            for _ in channel.unary_stream(method, request_serializer=ident, response_deserializer=ident)(
                    data, timeout=30):
                pass
        else:
            channel.unary_unary(method, request_serializer=ident, response_deserializer=ident)(data, timeout=30)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@pytest.mark.slow
def test_fuzzed_calls_never_break_the_server(tmp_path):
    srv, port = start_server(tmp_path, max_batch_size=4, max_new_tokens_limit=4, default_max_new_tokens=2,
                             queue_size=64, allow_insecure_loopback_control=True, merge_requests=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)])
    codes: dict[grpc.StatusCode, int] = {}
    lock = threading.Lock()
    pool = concurrent.futures.ThreadPoolExecutor(8)
    t0 = time.perf_counter()
    try:
        @settings(max_examples=math.ceil(CALLS / ROUND), deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
        @given(st.lists(call, min_size=ROUND, max_size=ROUND))
        def fuzz(calls):
            got = list(pool.map(lambda c: send(channel, *c), calls))
            with lock:
                for c in got:
                    codes[c] = codes.get(c, 0) + 1
            bad = [(m, d[:80], c) for (m, d), c in zip(calls, got) if c in UNEXPECTED]
            assert not bad, bad

        fuzz()
        took_s = time.perf_counter() - t0
        print(f"fuzz: {sum(codes.values())} calls in {took_s:.1f} s: "
              f"{ {c.name: n for c, n in sorted(codes.items(), key=lambda kv: -kv[1])} }")
        assert sum(codes.values()) >= CALLS
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        deadline = time.monotonic() + 30
        srv.host.store.flush()
        db = sqlite_utils.Database(tmp_path / "server.db")
        while db.execute("select count(*) from requests where status = 'running'").fetchone()[0]:
            assert time.monotonic() < deadline, "requests left running"
            time.sleep(0.2)
        unaccounted = list(db.query(
            "select b.batch_id, b.energy_j, coalesce(sum(r.energy_j), 0) as req_j from batches b left join "
            "requests r using (batch_id) group by b.batch_id having abs(b.energy_j - req_j) > 1e-6 * max(1, b.energy_j)"))
        assert unaccounted == []
        assert db["batches"].count > 0  # some fuzzed requests were valid and ran
    finally:
        pool.shutdown(wait=True)
        channel.close()
        srv.stop(1)
