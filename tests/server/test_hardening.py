"""Issue 16: no request can stop the server, waste the GPU, fill the disk or corrupt a study. Each test
names the defect it guards against; all run against a real tiny server on CPU."""

import os
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from llmwatts.errors import InvalidArgument
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc
from tests.conftest import db_of, serving, start_server

GREEDY = pb.SamplingParams(greedy=True)


def req(rid, prompts, **kw):
    return pb.GenerateRequest(request_id=rid, run_id=kw.pop("run_id", "run"), prompts=prompts, **kw)


def code_of(call, *args, **kw) -> grpc.StatusCode:
    try:
        call(*args, **kw)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_a_denormal_temperature_is_refused_and_the_server_keeps_serving(server):
    """#16.1: temperature=1e-45 passed validation (0, 10], the eager sampler failed, the engine was marked
    failed and every later request got UNAVAILABLE until a restart."""
    srv, target = server
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.InferenceStub(channel)
    for t in (1e-45, 1e-30, 1e-3):
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req(f"t{t}", ["hello"], max_new_tokens=2, sampling=pb.SamplingParams(temperature=t)))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in e.value.details()
    assert stub.Generate(req("next", ["hello"], max_new_tokens=2,
                             sampling=pb.SamplingParams(temperature=0.01, seed=2**64 - 1))).completions
    assert serving(channel) == health_pb2.HealthCheckResponse.SERVING


def test_one_failing_batch_fails_only_its_request(server):
    """#16.1: one request's engine failure marked the engine failed (NOT_SERVING, UNAVAILABLE for all). Now
    that request gets INTERNAL with its row (and its batch's energy), and the next request runs."""
    srv, target = server
    engine, real = srv.host.engine, srv.host.engine.generate

    def generate(spec, **kw):
        if len(spec.prompts[0]) > 8:
            raise RuntimeError("probability tensor contains inf or nan")
        return real(spec, **kw)

    engine.generate = generate
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.InferenceStub(channel)
    for i in range(4):  # more than MAX_CONSECUTIVE_FAILURES, each followed by a good one
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req(f"bad{i}", ["a prompt long enough to fail the fake sampler"], max_new_tokens=2))
        assert e.value.code() == grpc.StatusCode.INTERNAL and "still serves" in e.value.details()
        assert stub.Generate(req(f"good{i}", ["hi"], max_new_tokens=2)).completions
    assert serving(channel) == health_pb2.HealthCheckResponse.SERVING
    db = db_of(srv)
    rows = {r["request_id"]: r for r in db.query("select * from requests")}
    assert rows["bad0"]["status"] == "INTERNAL" and rows["bad0"]["batch_id"] and rows["good0"]["status"] == "ok"
    assert_energy_accounted(db)


def assert_energy_accounted(db) -> None:
    """Every batch's energy is its requests' sum (the DB-consistency rule of issue 16's acceptance)."""
    bad = list(db.query("select b.batch_id, b.energy_j, coalesce(sum(r.energy_j), 0) as req_j from batches b "
                        "left join requests r using (batch_id) group by b.batch_id "
                        "having abs(b.energy_j - req_j) > 1e-6 * max(1, b.energy_j)"))
    assert bad == []


@pytest.mark.parametrize("call, make, fragment", [
    ("BeginRun", lambda: pb.BeginRunRequest(run_id="r" * 1_000_000), "run_id"),
    ("BeginRun", lambda: pb.BeginRunRequest(run_id="line\nforged"), "non-printable"),
    ("BeginRun", lambda: pb.BeginRunRequest(run_id="ok", labels={"cap_w": "9" * 4_000_000}), "label"),
    ("BeginRun", lambda: pb.BeginRunRequest(run_id="ok", labels={f"k{i}": "v" for i in range(100)}), "labels"),
    ("EndRun", lambda: pb.EndRunRequest(run_id="e" * 200), "run_id"),
    ("SetPowerCap", lambda: pb.SetPowerCapRequest(cap_w=200, reason="x" * 1_000_000), "reason"),
    ("SetPowerCap", lambda: pb.SetPowerCapRequest(cap_w=200, reason="ok\n2026 INFO forged"), "reason"),
    ("GetPowerCaps", lambda: pb.GetPowerCapsRequest(selector=pb.GpuSelector(gpus=["²"])), "ASCII"),
    ("GetPowerCaps", lambda: pb.GetPowerCapsRequest(selector=pb.GpuSelector(gpus=["٠"])), "ASCII"),
    ("ResetPowerCap", lambda: pb.ResetPowerCapRequest(selector=pb.GpuSelector(gpus=["0"] * 1000)), "limit"),
])
def test_every_string_has_a_limit_checked_before_anything_is_stored(tmp_path, call, make, fragment):
    """#16.5 and #16.8: a 1 MB run id or 3.9 MB labels grew the DB by the megabyte, a reason with newlines
    forged log lines, "²" as a GPU selector was INTERNAL (a Python ValueError) and "٠" selected GPU 0."""
    srv, port = start_server(tmp_path, allow_insecure_loopback_control=True)
    try:
        control = pb_grpc.ControlStub(grpc.insecure_channel(f"127.0.0.1:{port}",
                                                            options=[("grpc.max_send_message_length", -1)]))
        before = os.path.getsize(tmp_path / "server.db")
        with pytest.raises(grpc.RpcError) as e:
            getattr(control, call)(make())
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in e.value.details()
        db = db_of(srv)
        assert db["runs"].count == 0 and db["cap_events"].count == 0
        assert os.path.getsize(tmp_path / "server.db") - before < 64 * 1024
    finally:
        srv.stop(1)


def test_a_huge_prompt_is_refused_on_its_bytes_before_tokenizing(server):
    """#16.6: a 3.9 MB prompt was tokenized in full (seconds of CPU, ~0.5 GB) before being refused."""
    srv, target = server
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(target))
    calls = []
    real = srv.host.loaded.tokenizer.__class__.__call__

    def spy(self, *a, **kw):
        calls.append(sum(map(len, a[0])))
        return real(self, *a, **kw)

    srv.host.loaded.tokenizer.__class__.__call__ = spy
    try:
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req("huge", ["word " * 780_000], max_new_tokens=2))
    finally:
        srv.host.loaded.tokenizer.__class__.__call__ = real
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in e.value.details()
    assert calls == []
    db = db_of(srv)
    assert db["refusals"].get((srv.host.server_id, "INVALID_ARGUMENT"))["count"] == 1
    assert stub.Generate(req("huge", ["fine"], max_new_tokens=1)).completions  # refused before work: retryable


def test_request_ids_are_remembered_across_restarts(tmp_path):
    """#16.7: request ids lived in memory only; reusing one after a restart overwrote the old row and left
    its batch's energy unaccounted."""
    srv, port = start_server(tmp_path)
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    stub.Generate(req("once", ["hello"], max_new_tokens=2))
    srv.stop(1)
    srv, port = start_server(tmp_path)
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        assert code_of(stub.Generate, req("once", ["hello"], max_new_tokens=2)) == grpc.StatusCode.ALREADY_EXISTS
        db = db_of(srv)
        assert db["requests"].get("once")["status"] == "ok"
        assert_energy_accounted(db)
    finally:
        srv.stop(1)


def test_a_request_left_running_by_a_killed_server_is_aborted_at_the_next_start(tmp_path):
    """#16.7 / kill -9: the next server marks what its predecessor left unfinished ABORTED, and its id stays
    used (it may have run)."""
    from llmwatts.server.store import ServerStore

    old = ServerStore(tmp_path / "server.db", "dead-server")
    assert old.claim_request({"request_id": "inflight", "run_id": "r", "status": "running", "energy_j": 0.0})
    old.close()
    srv, port = start_server(tmp_path)
    try:
        assert db_of(srv)["requests"].get("inflight")["status"] == "ABORTED"
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        assert code_of(stub.Generate, req("inflight", ["x"], max_new_tokens=1)) == grpc.StatusCode.ALREADY_EXISTS
    finally:
        srv.stop(1)


def test_a_request_refused_for_a_full_queue_may_be_retried(tmp_path):
    """#16.7: retrying an id whose first attempt was refused before any work is allowed."""
    srv, port = start_server(tmp_path, queue_size=1)
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        # Fill the engine, then the one-place queue, each step seen: with fixed sleeps a loaded box let the
        # batcher take both long requests into one batch, or take the first late, and the probe got in.
        queue = srv.host.batcher._queue

        def until(cond, what):
            t0 = time.monotonic()
            while not cond():
                assert time.monotonic() - t0 < 30, what
                time.sleep(0.02)

        # A stream's first message proves its batch is running (the batcher can no longer take busy1 into it).
        long = [stub.GenerateStream(req("busy0", ["x"], max_new_tokens=1500, ignore_eos=True))]
        next(long[0])
        long.append(stub.Generate.future(req("busy1", ["x"], max_new_tokens=1500, ignore_eos=True)))
        until(lambda: queue.qsize() == 1, "the second request never queued")
        refused = "retry"
        assert code_of(stub.Generate, req(refused, ["x"], max_new_tokens=1)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        for f in long:
            f.cancel()
        time.sleep(1.0)
        assert stub.Generate(req(refused, ["x"], max_new_tokens=1), timeout=60).completions
    finally:
        srv.stop(1)


def test_short_tokens_are_refused_unless_allowed(tmp_path):
    """#16.8: a one-character control token was accepted silently."""
    from tests.conftest import start_server as start

    with pytest.raises(InvalidArgument, match="16"):
        start(tmp_path, control_token="x")
    with pytest.raises(InvalidArgument, match="16"):
        start(tmp_path, inference_token="short")
    srv, _ = start(tmp_path, control_token="x", allow_short_token=True)
    srv.stop(1)


@pytest.mark.parametrize("mode", [{}, {"continuous": True}])
def test_an_expired_call_leaves_the_running_batch_at_its_next_step(tmp_path, mode):
    """#16.4: eight 256-token requests with a 100 ms deadline cost the client 0.11 s and the server 12.3 s
    (recorded ok), and a request behind them waited 12.2 s. A call past its deadline now stops its batch at
    the next decode step (continuous: its row is freed), and its row says DEADLINE_EXCEEDED with the energy
    it used."""
    srv, port = start_server(tmp_path, **mode)
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(req("late", ["tell me everything"], max_new_tokens=2000, ignore_eos=True), timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    t0 = time.perf_counter()
    assert stub.Generate(req("behind", ["hi"], max_new_tokens=1), timeout=30).completions
    waited_s = time.perf_counter() - t0
    db = db_of(srv)
    row = db["requests"].get("late")
    srv.stop(1)
    assert row["status"] == "DEADLINE_EXCEEDED" and row["energy_j"] > 0 and row["output_tokens"] < 2000
    assert waited_s < 5  # (2000 steps would take minutes on CPU)
    assert_energy_accounted(db)


@pytest.mark.parametrize("mode", [{}, {"continuous": True}])
def test_a_cancelled_request_runs_at_most_the_step_in_flight_after_the_server_sees_it(tmp_path, mode):
    """#16 acceptance "a cancelled request stops within one decode step": the server kept no record of when
    it saw a cancel nor of the step a row left its batch at (the bench inferred ~7 steps from the client's
    clock). Now the row says when the server saw it (``cancelled_ns``), the step its rows were at then
    (``cancelled_step``) and the step it left at (``steps``): at most one more step, the one in flight."""
    srv, port = start_server(tmp_path, **mode)
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        call = stub.GenerateStream(req("cut", ["tell me everything"], max_new_tokens=2000, ignore_eos=True))
        for chunk, _ in zip(call, range(3)):  # running: several steps delivered
            pass
        client_cancel_ns = time.time_ns()
        call.cancel()
        deadline = time.monotonic() + 30
        while (row := db_of(srv)["requests"].get("cut"))["status"] == "running":
            assert time.monotonic() < deadline, "the cancelled request never ended"
            time.sleep(0.1)
    finally:
        srv.stop(1)
    assert row["status"] == "CANCELLED" and row["cancelled_ns"] >= client_cancel_ns
    assert row["cancelled_step"] >= 3 and 0 <= row["steps"] - row["cancelled_step"] <= 1, row
    assert row["output_tokens"] in (row["steps"] - 1, row["steps"])  # (the step that saw it adds no token)
    assert row["done_ns"] >= row["cancelled_ns"]


def test_a_call_cancelled_while_queued_leaves_the_queue_at_once(tmp_path):
    """#16.4: a cancelled queued request stayed queued and then ran in full, recorded ok."""
    srv, port = start_server(tmp_path, queue_size=4)
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        running = stub.Generate.future(req("running", ["x"], max_new_tokens=150, ignore_eos=True))
        time.sleep(0.3)
        queued = stub.Generate.future(req("queued", ["y"], max_new_tokens=150, ignore_eos=True))
        time.sleep(0.2)
        queued.cancel()
        time.sleep(0.3)
        row = db_of(srv)["requests"].get("queued")
        assert row["status"] == "CANCELLED" and row["energy_j"] == 0 and row["batch_id"] is None
        assert srv.host.batcher._queue.qsize() == 0
        running.cancel()
    finally:
        srv.stop(1)


def test_a_run_belongs_to_whoever_began_it(stubs):
    """#16.3: a stranger's EndRun cut a run's window 3 s in (2.4x too few J/token, unflagged), and a
    stranger's BeginRun of the same id with forged labels (cap_w=999) took over the owner's requests."""
    inference, control, srv = stubs
    owner = control.BeginRun(pb.BeginRunRequest(run_id="study", labels={"cap_w": "250"}))
    assert len(owner.run_secret) >= 32
    assert code_of(control.EndRun, pb.EndRunRequest(run_id="study")) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(control.EndRun, pb.EndRunRequest(run_id="study", run_secret="guess")) == \
        grpc.StatusCode.PERMISSION_DENIED
    assert code_of(inference.Generate, req("stranger", ["x"], run_id="study", max_new_tokens=1)) == \
        grpc.StatusCode.PERMISSION_DENIED
    inference.Generate(req("mine", ["x"], run_id="study", max_new_tokens=1, run_secret=owner.run_secret))
    control.EndRun(pb.EndRunRequest(run_id="study", run_secret=owner.run_secret))
    # Pre-claimed by a stranger: the owner's BeginRun fails and, without the secret, so do its requests.
    control.BeginRun(pb.BeginRunRequest(run_id="claimed", labels={"cap_w": "999"}))
    assert code_of(control.BeginRun, pb.BeginRunRequest(run_id="claimed")) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(inference.Generate, req("owner", ["x"], run_id="claimed", max_new_tokens=1)) == \
        grpc.StatusCode.PERMISSION_DENIED
    db = db_of(srv)
    assert [r["request_id"] for r in db.query("select request_id from requests where run_id in ('study', 'claimed')")] \
        == ["mine"]
    assert all(owner.run_secret not in str(r) for r in db.query("select * from runs"))  # only its hash is kept


def test_end_run_waits_for_the_runs_requests_so_the_window_holds_their_energy(stubs):
    """#17 defect 1: requests in flight at EndRun finished after it; their tokens were counted but the
    joules they spent after the end were not (40% too few J/token on a 4 s run), and nothing flagged it."""
    inference, control, srv = stubs
    begin = control.BeginRun(pb.BeginRunRequest(run_id="timed"))
    pending = inference.Generate.future(req("slow", ["x"], run_id="timed", max_new_tokens=80, ignore_eos=True,
                                            run_secret=begin.run_secret))
    time.sleep(0.3)
    end = control.EndRun(pb.EndRunRequest(run_id="timed", run_secret=begin.run_secret), timeout=60)
    assert pending.result(timeout=10).completions[0].output_tokens == 80
    assert end.pending_requests == 0
    row = next(db_of(srv).query("select * from run_windows where run_id = 'timed'"))
    assert row["window_ok"] == 1 and row["last_batch_end_ns"] <= row["end_ns"] == end.server_ns
    assert row["batch_energy_j"] <= row["window_energy_j"] + 1e-9
    assert code_of(inference.Generate, req("late", ["x"], run_id="timed", max_new_tokens=1,
                                           run_secret=begin.run_secret)) == grpc.StatusCode.FAILED_PRECONDITION


def test_a_window_ended_before_its_last_request_is_flagged(stubs):
    """#17 defect 1 / #16.3: when EndRun cannot wait (its deadline), run_windows says the window is short."""
    inference, control, srv = stubs
    begin = control.BeginRun(pb.BeginRunRequest(run_id="cut"))
    pending = inference.Generate.future(req("long", ["x"], run_id="cut", max_new_tokens=300, ignore_eos=True,
                                            run_secret=begin.run_secret))
    time.sleep(0.3)
    end = control.EndRun(pb.EndRunRequest(run_id="cut", run_secret=begin.run_secret), timeout=1.0)
    assert end.pending_requests == 1
    pending.result()
    row = next(db_of(srv).query("select * from run_windows where run_id = 'cut'"))
    assert row["window_ok"] == 0 and row["pending_at_end"] == 1 and row["last_batch_end_ns"] > row["end_ns"]


def test_open_runs_per_client_are_bounded(stubs):
    """#16.5: 2,000 BeginRuns without EndRun were all kept."""
    from llmwatts.server.limits import MAX_OPEN_RUNS_PER_CLIENT

    _, control, srv = stubs
    for i in range(MAX_OPEN_RUNS_PER_CLIENT):
        control.BeginRun(pb.BeginRunRequest(run_id=f"open{i}"))
    assert code_of(control.BeginRun, pb.BeginRunRequest(run_id="one-too-many")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert db_of(srv)["runs"].count == MAX_OPEN_RUNS_PER_CLIENT
