"""The gRPC server end to end on CPU: inference, streaming, bad input, run markers, energy bookkeeping."""

import concurrent.futures
import time

import grpc
import pytest
import sqlite_utils
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc
from tests.conftest import start_server

GREEDY = pb.SamplingParams(greedy=True)


def req(rid, prompts, **kw):
    return pb.GenerateRequest(request_id=rid, run_id=kw.pop("run_id", "run"), prompts=prompts, **kw)


def test_unary_batch_returns_every_completion_with_counts_and_times(stubs):
    inference, _, srv = stubs
    r = inference.Generate(req("a", ["Hello there", "What is two plus two?"], max_new_tokens=6, ignore_eos=True,
                               return_token_ids=True))
    assert [c.index for c in r.completions] == [0, 1]
    assert all(c.output_tokens == 6 and len(c.token_ids) == 6 and c.finish_reason == "length" for c in r.completions)
    tok = srv.host.loaded.tokenizer
    assert [c.prompt_tokens for c in r.completions] == [len(tok(p)["input_ids"]) for p in ["Hello there", "What is two plus two?"]]
    t = r.times
    assert 0 < t.received_ns <= t.batch_start_ns <= t.first_token_ns <= t.done_ns
    assert r.energy_j > 0 and r.energy_simulated and r.batch_id


def test_stream_chunks_carry_every_sequence_per_step_and_match_unary(stubs):
    inference, _, _ = stubs
    prompts = ["Tell me a story", "x"]
    chunks = list(inference.GenerateStream(req("s", prompts, max_new_tokens=5, sampling=GREEDY, ignore_eos=True,
                                               return_token_ids=True)))
    steps, final = chunks[:-1], chunks[-1]
    # every step once, in order (steps may be coalesced: first_step..step), each token with its step's time
    assert final.done and [s for c in steps for s in range(c.first_step, c.step + 1)] == list(range(5))
    assert all(len(c.deltas) == 2 for c in steps)
    for i in range(2):
        times = [t for c in steps for t in c.deltas[i].token_server_ns]
        assert len(times) == 5 and times == sorted(times) and times[0] >= final.final.times.first_token_ns
    streamed = [[t for c in steps for t in c.deltas[i].token_ids] for i in range(2)]
    assert streamed == [list(c.token_ids) for c in final.final.completions]
    assert ["".join(c.deltas[i].text for c in steps) for i in range(2)] == [c.text for c in final.final.completions]
    unary = inference.Generate(req("u", prompts, max_new_tokens=5, sampling=GREEDY, ignore_eos=True,
                                   return_token_ids=True))
    assert [list(c.token_ids) for c in unary.completions] == streamed  # greedy: same tokens either way


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=["ok", "  "]), "prompt 1 is empty"),
    (dict(prompts=["x"], max_new_tokens=0), "max_new_tokens must be between 1 and"),
    (dict(prompts=["x"], max_new_tokens=100000), "max_new_tokens must be between 1 and"),
    (dict(prompts=["x"] * 65), "exceeds the server's limit of 64"),
    (dict(prompts=["word " * 2500]), "the limit is"),
    (dict(prompts=["x"], sampling=pb.SamplingParams(temperature=-1)), "temperature"),
    (dict(prompts=["x"], sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
    (dict(prompts=["x"], sampling=pb.SamplingParams(temperature=float("nan"))), "temperature"),
])
def test_bad_input_is_invalid_argument_with_an_actionable_message(stubs, kwargs, fragment):
    inference, _, _ = stubs
    with pytest.raises(grpc.RpcError) as e:
        inference.Generate(pb.GenerateRequest(request_id="bad", run_id="r", **kwargs))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in e.value.details()
    # Nothing was lost: the server still answers.
    assert inference.Generate(req("after", ["fine"], max_new_tokens=1)).completions


def test_missing_and_reused_request_ids_are_refused(stubs):
    inference, _, _ = stubs
    with pytest.raises(grpc.RpcError) as e:
        inference.Generate(pb.GenerateRequest(prompts=["x"]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in e.value.details()
    inference.Generate(req("dup", ["x"], max_new_tokens=1))
    with pytest.raises(grpc.RpcError) as e:
        inference.Generate(req("dup", ["x"], max_new_tokens=1))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_run_markers_and_per_request_energy_reconcile_with_batches(stubs):
    inference, control, srv = stubs
    begin = control.BeginRun(pb.BeginRunRequest(run_id="r1", labels={"batch_size": "2"}))
    for i in range(3):
        inference.Generate(req(f"r1-{i}", ["a prompt", "another longer prompt here"], run_id="r1", max_new_tokens=4,
                               run_secret=begin.run_secret))
    end = control.EndRun(pb.EndRunRequest(run_id="r1", run_secret=begin.run_secret))
    assert end.energy_j > begin.energy_j and end.server_ns > begin.server_ns and end.simulated
    srv.host.store.flush()
    db = sqlite_utils.Database(srv.host.config.db_path)
    rows = list(db.query("select * from requests where run_id = 'r1'"))
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    batch_j = db.execute("select sum(energy_j) from batches where batch_id in "
                         "(select batch_id from requests where run_id='r1')").fetchone()[0]
    assert sum(r["energy_j"] for r in rows) == pytest.approx(batch_j, rel=1e-9)
    gpu_j = db.execute("select sum(energy_j) from batch_gpu_energy").fetchone()[0]
    all_batch_j = db.execute("select sum(energy_j) from batches").fetchone()[0]
    assert gpu_j == pytest.approx(all_batch_j)
    # The batches' energy lies within the run window's counter delta (idle between them is not attributed).
    assert batch_j <= end.energy_j - begin.energy_j + 1e-6
    run = db["runs"].get("r1")
    assert run["labels"] == '{"batch_size": "2"}' and run["simulated"] == 1
    with pytest.raises(grpc.RpcError) as e:
        control.EndRun(pb.EndRunRequest(run_id="never"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_telemetry_series_is_written_and_labelled_simulated(stubs):
    inference, _, srv = stubs
    inference.Generate(req("t", ["load the GPU"], max_new_tokens=20, ignore_eos=True))
    time.sleep(0.3)
    srv.host.store.flush()
    db = sqlite_utils.Database(srv.host.config.db_path)
    rows = list(db.query("select * from telemetry"))
    assert len(rows) >= 3
    assert all(r["simulated"] == 1 and r["gpu_uuid"].startswith("SIM-") for r in rows)
    energies = [r["energy_mj"] for r in rows]
    assert energies == sorted(energies) and energies[-1] > energies[0]
    assert max(r["power_mw"] for r in rows) > min(r["power_mw"] for r in rows)  # power follows busy/idle


def test_server_info_describes_model_engine_and_power_source(stubs):
    _, control, srv = stubs
    info = control.GetServerInfo(pb.GetServerInfoRequest())
    assert info.model == "tiny" and info.engine == "eager" and info.power_source == "simulated"
    assert info.shard_count == 1 and info.gpus[0].simulated and info.versions["torch"]
    assert abs(info.server_time_ns - time.time_ns()) < 5e9
    assert info.max_batch_size == srv.host.config.max_batch_size and info.context_length == 2048


def test_health_and_reflection(server):
    srv, target = server
    channel = grpc.insecure_channel(target)
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="llmwatts.v1.Inference"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"llmwatts.v1.Inference", "llmwatts.v1.Control", "grpc.health.v1.Health"} <= names


def test_full_queue_answers_resource_exhausted_and_loses_nothing(tmp_path):
    srv, port = start_server(tmp_path, queue_size=1)
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(stub.Generate, req(f"q{i}", ["busy"], max_new_tokens=30, ignore_eos=True))
                     for i in range(8)]
            codes = []
            for c in calls:
                try:
                    c.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as e:
                    codes.append(e.code())
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        srv.host.store.flush()
        db = sqlite_utils.Database(tmp_path / "server.db")
        statuses = {r["request_id"]: r["status"] for r in db.query("select * from requests")}
        # Every refused request the server saw has its row; every answered one too.
        ok = sum(1 for c in codes if c == grpc.StatusCode.OK)
        assert list(statuses.values()).count("ok") == ok
        assert stub.Generate(req("later", ["x"], max_new_tokens=1)).completions
    finally:
        srv.stop(1)


def test_merged_batches_split_energy_by_tokens(tmp_path):
    srv, port = start_server(tmp_path, merge_requests=True, batch_wait_ms=300)
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            a = pool.submit(stub.Generate, req("m1", ["short"], max_new_tokens=3, sampling=GREEDY, ignore_eos=True))
            b = pool.submit(stub.Generate, req("m2", ["a much longer prompt than the other", "and two"],
                                               max_new_tokens=8, sampling=GREEDY, ignore_eos=True))
            ra, rb = a.result(), b.result()
        assert ra.batch_id == rb.batch_id  # merged
        assert ra.completions[0].output_tokens == 3 and [c.output_tokens for c in rb.completions] == [8, 8]
        tokens_a = sum(c.prompt_tokens + c.output_tokens for c in ra.completions)
        tokens_b = sum(c.prompt_tokens + c.output_tokens for c in rb.completions)
        assert ra.energy_j / rb.energy_j == pytest.approx(tokens_a / tokens_b)
    finally:
        srv.stop(1)


def test_port_in_use_is_a_clear_error_not_a_traceback(tmp_path):
    # Regression: grpc raises RuntimeError on a failed bind (older releases returned port 0).
    import socket

    from llmwatts.errors import Unavailable

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(Unavailable, match="is the port in use"):
            start_server(tmp_path, port=port)


def test_a_run_id_is_begun_and_ended_once(stubs):
    # Regression: a second BeginRun moved the run's start marker, pushing its requests out of its window.
    inference, control, srv = stubs
    first = control.BeginRun(pb.BeginRunRequest(run_id="once"))
    inference.Generate(req("once-1", ["x"], run_id="once", max_new_tokens=2, run_secret=first.run_secret))
    with pytest.raises(grpc.RpcError) as e:
        control.BeginRun(pb.BeginRunRequest(run_id="once"))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    control.EndRun(pb.EndRunRequest(run_id="once", run_secret=first.run_secret))
    with pytest.raises(grpc.RpcError) as e:
        control.EndRun(pb.EndRunRequest(run_id="once", run_secret=first.run_secret))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    run = sqlite_utils.Database(srv.host.config.db_path)["runs"].get("once")
    assert run["begin_ns"] == first.server_ns


def test_a_batch_is_written_whole_or_not_at_all(tmp_path):
    # Regression: the autocommit connection kept the batch row when its request rows failed to insert.
    from llmwatts.server.store import ServerStore

    store = ServerStore(tmp_path / "s.db", "sid")
    with pytest.raises(Exception):
        store.record_batch({"batch_id": "b1", "energy_j": 1.0}, [{"batch_id": "b1", "gpu_uuid": "g", "energy_j": 1.0}],
                           [{"request_id": None, "status": "ok"}])  # NOT NULL request_id
    assert store.db["batches"].count == 0 and store.db["batch_gpu_energy"].count == 0
    store.close()


def test_shutdown_answers_a_request_held_for_the_next_merged_batch(tmp_path):
    # Regression: with --merge-requests an incompatible request parked for the next batch never got an
    # answer at shutdown, and its handler thread kept the server process alive.
    srv, port = start_server(tmp_path, merge_requests=True, batch_wait_ms=2000)
    stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        long = pool.submit(stub.Generate, req("long", ["x"], max_new_tokens=200, ignore_eos=True, sampling=GREEDY))
        time.sleep(0.3)
        held = pool.submit(stub.Generate, req("held", ["y"], max_new_tokens=5))  # not greedy: not mergeable
        time.sleep(0.5)
        srv.stop(1)
        with pytest.raises(grpc.RpcError) as e:
            held.result(timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        long.result(timeout=30)  # the batch in flight finished
    db = sqlite_utils.Database(tmp_path / "server.db")
    assert db["requests"].get("held")["status"] == "UNAVAILABLE"


@pytest.mark.parametrize("mode", [{}, {"merge_requests": True}, {"continuous": True}])
def test_only_streaming_requests_get_an_event_per_step(tmp_path, mode):
    """A unary Generate's thread waits for the answer alone: the batchers put no per-step events for it
    (one wake-up per step per waiting request, all competing for the interpreter lock, for nothing)."""
    from llmwatts.server.engine import Sampling
    from llmwatts.server.work import Done, Work

    srv, _ = start_server(tmp_path, **mode)
    try:
        prompt = srv.host.loaded.tokenizer("hello there")["input_ids"]
        works = {stream: Work(f"w-{stream}", "r", [prompt], 4, Sampling(greedy=True), True, time.time_ns(),
                              stream=stream) for stream in (False, True)}
        for w in works.values():
            srv.host.batcher.submit(w)
        kinds = {}
        for stream, w in works.items():
            kinds[stream] = [type(w.events.get(timeout=60)).__name__]
            while kinds[stream][-1] != Done.__name__:
                kinds[stream].append(type(w.events.get(timeout=60)).__name__)
        assert kinds == {False: ["Done"], True: ["Step"] * 4 + ["Done"]}
    finally:
        srv.stop(1)


def test_a_port_another_listener_shares_is_refused(tmp_path):
    """Regression (#16.9): gRPC binds with SO_REUSEPORT by default, so a second server on a port in use
    started too and both listened, splitting a study's requests across two DBs. Binding is exclusive."""
    import socket

    from llmwatts.errors import Unavailable

    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as another gRPC server would
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(Unavailable, match="is the port in use"):
            start_server(tmp_path, port=taken.getsockname()[1])
