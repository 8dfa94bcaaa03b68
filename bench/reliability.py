"""Issue 16's acceptance figures against a real ``llmwatts serve`` (tiny preset, CPU, simulated GPU).

    python bench/reliability.py --out out/reliability.json [--soak-s 120]

1. overload: 10x the queue in concurrent Generate calls plus 500 idle reflection streams; the slowest
   health Check, GetServerInfo, GetPowerCaps, SetPowerCap and ResetPowerCap answer under it;
2. cancel: a long request cancelled mid-batch (static and continuous): the steps its row ran after the
   server saw the cancel, and the server's busy time after it, against one decode step;
3. refused prompts: the server's RSS before and after 100 refused 4 MB prompts, and the DB's growth;
4. kill -9 soak: the server and a load worker killed at random points and restarted, then every request
   the worker sent is in exactly one state on each side and every batch's energy is its requests' sum.
docs/reliability.md records the figures.
"""

import argparse
import concurrent.futures
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc

from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

QUEUE = 64


def start_server(folder: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    port_file = folder / "port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmwatts.cli", "serve", "--model", "tiny", "--device", "cpu", "--power-backend",
         "simulated", "--port", "0", "--port-file", str(port_file), "--db", str(folder / "server.db"),
         "--queue-size", str(QUEUE), "--allow-insecure-loopback-control", "--log-level", "WARNING", *flags],
        stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "a"))
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start: {(folder / 'server.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return proc, int(port_file.read_text())


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def timed_s(call) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def overload(folder: Path) -> dict:
    proc, port = start_server(folder, "--max-new-tokens-limit", "64", "--default-max-new-tokens", "32")
    stop_streams = threading.Event()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        control, health = pb_grpc.ControlStub(channel), health_pb2_grpc.HealthStub(channel)

        def quiet():
            stop_streams.wait()
            return
            yield

        streams = [reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(quiet())
                   for _ in range(500)]
        inference = pb_grpc.InferenceStub(channel)
        calls = [inference.Generate.future(pb.GenerateRequest(
            request_id=f"over{i}", prompts=["keep the server busy"], max_new_tokens=32, ignore_eos=True),
            timeout=300) for i in range(10 * QUEUE)]
        time.sleep(1.0)
        probes = {"health": lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10),
                  "GetServerInfo": lambda: control.GetServerInfo(pb.GetServerInfoRequest(), timeout=10),
                  "GetPowerCaps": lambda: control.GetPowerCaps(pb.GetPowerCapsRequest(), timeout=10),
                  "SetPowerCap": lambda: control.SetPowerCap(pb.SetPowerCapRequest(cap_w=200, reason="bench"),
                                                             timeout=10),
                  "ResetPowerCap": lambda: control.ResetPowerCap(pb.ResetPowerCapRequest(reason="bench"), timeout=10)}
        worst = {name: max(timed_s(p) for _ in range(5)) for name, p in probes.items()}
        codes: dict[str, int] = {}
        for c in calls:
            try:
                c.result()
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            codes[code] = codes.get(code, 0) + 1
        stop_streams.set()
        for s in streams:
            s.cancel()
        return {"idle_streams": 500, "concurrent_generate": 10 * QUEUE, "worst_s": worst, "generate_codes": codes}
    finally:
        stop_streams.set()
        stop(proc)


def cancel(folder: Path) -> dict:
    """A 2000-token request cancelled 2 s in, on the static batcher (eager engine) and on ``--continuous``
    (fast engine): when the server saw the cancel (``requests.cancelled_ns``) after the client's, the steps
    its row ran after that (``steps - cancelled_step``) and the server's busy time after it (the batch's or
    segment's last energy read), against the decode step time."""
    out = {}
    for name, flags in [("static", ()), ("continuous", ("--continuous",))]:
        sub = folder / name
        sub.mkdir()
        proc, port = start_server(sub, *flags)
        try:
            inference = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
            inference.Generate(pb.GenerateRequest(request_id="warm", prompts=["hello"], max_new_tokens=8))
            call = inference.Generate.future(pb.GenerateRequest(
                request_id="cut", prompts=["tell me everything"], max_new_tokens=2000, ignore_eos=True))
            time.sleep(2.0)
            client_cancel_ns = time.time_ns()
            call.cancel()
            time.sleep(2.0)
        finally:
            stop(proc)
        db = sqlite3.connect(sub / "server.db")
        row = db.execute("select r.status, r.output_tokens, r.energy_j, r.steps, r.cancelled_step, r.cancelled_ns, "
                         "r.done_ns, r.batch_start_ns, r.first_token_ns, b.end_ns from requests r join batches b "
                         "using (batch_id) where request_id = 'cut'").fetchone()
        status, tokens, energy_j, steps, seen_step, seen_ns, done_ns, joined_ns, first_ns, end_ns = row
        step_ms = (done_ns - first_ns) / 1e6 / max(steps - 1, 1)
        out[name] = {
            "status": status, "output_tokens": tokens, "energy_j": energy_j, "decode_step_ms": step_ms,
            "server_saw_cancel_after_ms": (seen_ns - client_cancel_ns) / 1e6,
            "steps_after_seen": steps - seen_step,
            "row_done_after_seen_ms": (done_ns - seen_ns) / 1e6,
            # end_ns: the batch's (segment's) last energy read, after the row left
            "busy_after_seen_ms": (end_ns - seen_ns) / 1e6,
            "busy_after_seen_steps": (end_ns - seen_ns) / 1e6 / step_ms,
            "busy_after_client_cancel_ms": (end_ns - client_cancel_ns) / 1e6,
        }
    return out


def refused_prompts(folder: Path) -> dict:
    proc, port = start_server(folder)
    try:
        inference = pb_grpc.InferenceStub(grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]))
        prompt = "word " * (4 * 1024 * 1024 // 5)
        inference.Generate(pb.GenerateRequest(request_id="warm", prompts=["hello"], max_new_tokens=2))
        for i in range(5):  # warm the refusal path itself (grpc buffers, the first allocations)
            try:
                inference.Generate(pb.GenerateRequest(request_id=f"w{i}", prompts=[prompt]))
            except grpc.RpcError:
                pass
        time.sleep(1.0)
        server = psutil.Process(proc.pid)
        rss0, db0 = server.memory_info().rss, sum(p.stat().st_size for p in folder.glob("server.db*"))
        t0 = time.perf_counter()
        codes = set()
        for i in range(100):
            try:
                inference.Generate(pb.GenerateRequest(request_id=f"huge{i}", prompts=[prompt]))
            except grpc.RpcError as e:
                codes.add(e.code().name)
        took_s = time.perf_counter() - t0
        time.sleep(1.0)
        rss1, db1 = server.memory_info().rss, sum(p.stat().st_size for p in folder.glob("server.db*"))
        return {"codes": sorted(codes), "rss_before_mb": rss0 / 2**20, "rss_after_mb": rss1 / 2**20,
                "rss_change_pct": 100 * (rss1 - rss0) / rss0, "db_growth_bytes_per_refusal": (db1 - db0) / 100,
                "seconds_per_refusal": took_s / 100}
    finally:
        stop(proc)


WORKER = r"""
import sqlite3, sys, time, grpc
from llmwatts.v1 import llmwatts_pb2 as pb, llmwatts_pb2_grpc as pb_grpc
port_file, db_path, prefix = sys.argv[1:4]
db = sqlite3.connect(db_path, isolation_level=None)
db.execute("create table if not exists sent (request_id text primary key, state text not null)")
i = 0
while True:
    try:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel("127.0.0.1:" + open(port_file).read().strip()))
    except (OSError, ValueError):
        time.sleep(0.2); continue
    rid = f"{prefix}-{i}"; i += 1
    db.execute("insert into sent values (?, 'sent')", [rid])  # before the call: a kill leaves 'sent'
    try:
        stub.Generate(pb.GenerateRequest(request_id=rid, prompts=["soak"] * (1 + i % 3), max_new_tokens=4 + i % 20,
                                         ignore_eos=True), timeout=5 if i % 7 else 0.05)
        state = "OK"
    except grpc.RpcError as e:
        state = e.code().name
    db.execute("update sent set state = ? where request_id = ?", [state, rid])
"""


def soak(folder: Path, seconds: float, seed: int = 0) -> dict:
    rng = random.Random(seed)
    client_db = folder / "client.db"
    script = folder / "worker.py"
    script.write_text(WORKER)
    server, _ = start_server(folder, "--merge-requests")
    workers, kills = [], {"server": 0, "worker": 0}
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        if not workers or workers[-1].poll() is not None:
            n += 1
            workers.append(subprocess.Popen([sys.executable, str(script), str(folder / "port"), str(client_db),
                                             f"w{n}"]))
        time.sleep(rng.uniform(1.0, 6.0))
        victim = rng.choice(["server", "worker"])
        if victim == "server":
            server.kill()
            server.wait()
            kills["server"] += 1
            (folder / "port").unlink(missing_ok=True)
            server, _ = start_server(folder, "--merge-requests")
        else:
            workers[-1].kill()
            workers[-1].wait()
            kills["worker"] += 1
    for w in workers:
        w.kill()
        w.wait()
    time.sleep(6)  # the last calls' deadlines
    stop(server)
    server, _ = start_server(folder)  # a clean start marks anything left "running" ABORTED
    stop(server)
    db = sqlite3.connect(folder / "server.db")
    db.execute("attach ? as client", [str(client_db)])
    sent = db.execute("select count(*) from client.sent").fetchone()[0]
    client_states = dict(db.execute("select state, count(*) from client.sent group by state").fetchall())
    server_states = dict(db.execute("select status, count(*) from requests where request_id in "
                                    "(select request_id from client.sent) group by status").fetchall())
    ok_mismatch = db.execute("select count(*) from client.sent c join requests r using (request_id) where "
                             "c.state = 'OK' and r.status != 'ok'").fetchone()[0]
    ok_missing = db.execute("select count(*) from client.sent c where c.state = 'OK' and not exists "
                            "(select 1 from requests r where r.request_id = c.request_id)").fetchone()[0]
    unaccounted = db.execute(
        "select count(*) from (select b.batch_id, b.energy_j, coalesce(sum(r.energy_j), 0) as req_j from batches b "
        "left join requests r using (batch_id) group by b.batch_id having abs(b.energy_j - req_j) > "
        "1e-6 * max(1, b.energy_j))").fetchone()[0]
    # client state x server state of every request the worker sent (None: the server never saw it)
    both = {f"{c} / {r}": n for c, r, n in db.execute(
        "select c.state, r.status, count(*) from client.sent c left join requests r using (request_id) "
        "group by c.state, r.status order by count(*) desc").fetchall()}
    return {"seconds": seconds, "kills": kills, "sent": sent, "client_states": client_states,
            "server_states": server_states, "client_vs_server": both, "running_left": server_states.get("running", 0),
            "client_ok_but_server_not_ok": ok_mismatch + ok_missing, "batches_unaccounted": unaccounted,
            "batches": db.execute("select count(*) from batches").fetchone()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    parser.add_argument("--soak-s", type=float, default=120.0, help="length of the kill -9 soak (0 skips it)")
    parser.add_argument("--only", choices=["overload", "cancel", "refused", "soak"], help="one measurement")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in [("overload", overload), ("cancel", cancel), ("refused", refused_prompts),
                         ("soak", lambda f: soak(f, args.soak_s))]:
            if (args.only and name != args.only) or (name == "soak" and not args.soak_s):
                continue
            folder = Path(tmp) / name
            folder.mkdir()
            results[name] = fn(folder)
            print(name, json.dumps(results[name], indent=1), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
