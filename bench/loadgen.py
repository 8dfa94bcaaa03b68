#!/usr/bin/env python
"""The load generator's capacity (issue 21) and its open-loop limit (issue 17), against a fake fast server.

Part 1 — capacity: one `llmwatts load` process (closed loop, ``--users N``) beside a raw threaded grpc
client (N threads, a channel each, calling in a loop), unary and streamed, in the same run: requests/s,
chunks/s and the ratio. The llmwatts side also records every request in its client DB.

Part 2 — open loop: one `llmwatts load` worker at rising ``--rate`` (Poisson, ``--max-concurrency``),
until it lags: offered vs achieved rate and the generator lag (actual − scheduled send) p50/p99. A rate
"keeps up" while lag p99 ≤ ``--lag-ms`` and the achieved rate is within 10% of the offered one.

The fake server (``--serve``, its own process) answers Generate at once and streams ``--chunks`` chunks of
one token; it implements just enough of Control (GetServerInfo, BeginRun, EndRun) for `llmwatts load`.
Both clients meet the same server, so the ratio is the load generator's cost, not the server's. On a shared
box, raw and llmwatts alternate ``--repeats`` times and each keeps its best.

    python bench/loadgen.py                       # full: 10 s per measurement, 32 users, rates 100..3200
    python bench/loadgen.py --quick --json out.json   # the CPU test's path (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc


# --- the fake fast server ---------------------------------------------------------------------------

class FastInference(pb_grpc.InferenceServicer):
    def __init__(self, chunks: int):
        self.chunks = chunks

    def _response(self, request):
        return pb.GenerateResponse(request_id=request.request_id, run_id=request.run_id, batch_id="fake", completions=[
            pb.Completion(index=i, text="x " * self.chunks, prompt_tokens=4, output_tokens=self.chunks,
                          finish_reason="length") for i in range(len(request.prompts) or 1)])

    def Generate(self, request, context):
        return self._response(request)

    def GenerateStream(self, request, context):
        n = len(request.prompts) or 1
        for step in range(self.chunks):
            now = time.time_ns()
            yield pb.GenerateChunk(request_id=request.request_id, batch_id="fake", step=step, first_step=step,
                                   server_ns=now, deltas=[pb.TokenDelta(index=i, token_ids=[1], text="x ",
                                                                        token_server_ns=[now]) for i in range(n)])
        yield pb.GenerateChunk(request_id=request.request_id, batch_id="fake", step=self.chunks, done=True,
                               server_ns=time.time_ns(), final=self._response(request))


class FastControl(pb_grpc.ControlServicer):
    def GetServerInfo(self, request, context):
        return pb.ServerInfo(model="fake", max_batch_size=64, max_new_tokens_limit=2048, server_id="fake",
                             server_time_ns=time.time_ns())

    def BeginRun(self, request, context):
        return pb.RunMarker()

    def EndRun(self, request, context):
        return pb.RunMarker()


def serve(port_file: Path, chunks: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    pb_grpc.add_InferenceServicer_to_server(FastInference(chunks), server)
    pb_grpc.add_ControlServicer_to_server(FastControl(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port_file.write_text(str(port))
    server.wait_for_termination()


def start_server(tmp: Path, chunks: int) -> tuple[subprocess.Popen, str]:
    port_file = tmp / "port"
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file), "--chunks", str(chunks)])
    deadline = time.monotonic() + 30
    while not (port_file.exists() and port_file.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("error: the fake server did not start")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text()}"


# --- the two clients --------------------------------------------------------------------------------

def raw_client(target: str, users: int, seconds: float, stream: bool) -> dict:
    """N threads, one channel each, calling back to back for ``seconds``: requests/s and chunks/s."""
    counts = [[0, 0] for _ in range(users)]
    stop_at = time.perf_counter() + seconds
    prompts = ["Tell me about joules."]

    def loop(slot):
        channel = grpc.insecure_channel(target)
        stub = pb_grpc.InferenceStub(channel)
        i = 0
        while time.perf_counter() < stop_at:
            request = pb.GenerateRequest(request_id=f"raw-{slot}-{i}", run_id="raw", prompts=prompts)
            if stream:
                counts[slot][1] += sum(1 for chunk in stub.GenerateStream(request, timeout=30) if chunk.deltas)
            else:
                stub.Generate(request, timeout=30)
            counts[slot][0] += 1
            i += 1
        channel.close()

    threads = [threading.Thread(target=loop, args=(s,)) for s in range(users)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {"rps": sum(c[0] for c in counts) / elapsed, "chunks_per_s": sum(c[1] for c in counts) / elapsed}


def llmwatts_load(target: str, tmp: Path, seconds: int, *args: str) -> dict:
    """One `llmwatts load` process; its LoadResult as a dict."""
    db = tmp / f"client-{time.time_ns()}.db"
    done = subprocess.run([sys.executable, "-m", "llmwatts.cli", "load", "--target", target, "--dataset", "mini",
                           "--run-time", f"{seconds}s", "--grace", "10s", "--client-db", str(db), "--json",
                           "--quiet", *args], capture_output=True, text=True, timeout=seconds + 120, cwd=tmp)
    if done.returncode not in (0, 1):
        raise SystemExit(f"error: llmwatts load failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


# --- the bench ------------------------------------------------------------------------------------------

def capacity(target: str, tmp: Path, users: int, seconds: int, chunks: int, repeats: int) -> list[dict]:
    """Raw and llmwatts alternate ``repeats`` times; each keeps its best (a shared box only ever slows one)."""
    rows = []
    for stream in (False, True):
        raws, ours_runs = [], []
        for _ in range(repeats):
            raws.append(raw_client(target, users, seconds, stream))
            ours_runs.append(llmwatts_load(target, tmp, seconds, "--users", str(users),
                                           *(["--stream"] if stream else [])))
        raw = max(raws, key=lambda r: r["rps"])
        ours = max(ours_runs, key=lambda r: r["rps"])
        ours_chunks = ours["rps"] * chunks if stream else 0.0
        rows.append({"call": "stream" if stream else "unary", "users": users, "raw_rps": raw["rps"],
                     "llmwatts_rps": ours["rps"], "rps_ratio": ours["rps"] / raw["rps"],
                     "raw_chunks_per_s": raw["chunks_per_s"], "llmwatts_chunks_per_s": ours_chunks,
                     "recorded": ours["requests_ok"] + ours["requests_failed"]})
    return rows


def open_loop(target: str, tmp: Path, rates: list[float], seconds: int, concurrency: int, lag_ms: float) -> list[dict]:
    rows = []
    for rate in rates:
        r = llmwatts_load(target, tmp, seconds, "--rate", f"{rate:g}", "--max-concurrency", str(concurrency))
        achieved = r["rps"]  # requests over first send → last reply
        keeps_up = r["lag_p99_ms"] is not None and r["lag_p99_ms"] <= lag_ms and achieved >= 0.9 * rate
        rows.append({"rate_rps": rate, "achieved_rps": achieved, "lag_p50_ms": r["lag_p50_ms"],
                     "lag_p99_ms": r["lag_p99_ms"], "keeps_up": keeps_up})
        if achieved < 0.5 * rate:
            break  # far past the limit: higher rates only repeat it
    return rows


def markdown(capacity_rows: list[dict], open_rows: list[dict]) -> str:
    lines = ["| call | users | raw grpc req/s | llmwatts load req/s | ratio | raw chunks/s | llmwatts chunks/s |",
             "|---|---|---|---|---|---|---|"]
    for r in capacity_rows:
        lines.append(f"| {r['call']} | {r['users']} | {r['raw_rps']:.0f} | {r['llmwatts_rps']:.0f} | "
                     f"{r['rps_ratio']:.2f} | {r['raw_chunks_per_s']:.0f} | {r['llmwatts_chunks_per_s']:.0f} |")
    lines += ["", "| offered req/s | achieved req/s | lag p50 ms | lag p99 ms | keeps up |", "|---|---|---|---|---|"]
    for r in open_rows:
        lag50 = "-" if r["lag_p50_ms"] is None else f"{r['lag_p50_ms']:.1f}"
        lag99 = "-" if r["lag_p99_ms"] is None else f"{r['lag_p99_ms']:.1f}"
        lines.append(f"| {r['rate_rps']:g} | {r['achieved_rps']:.0f} | {lag50} | {lag99} | "
                     f"{'yes' if r['keeps_up'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", metavar="PORT_FILE", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=int, default=10, help="per measurement (default 10)")
    p.add_argument("--users", type=int, default=32, help="closed-loop users / raw threads (default 32)")
    p.add_argument("--chunks", type=int, default=16, help="chunks per streamed call (default 16)")
    p.add_argument("--rates", default="100,200,400,800,1600,3200", help="open-loop rates to climb (req/s)")
    p.add_argument("--max-concurrency", type=int, default=64, help="open loop (default 64)")
    p.add_argument("--lag-ms", type=float, default=10.0, help="lag p99 above this = does not keep up (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="capacity: alternations, best of (default 3)")
    p.add_argument("--quick", action="store_true", help="seconds-long CPU check of every code path")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = p.parse_args(argv)
    if args.serve:
        serve(Path(args.serve), args.chunks)
        return 0
    if args.quick:
        args.seconds, args.users, args.chunks, args.rates, args.repeats = 1, 4, 4, "20,40", 1
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        proc, target = start_server(tmp, args.chunks)
        try:
            capacity_rows = capacity(target, tmp, args.users, args.seconds, args.chunks, args.repeats)
            open_rows = open_loop(target, tmp, rates, args.seconds, args.max_concurrency, args.lag_ms)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"# bench/loadgen.py {' '.join(sys.argv[1:])} — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} CPUs")
    print(markdown(capacity_rows, open_rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"capacity": capacity_rows, "open_loop": open_rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
