"""Continuous batching: requests join a running batch between decode steps and leave it when they end.

On CPU in fp32 a request's greedy tokens must not depend on who it shared its steps with: any difference
is a bug in the per-row slots, positions, masks, freed rows or the row-prefix steps. The server tests
check that requests really share a segment, that its energy adds up, and that admission is first come,
first served.
"""

import concurrent.futures
import logging
import os
import subprocess
import sys
import time

import grpc
import pytest
import sqlite_utils
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmwatts.server.engine import JOIN_GRAPH_TOKENS, WINDOW_SLOTS, BatchSpec, FastEngine, Sampling, warm_up
from llmwatts.server.engine import prefill as prefill_mod
from llmwatts.server.models import load_model
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc
from tests.conftest import start_server

GREEDY = Sampling(greedy=True)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", "cpu", "float32")


def fast_engine(tiny, eos=None, **kw):
    return FastEngine(tiny.model, tiny.tokenizer.pad_token_id, eos, tiny.device,
                      context_length=tiny.context_length, **kw)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 32000, (n,), generator=g).tolist() for n in lengths]


def run_continuous(session, requests: dict[str, BatchSpec]):
    """Admit ``requests`` first come, first served whenever rows are free (all that fit in one prefill);
    step until all ended. -> (outputs, streamed tokens, {key: (step it joined, keys live then, its rows)})."""
    streamed = {k: [[] for _ in s.prompts] for k, s in requests.items()}
    outputs, joined, waiting = {}, {}, list(requests)

    def take(key, deltas):
        for i, d in enumerate(deltas):
            streamed[key][i] += d

    while waiting or session.busy:
        joins = {}
        while waiting and session.can_admit([*joins.values(), requests[waiting[0]]]):
            key = waiting.pop(0)
            joins[key] = requests[key]
            joined[key] = (session.steps, set(session.trackers))
        if joins:
            for key, deltas in session.admit(joins).items():
                take(key, deltas)
                joined[key] += (list(session.rows_of[key]),)
        for key, deltas in session.step().items():
            take(key, deltas)
        for key in [k for k in session.trackers if session.done(k)]:
            outputs[key] = session.pop(key)
    return outputs, streamed, joined


def mixed_requests() -> dict[str, BatchSpec]:
    """Five requests for a 4-row session: rows freed early and refilled, joins of several prompts into rows
    that are not adjacent, and a window crossing."""
    p = prompts([5, 17, 9, 3, 30, 1, 12, WINDOW_SLOTS + 2])
    return {
        "a": BatchSpec(p[0:2], [6, 12], GREEDY, ignore_eos=True),      # its first row frees after 6 steps
        "b": BatchSpec(p[2:3], [20], GREEDY, ignore_eos=True),
        "c": BatchSpec(p[3:6], [15, 4, 9], GREEDY, ignore_eos=True),   # waits for three free rows: not adjacent
        "d": BatchSpec(p[6:7], [25], GREEDY, ignore_eos=True),
        "e": BatchSpec(p[7:8], [WINDOW_SLOTS + 5], GREEDY, ignore_eos=True),  # crosses window boundaries
    }


# Joins packed into static buffers (graphs on CUDA), or eager. Prompt lengths: a 5 + 17, b 9 (one join of
# 31 tokens), c 3 + 30 + 1 (34), d 12, e 18. -> (prompts, tokens) of each packed join, in order.
PACKED = {JOIN_GRAPH_TOKENS: [(3, 128), (3, 128), (1, 128), (1, 128)],  # every join in one 128-token pack
          0: [],                                                        # every join eager
          64: [(3, 64), (3, 64), (1, 64), (1, 64)],
          32: [(3, 32), (1, 32), (1, 32)],                              # c (34 tokens) eager
          16: [(1, 16)]}                                                # only d packs: a + b, c and e do not


@pytest.mark.parametrize("join_tokens", list(PACKED))
def test_a_requests_greedy_tokens_do_not_depend_on_who_shares_its_steps(tiny, join_tokens, monkeypatch):
    """Guards against a join that mixes its prompts (attention across a packed row's prompts, K/V into
    the wrong row or slot, the first token sampled at the wrong column, padding overwriting a prompt)
    or that packs a join over ``join_tokens``: every request's greedy tokens equal its own run alone,
    whichever prompts it was packed with, and the packed joins are the ones ``join_tokens`` gives."""
    fast = fast_engine(tiny, join_tokens=join_tokens)
    requests = mixed_requests()
    alone = {k: fast.generate(s) for k, s in requests.items()}
    packed, join_packed = [], prefill_mod.join_packed

    def recording(engine, ws, prompts, greedy, rows):
        step = prefill_mod.pack_step(engine)
        packed.append((len(prompts), -(-sum(map(len, prompts)) // step) * step))
        return join_packed(engine, ws, prompts, greedy, rows)

    monkeypatch.setattr(prefill_mod, "join_packed", recording)
    session = fast.session(4, 64, GREEDY, ignore_eos=True)
    outputs, streamed, joined = run_continuous(session, requests)
    for key in requests:
        assert outputs[key].tokens == alone[key].tokens, key
        assert streamed[key] == alone[key].tokens, key
        assert outputs[key].finish_reasons == ["length"] * len(requests[key].prompts)
    # They really shared steps: a and b joined in one prefill; c joined a running
    # batch, into rows that are not adjacent (a freed 0 and 1, b holds 2); d and e later still.
    assert joined["a"][0] == joined["b"][0] == 0 and joined["a"][2] == [0, 1] and joined["b"][2] == [2]
    assert joined["c"][0] > 0 and joined["c"][1] & {"a", "b"} and joined["c"][2] == [0, 1, 3]
    assert joined["d"][0] > joined["c"][0] and joined["e"][0] > joined["d"][0]
    assert not session.trackers and session.live_rows == 0
    assert packed == PACKED[join_tokens]
    assert set(session.ws.joins) == {tokens for _, tokens in packed}


def test_a_packed_joins_padding_past_the_cache_end_leaves_the_prompts_alone(tiny):
    """Guards against the padding of a packed join overwriting a prompt's K/V: the last prompt ends two
    slots before the cache's end, so its padding (46 tokens) is clamped onto the cache's last slot, and
    every prompt's greedy tokens still equal its own run alone."""
    fast = fast_engine(tiny, join_tokens=256)
    ps = prompts([20, 62])
    requests = {"x": BatchSpec(ps[0:1], [30], GREEDY, ignore_eos=True),
                "y": BatchSpec(ps[1:2], [2], GREEDY, ignore_eos=True)}
    alone = {k: fast.generate(s) for k, s in requests.items()}
    outputs, _, _ = run_continuous(fast.session(2, 64, GREEDY, ignore_eos=True), requests)
    assert {k: o.tokens for k, o in outputs.items()} == {k: o.tokens for k, o in alone.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compile", [False, True])
def test_graphed_joins_and_steps_give_the_tokens_of_the_same_engine_run_without_graphs(compile):
    """On a GPU: a captured join or step must compute what the same code computes uncaptured (a graph
    that replays stale inputs or writes the wrong rows changes tokens)."""
    model = load_model("tiny", "cuda", "float32")
    requests = mixed_requests()
    runs = {}
    for graphs in (True, False, "captured first"):
        fast = fast_engine(model, compile=compile, cuda_graphs=bool(graphs))
        session = fast.session(4, 64, GREEDY, ignore_eos=True)
        if graphs == "captured first":
            # every decode step up front: row prefixes 1, 2 and 4, windows of 16 .. 64 slots
            assert session.capture_steps() == 3 * 4
            assert session.capture_steps() == 0
            before = fast.captures
        outputs, _, _ = run_continuous(session, requests)
        if graphs == "captured first":
            assert fast.captures == before  # the session met no step it had not captured
        runs[graphs] = {k: o.tokens for k, o in outputs.items()}
        joins = {key for key in session.ws.graphs if key[0] == "join"}
        # every packed join length was captured as the session opened: 128, 256 .. JOIN_GRAPH_TOKENS
        lengths = range(128, JOIN_GRAPH_TOKENS + 1, 128)
        assert joins == ({("join", tokens, True) for tokens in lengths} if graphs else set())
    assert runs[True] == runs[False] == runs["captured first"]


def test_capture_steps_runs_only_before_a_row_is_live(tiny):
    session = fast_engine(tiny).session(2, 64, GREEDY, ignore_eos=True)
    assert session.capture_steps() == 0  # on CPU: no CUDA graphs to capture
    session.admit({"x": BatchSpec(prompts([3]), [5], GREEDY, ignore_eos=True)})
    with pytest.raises(ValueError, match="before any request joins"):
        session.capture_steps()


def test_eos_frees_a_row_and_the_sequence_stops_as_it_does_alone(tiny):
    free = fast_engine(tiny).generate(BatchSpec(prompts([6, 9], seed=1), [10, 10], GREEDY, ignore_eos=True))
    eos = free.tokens[1][3]  # a token greedy decoding really produces: sequence 1 stops at step 3 (or before)
    fast = fast_engine(tiny, eos)
    p = prompts([6, 9, 4], seed=1)
    requests = {"a": BatchSpec(p[:2], [10, 10], GREEDY), "b": BatchSpec(p[2:], [8], GREEDY)}
    alone = {k: fast.generate(s) for k, s in requests.items()}
    outputs, _, joined = run_continuous(fast.session(2, 64, GREEDY, ignore_eos=False), requests)
    for key in requests:
        assert outputs[key].tokens == alone[key].tokens and outputs[key].finish_reasons == alone[key].finish_reasons
    assert outputs["a"].finish_reasons[1] == "eos"
    assert joined["b"][1] == {"a"}  # b took the row a's EOS freed while a's other sequence ran on


def test_a_session_refuses_what_it_cannot_hold(tiny):
    fast = fast_engine(tiny)
    session = fast.session(2, 64, GREEDY, ignore_eos=True)
    assert session.cache_slots == 64
    assert not session.fits(BatchSpec(prompts([60]), [10], GREEDY, ignore_eos=True))   # past the cache
    assert not session.fits(BatchSpec(prompts([6]), [10], Sampling(), ignore_eos=True))  # other sampling
    assert not session.fits(BatchSpec(prompts([6]), [10], GREEDY, ignore_eos=False))
    assert not session.fits(BatchSpec(prompts([2, 2, 2]), [4, 4, 4], GREEDY, ignore_eos=True))  # > rows
    one = BatchSpec(prompts([3]), [5], GREEDY, ignore_eos=True)
    assert session.can_admit([one, one]) and not session.can_admit([one, one, one])  # together: 3 rows > 2
    long = BatchSpec(prompts([50]), [5], GREEDY, ignore_eos=True)
    assert session.can_admit([long]) and session.can_admit([one])
    assert not session.can_admit([long, BatchSpec(prompts([3]), [20], GREEDY, ignore_eos=True)])  # 50 + 20 > 64
    session.admit({"x": BatchSpec(prompts([3, 3]), [5, 5], GREEDY, ignore_eos=True)})
    with pytest.raises(ValueError, match="cannot join now"):
        session.admit({"y": one})
    with pytest.raises(ValueError, match="already in this batch"):
        session.admit({"x": one})
    with pytest.raises(ValueError, match="sdpa or bmm"):
        fast_engine(tiny, attention="flex").session(2, 64, GREEDY, ignore_eos=True)


def test_warm_up_compiles_every_bucket_so_requests_compile_nothing(tiny):
    """``serve --warmup``: the compiled path (here inductor's CPU backend) compiles each batch bucket and
    each continuous row prefix during the warm-up; requests of every size afterwards, static and
    continuous, with a longer cache, compile nothing."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # compiled code is cached per function, across engines: count from a clean slate
    fast = fast_engine(tiny, compile=True)
    before = counters["stats"]["unique_graphs"]
    assert warm_up(fast, 3, 1, continuous=True, cache_slots=64) == 6  # batch sizes 1, 2 and 3 (bucket 4)
    warmed = counters["stats"]["unique_graphs"]
    assert warmed > before
    for n in (1, 2, 3):
        fast.generate(BatchSpec(prompts([7, 20, 3][:n]), [70] * n, GREEDY, ignore_eos=True))  # 128-slot cache
    p = prompts([5, 17, 9, 3, 30, 1])
    requests = {"a": BatchSpec(p[0:2], [6, 60], GREEDY, ignore_eos=True),
                "b": BatchSpec(p[2:3], [20], GREEDY, ignore_eos=True),
                "c": BatchSpec(p[3:6], [15, 4, 9], GREEDY, ignore_eos=True)}
    outputs, _, joined = run_continuous(fast.session(3, 128, GREEDY, ignore_eos=True), requests)
    assert joined["c"][0] > 0 and all(len(t) for o in outputs.values() for t in o.tokens)
    assert counters["stats"]["unique_graphs"] == warmed


def test_serve_warmup_runs_before_serving_and_records_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="llmwatts.server")
    srv, port = start_server(tmp_path, continuous=True, max_batch_size=2, warmup=True, continuous_join_tokens=64)
    try:
        assert srv.host.warmup_runs == 4  # batch sizes 1 and 2, static and continuous
        assert srv.host.engine.caches.by_batch.keys() == {1, 2}
        assert srv.host.engine.join_tokens == 64  # --continuous-join-tokens reaches the engine
        # without --continuous-slots the sessions' cache length is unknown: their step graphs wait for first use
        assert "decode graphs are captured at first use" in caplog.text
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        assert stub.Generate(req("after", ["hello"], 3)).completions[0].output_tokens == 3
    finally:
        srv.stop(1)
    db = sqlite_utils.Database(tmp_path / "server.db")
    assert [r["request_id"] for r in db["requests"].rows] == ["after"] and db["batches"].count == 1
    caplog.clear()
    (tmp_path / "slots").mkdir()  # with the cache length known, the session's step graphs are captured too
    slots, _ = start_server(tmp_path / "slots", continuous=True, max_batch_size=2, warmup=True, continuous_slots=64)
    try:
        assert slots.host.warmup_runs == 4 and "at first use" not in caplog.text
    finally:
        slots.stop(1)
    (tmp_path / "eager").mkdir()
    eager, _ = start_server(tmp_path / "eager", warmup=True)  # the eager engine compiles nothing
    try:
        assert eager.host.engine.name == "eager" and eager.host.warmup_runs == 0
    finally:
        eager.stop(1)


def req(rid, prompt_list, n, greedy=True, **kw):
    return pb.GenerateRequest(request_id=rid, run_id="cb", prompts=prompt_list, max_new_tokens=n, ignore_eos=True,
                              sampling=pb.SamplingParams(greedy=greedy), return_token_ids=True, **kw)


def test_the_server_lets_requests_join_a_running_batch_and_energy_adds_up(tmp_path):
    srv, port = start_server(tmp_path, continuous=True, max_batch_size=4)  # joins at once: 4 / 8 < 1 row
    try:
        assert srv.host.batcher.join_rows == 1
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            a = pool.submit(stub.Generate, req("a", ["Tell me a long story about a cat", "x"], 200))
            time.sleep(0.3)
            b = pool.submit(stub.Generate, req("b", ["Why is the sky blue?"], 10))
            c = pool.submit(lambda: list(stub.GenerateStream(req("c", ["one", "two"], 12))))
            ra, rb, chunks = a.result(timeout=120), b.result(timeout=120), c.result(timeout=120)
        rc = chunks[-1].final
        assert ra.batch_id == rb.batch_id == rc.batch_id  # one segment
        # b joined while a was decoding, and left before it.
        assert ra.times.first_token_ns < rb.times.batch_start_ns < rb.times.done_ns < ra.times.done_ns
        assert [c.output_tokens for c in ra.completions] == [200, 200]
        streamed = [[t for ch in chunks[:-1] for t in ch.deltas[i].token_ids] for i in range(2)]
        assert streamed == [list(x.token_ids) for x in rc.completions] and [len(s) for s in streamed] == [12, 12]
        assert [s for ch in chunks[:-1] for s in range(ch.first_step, ch.step + 1)] == list(range(12))  # (coalesced)
        alone = stub.Generate(req("b-alone", ["Why is the sky blue?"], 10))
        assert list(alone.completions[0].token_ids) == list(rb.completions[0].token_ids)
        assert alone.batch_id != rb.batch_id  # the segment ended when the batch drained
    finally:
        srv.stop(1)
    db = sqlite_utils.Database(tmp_path / "server.db")
    rows = {r["request_id"]: r for r in db["requests"].rows}
    segment = db["batches"].get(ra.batch_id)
    assert segment["n_requests"] == 3 and segment["n_sequences"] == 5
    assert segment["output_tokens"] == 200 * 2 + 10 + 12 * 2
    parts = [rows[k]["energy_j"] for k in "abc"]
    assert all(e > 0 for e in parts)
    assert parts[1] < parts[0] / 4  # b processed ~21 tokens, a ~410: a share per token, not per request
    assert sum(parts) == pytest.approx(segment["energy_j"], rel=1e-9)
    gpu_j = sum(r["energy_j"] for r in db["batch_gpu_energy"].rows_where("batch_id = ?", [ra.batch_id]))
    assert gpu_j == pytest.approx(segment["energy_j"], rel=1e-9)
    assert [rows[k]["energy_j"] for k in "abc"] == pytest.approx([ra.energy_j, rb.energy_j, rc.energy_j])
    assert rows["b"]["batch_start_ns"] == rb.times.batch_start_ns  # its join, not the segment's start
    assert segment["start_ns"] < rows["b"]["batch_start_ns"]


def test_admission_is_first_come_first_served(tmp_path):
    """A request that cannot share the running batch (other sampling) waits for it to drain, and one
    behind it does not jump the queue."""
    srv, port = start_server(tmp_path, continuous=True, max_batch_size=4)
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            first = pool.submit(stub.Generate, req("first", ["a"], 300))
            time.sleep(0.3)
            other = pool.submit(stub.Generate, req("other", ["b"], 5, greedy=False))
            time.sleep(0.2)
            behind = pool.submit(stub.Generate, req("behind", ["c"], 5))
            r1, r2, r3 = (f.result(timeout=120) for f in (first, other, behind))
    finally:
        srv.stop(1)
    assert r3.times.received_ns < r1.times.done_ns  # both arrived while first ran
    assert r2.batch_id != r1.batch_id and r3.batch_id != r1.batch_id
    assert r2.times.batch_start_ns >= r1.times.done_ns  # waited for the drain
    assert r3.times.batch_start_ns >= r2.times.batch_start_ns  # did not jump ahead


def first_then_second(tmp_path, first_tokens: int, second: pb.GenerateRequest, **server):
    """A continuous server; a one-prompt request of ``first_tokens`` tokens, then 0.3 s later ``second``
    -> both responses."""
    srv, port = start_server(tmp_path, continuous=True, **server)
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(stub.Generate, req("first", ["a"], first_tokens))
            time.sleep(0.3)
            later = pool.submit(stub.Generate, second)
            return first.result(timeout=120), later.result(timeout=120)
    finally:
        srv.stop(1)


def test_a_segment_holds_one_run(tmp_path):
    """A request of another run waits for the batch to drain: a run's energy is never shared with another's."""
    other = pb.GenerateRequest(request_id="other-run", run_id="another", prompts=["b"], max_new_tokens=5,
                               ignore_eos=True, sampling=pb.SamplingParams(greedy=True))
    r1, r2 = first_then_second(tmp_path, 300, other, max_batch_size=4)
    assert r2.times.received_ns < r1.times.done_ns  # it arrived while first ran
    assert r2.batch_id != r1.batch_id and r2.times.batch_start_ns >= r1.times.done_ns


def test_join_rows_holds_joiners_until_enough_rows_are_free(tmp_path):
    r1, r2 = first_then_second(tmp_path, 200, req("second", ["b"], 5), max_batch_size=2, continuous_join_rows=2)
    # One row was free all along, but a round waits for two: second joined when first ended.
    assert r2.times.received_ns < r1.times.done_ns
    assert r2.times.batch_start_ns >= r1.times.done_ns


def test_a_lone_request_joins_once_it_waited_batch_wait_ms(tmp_path):
    """Rows are free but fewer requests wait than a round wants: the round waits for company, at most
    --batch-wait-ms."""
    r1, r2 = first_then_second(tmp_path, 500, req("lone", ["b"], 5), max_batch_size=4, continuous_join_rows=2,
                               batch_wait_ms=500)
    assert r2.times.batch_start_ns - r2.times.received_ns >= 500e6
    assert r2.times.batch_start_ns < r1.times.done_ns and r2.batch_id == r1.batch_id  # it joined the running batch


def test_a_failed_energy_write_fails_every_request_and_the_health_check(tmp_path):
    srv, port = start_server(tmp_path, continuous=True, max_batch_size=4)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.InferenceStub(channel)
        stub.Generate(req("ok", ["fine"], 3))
        with srv.host.store._lock:
            srv.host.store.db.conn.execute(  # the next segment write fails
                "CREATE TRIGGER refuse BEFORE INSERT ON batch_gpu_energy BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req("lost", ["x"], 3))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(req("after", ["x"], 3))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
        srv.stop(1)


SERVE = [sys.executable, "-m", "llmwatts.cli", "serve", "--model", "tiny", "--device", "cpu", "--power-backend",
         "simulated", "--port", "0", "--continuous"]


@pytest.mark.parametrize("flags,env,fragment", [
    (["--engine", "eager"], {}, "continuous batching needs the fast engine"),
    (["--shards", "2"], {}, "--continuous runs on one shard"),
    (["--continuous-slots", "-1"], {}, "--continuous-slots must be 0 or more"),
    (["--continuous-join-tokens", "-1"], {}, "--continuous-join-tokens must be between 0 (every join eager) and 4096"),
    (["--continuous-join-tokens", "4097"], {}, "--continuous-join-tokens must be between 0 (every join eager) and 4096"),
    (["--continuous-join-rows", "65"], {},
     "--continuous-join-rows must be between 0 (automatic) and --max-batch-size (64)"),
    ([], {"LLMWATTS_FAST_ATTENTION": "flex"}, "continuous batching runs with the sdpa or bmm decode attention"),
])
def test_bad_continuous_flags_exit_with_one_line(tmp_path, flags, env, fragment):
    done = subprocess.run(SERVE + ["--db", str(tmp_path / "s.db"), *flags], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, **env})
    assert done.returncode != 0
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_join_token_limit_is_the_engines(tiny):
    """Guards against the CLI's limit (server/config.py, kept free of torch) drifting from the engine's, and
    against a join size whose packed [T, T] mask and per-length graphs grow without bound: the engine
    refuses one token more than MAX_JOIN_TOKENS, and accepts the limit itself."""
    from llmwatts.server.config import MAX_JOIN_TOKENS
    from llmwatts.server.engine.prefill import MAX_JOIN_TOKENS as ENGINE_MAX

    assert MAX_JOIN_TOKENS == ENGINE_MAX == 4096
    assert fast_engine(tiny, join_tokens=MAX_JOIN_TOKENS).join_tokens == MAX_JOIN_TOKENS
    with pytest.raises(ValueError, match="join_tokens must be between 0 \\(off\\) and 4096, got 4097"):
        fast_engine(tiny, join_tokens=MAX_JOIN_TOKENS + 1)


@pytest.mark.parametrize("join_tokens", [JOIN_GRAPH_TOKENS, 0])
def test_seeded_sampled_requests_draw_what_they_draw_alone_in_packed_joins(tiny, join_tokens):
    """Guards against a packed join sampling a prompt's first token with another row's noise key or at the
    wrong position: seeded, sampled (temperature 0.7, top-p 0.9) requests packed together with others give
    the tokens each gives alone, packed (2048) or eager (0)."""
    fast = fast_engine(tiny, join_tokens=join_tokens)
    ps = prompts([7, 19, 4, 11, 25], seed=3)
    requests = {f"r{i}": BatchSpec([p], [12 + 3 * i], Sampling(temperature=0.7, top_p=0.9, seed=100 + i),
                                   ignore_eos=True) for i, p in enumerate(ps)}
    alone = {k: fast.generate(s).tokens for k, s in requests.items()}
    session = fast.session(4, 64, Sampling(temperature=0.7, top_p=0.9, seed=1), ignore_eos=True)
    outputs, _, joined = run_continuous(session, requests)
    assert {k: o.tokens for k, o in outputs.items()} == alone
    assert joined["r0"][0] == joined["r3"][0] == 0 and joined["r4"][0] > 0  # four joined at once, one later
