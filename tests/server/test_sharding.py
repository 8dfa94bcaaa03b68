"""Tensor-parallel serving on CPU (gloo): a sharded server answers with exactly the tokens of an unsharded
one, no rank holds the full weights, telemetry of every rank reaches rank 0, and a dead follower takes
the server to NOT_SERVING instead of hanging it.

Every sharded server here is a real ``llmwatts serve --shards N`` (or two ``torchrun`` "nodes") in
subprocesses, asked over gRPC. The reference tokens come from an unsharded server in this process.
"""

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmwatts.server.config import ServerConfig
from llmwatts.server.service import create_server
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow

PROMPTS = ["The energy of a GPU", "Tensor parallel inference splits"]
NEW_TOKENS = 6
START_TIMEOUT_S = 120


def _env() -> dict:
    # One thread per rank: several ranks share two cores, and oversubscribed gloo collectives crawl.
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def serve_cmd(d: Path, model: str = "tiny", engine: str = "eager") -> list[str]:
    return ["--model", model, "--device", "cpu", "--dtype", "float32", "--power-backend", "simulated",
            "--port", "0", "--port-file", str(d / "port"), "--db", str(d / "server.db"), "--telemetry-hz", "20",
            "--engine", engine, "--allow-insecure-loopback-control"]


def start_sharded(d: Path, shards: int, model: str = "tiny", engine: str = "eager", *flags: str) -> subprocess.Popen:
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "llmwatts.cli", "serve", "--shards", str(shards), *serve_cmd(d, model, engine),
           *flags]
    return subprocess.Popen(cmd, env=_env(), stdout=open(d / "log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def start_two_nodes(d: Path, model: str = "tiny") -> list[subprocess.Popen]:
    """Two torchrun "nodes" on localhost, one process each, rendezvous over TCP like separate machines."""
    d.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    procs = []
    for node_rank in (0, 1):
        cmd = [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node_rank),
               "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "llmwatts.server.sharded",
               *serve_cmd(d, model)]
        env = dict(_env(), LLMWATTS_NODE=f"node-{node_rank}")
        procs.append(subprocess.Popen(cmd, env=env, stdout=open(d / f"log{node_rank}", "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def wait_port(d: Path, procs: list[subprocess.Popen]) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        port_file = d / "port"
        if port_file.exists() and port_file.read_text().strip():
            return f"127.0.0.1:{int(port_file.read_text())}"
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.1)
    logs = "\n".join(f.read_text()[-3000:] for f in sorted(d.glob("log*")))
    stop(procs)
    pytest.fail(f"sharded server did not start:\n{logs}")


def stop(procs: list[subprocess.Popen], timeout_s: float = 60) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def generate(target: str, prompts=PROMPTS, greedy: bool = True, seed: int | None = None) -> list[list[int]]:
    with grpc.insecure_channel(target) as channel:
        sampling = pb.SamplingParams(greedy=greedy, **({} if seed is None else {"seed": seed}))
        reply = pb_grpc.InferenceStub(channel).Generate(pb.GenerateRequest(
            request_id=uuid.uuid4().hex, run_id="sharding", prompts=prompts, max_new_tokens=NEW_TOKENS,
            sampling=sampling, ignore_eos=True, return_token_ids=True), timeout=120)
    return [list(c.token_ids) for c in reply.completions]


def server_info(target: str) -> pb.ServerInfo:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.ControlStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=30)


def health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


def layout(db: Path) -> dict:
    with sqlite3.connect(db) as conn:
        (shards, text), = conn.execute("select shard_count, layout from servers").fetchall()
    out = json.loads(text)
    assert out["world"] == shards
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Tokens of an unsharded server: greedy, and sampled with a fixed seed."""
    return unsharded_tokens(tmp_path_factory.mktemp("ref"), "tiny")


def unsharded_tokens(d: Path, model: str) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    config = ServerConfig(model=model, device="cpu", dtype="float32", power_backend="simulated", port=0,
                          db_path=d / "server.db", telemetry_hz=0, engine="eager")
    server, port = create_server(config)
    server.start()
    try:
        target = f"127.0.0.1:{port}"
        return {"greedy": generate(target), "sampled": generate(target, greedy=False, seed=7)}
    finally:
        server.stop(1)


def check_rank_slices(lay: dict, shards: int) -> None:
    """No rank holds the full model: each holds about 1/shards of it (plus the replicated norms)."""
    assert len(lay["ranks"]) == shards
    for r in lay["ranks"]:
        assert r["param_numel"] < r["full_numel"] / shards * 1.05, r
        q_rows = r["shapes"]["model.layers.0.self_attn.q_proj.weight"][0]
        assert r["shapes"]["lm_head.weight"][0] == 32000 // shards
        assert r["shapes"]["model.layers.0.self_attn.o_proj.weight"][1] == q_rows


def test_two_shards_same_tokens_as_one_every_rank_reported_and_a_dead_follower_stops_serving(tmp_path, reference):
    # One server for both halves: each sharded start costs tens of seconds on two cores.
    d = tmp_path / "tp2"
    proc = start_sharded(d, 2)
    try:
        target = wait_port(d, [proc])
        assert generate(target) == reference["greedy"]
        assert generate(target, greedy=False, seed=7) == reference["sampled"]  # one seed on every rank
        info = server_info(target)
        assert info.shard_count == 2 and list(info.devices) == ["cpu", "cpu"]
        assert sorted(g.rank for g in info.gpus) == [0, 1]
        # Power caps apply on every rank's GPU: the follower's through its proxy on rank 0.
        with grpc.insecure_channel(target) as channel:
            control = pb_grpc.ControlStub(channel)
            capped = control.SetPowerCap(pb.SetPowerCapRequest(cap_w=175, lease_s=60, reason="tp"), timeout=30)
            assert sorted((g.rank, g.cap_w) for g in capped.gpus) == [(0, 175.0), (1, 175.0)]
            control.ResetPowerCap(pb.ResetPowerCapRequest(reason="tp"), timeout=30)
            caps = control.GetPowerCaps(pb.GetPowerCapsRequest(), timeout=30)
            assert sorted((g.rank, g.cap_w) for g in caps.gpus) == [(0, 250.0), (1, 250.0)]
            # And clocks: the follower's lock goes through its proxy too (issue 22).
            locked = control.SetLockedClocks(pb.SetLockedClocksRequest(sm_min_mhz=1005, sm_max_mhz=1005, lease_s=60),
                                             timeout=30)
            assert sorted((g.rank, g.locked_sm_max_mhz, g.sm_mhz) for g in locked.gpus) == [(0, 1005, 1005),
                                                                                            (1, 1005, 1005)]
            control.ResetClocks(pb.ResetClocksRequest(reason="tp"), timeout=30)
            clocks = control.GetClocks(pb.GetClocksRequest(), timeout=30)
            assert sorted((g.rank, g.locked_sm_max_mhz, g.sm_max_mhz) for g in clocks.gpus) == [(0, 0, 1410), (1, 0, 1410)]
        time.sleep(1.5)  # an idle heartbeat: the follower's buffered samples reach rank 0

        # A follower killed while idle: the heartbeat notices, health goes NOT_SERVING, calls say why.
        assert health(target) == health_pb2.HealthCheckResponse.SERVING
        os.kill(layout(d / "server.db")["ranks"][1]["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        while health(target) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() - t0 < 15, "still SERVING 15 s after a follower died"
            time.sleep(0.2)
        with pytest.raises(grpc.RpcError) as err:
            generate(target)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "lost a rank" in err.value.details() and "rank 1" in err.value.details(), err.value.details()
    finally:
        stop([proc])
    assert proc.returncode == 0  # rank 0 still shuts down in order (SIGTERM) after losing a follower

    lay = layout(d / "server.db")
    check_rank_slices(lay, 2)
    with sqlite3.connect(d / "server.db") as conn:
        per_rank = dict(conn.execute("select rank, count(*) from telemetry group by rank").fetchall())
        batch_ranks = [r for (r,) in conn.execute("select rank from batch_gpu_energy order by rank")]
        per_batch = conn.execute("select batch_id, group_concat(rank), group_concat(energy_j) from "
                                 "(select * from batch_gpu_energy order by rank) group by batch_id").fetchall()
        gpu_uuids = {u for (u,) in conn.execute("select distinct gpu_uuid from telemetry")}
    assert per_rank.get(0, 0) > 0 and per_rank.get(1, 0) > 0, per_rank  # the time series of both ranks
    assert batch_ranks == [0, 0, 1, 1]  # per-batch joules of both GPUs, for both batches
    for _, ranks, joules in per_batch:  # the follower bracketed its own batch: about rank 0's joules
        j0, j1 = map(float, joules.split(","))
        assert ranks == "0,1" and j0 > 0 and 0.5 < j1 / j0 < 2, (ranks, joules)
    assert gpu_uuids == {u for r in lay["ranks"] for u in r["gpus"]}


def test_cancelled_rows_stop_at_the_same_step_on_every_rank(tmp_path, reference):
    """#16.4 on a sharded server: every rank must run the same steps, so a cancelled request's batch ran to
    its end (2000 tokens for a gone client). Now rank 0 broadcasts each step's stop mask: a cancelled row
    stops at the step in flight on every rank (the follower's tokens still equal rank 0's, or the batch
    would fail as diverged), the others run on, and a batch of cancelled rows ends at once."""
    d = tmp_path / "tp2-cancel"
    proc = start_sharded(d, 2, "tiny", "eager", "--merge-requests", "--batch-wait-ms", "500")
    try:
        target = wait_port(d, [proc])
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.InferenceStub(channel)

            def call(rid, max_new, timeout):
                return stub.Generate.future(pb.GenerateRequest(
                    request_id=rid, run_id="cancel", prompts=["tell me everything"], max_new_tokens=max_new,
                    ignore_eos=True), timeout=timeout)

            keep, cut = call("keep", 120, 300), call("cut", 2000, 3)  # one merged batch
            assert len(keep.result().completions[0].text) > 0  # ran on after cut's rows stopped
            with pytest.raises(grpc.RpcError) as e:
                cut.result()
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(grpc.RpcError):  # a batch of nothing but cancelled rows ends at once
                call("alone", 2000, 3).result()
        t0 = time.monotonic()
        assert generate(target) == reference["greedy"]  # the ranks are still in step
        assert time.monotonic() - t0 < 60
        assert health(target) == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop([proc])
    with sqlite3.connect(d / "server.db") as conn:
        conn.row_factory = sqlite3.Row
        rows = {r["request_id"]: dict(r) for r in conn.execute("select * from requests")}
    assert rows["keep"]["status"] == "ok" and rows["keep"]["output_tokens"] == 120
    assert rows["keep"]["batch_id"] == rows["cut"]["batch_id"]
    for rid in ("cut", "alone"):
        row = rows[rid]
        # (the client's deadline passes first: its cancel may reach the server before the server's own timer)
        assert row["status"] in ("DEADLINE_EXCEEDED", "CANCELLED") and row["output_tokens"] < 2000, row
        assert 0 <= row["steps"] - row["cancelled_step"] <= 1, row
        print(rid, {k: row[k] for k in ("status", "output_tokens", "steps", "cancelled_step")})


@pytest.mark.parametrize("shards", [4, 8])
def test_four_and_eight_shards_same_tokens(tmp_path, reference, shards):
    # 8 ranks on gloo is the code path of the 8-GPU run (issue 6), on two CPU cores.
    d = tmp_path / f"tp{shards}"
    proc = start_sharded(d, shards)
    try:
        assert generate(wait_port(d, [proc])) == reference["greedy"]
    finally:
        stop([proc])
    check_rank_slices(layout(d / "server.db"), shards)


def test_fast_engine_on_two_shards_same_tokens_as_eager_on_one(tmp_path, reference):
    # The fast engine calls FairScale's layers itself (collectives inside its decode step).
    d = tmp_path / "tp2-fast"
    proc = start_sharded(d, 2, engine="fast")
    try:
        target = wait_port(d, [proc])
        assert server_info(target).engine == "fast"
        assert generate(target) == reference["greedy"]
    finally:
        stop([proc])


def test_two_torchrun_nodes_same_tokens(tmp_path, reference):
    d = tmp_path / "nodes"
    procs = start_two_nodes(d)
    try:
        target = wait_port(d, procs)
        assert generate(target) == reference["greedy"]
        assert server_info(target).shard_count == 2
    finally:
        stop(procs)
    lay = layout(d / "server.db")
    assert [(r["rank"], r["node"], r["node_rank"]) for r in lay["ranks"]] == [(0, "node-0", 0), (1, "node-1", 1)]
    with sqlite3.connect(d / "server.db") as conn:
        nodes = {n for (n,) in conn.execute("select distinct node from batch_gpu_energy")}
    assert nodes == {"node-0", "node-1"}


def write_checkpoint(d: Path, heads: int) -> Path:
    """A tiny LLaMA checkpoint (safetensors) with its tokenizer, as save_pretrained writes it."""
    import torch
    from transformers import LlamaForCausalLM

    from llmwatts.server.models import preset_config
    from llmwatts.server.tokenizer import llama_like_tokenizer

    config = preset_config("tiny")
    config.num_attention_heads = config.num_key_value_heads = heads
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(d, safe_serialization=True)
    llama_like_tokenizer().save_pretrained(d)
    return d


def check_checkpoint_shards(tmp_path: Path, shards: int) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", heads=8)
    ref = unsharded_tokens(tmp_path / "ref", str(ckpt))
    d = tmp_path / f"tp{shards}"
    proc = start_sharded(d, shards, model=str(ckpt))
    try:
        assert generate(wait_port(d, [proc])) == ref["greedy"], f"{shards} shards"
    finally:
        stop([proc])
    lay = layout(d / "server.db")
    check_rank_slices(lay, shards)
    for r in lay["ranks"]:  # read exactly what it holds: its slices, never a whole sharded tensor
        assert r["read_numel"] == r["param_numel"]


def test_checkpoint_sharded_reads_only_slices(tmp_path):
    check_checkpoint_shards(tmp_path, 2)
