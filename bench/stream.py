"""Streaming at unary's speed? The same closed-loop load through ``Generate`` and ``GenerateStream``.

Issue 20: on an H100 with llama-7b, 64 users on the continuous server ran 5,076 tok/s unary but ~2,800
streamed (a chunk per decode step per request through the Python gRPC server, and a full re-decode of
every sequence at every step). This script measures, in one run and one server process per mode:

- ``unary``: ``Generate``, the baseline;
- ``stream-per-step``: ``GenerateStream`` with ``--stream-interval-ms 0`` (a chunk as soon as a step is there);
- ``stream``: ``GenerateStream`` with the server's default interval (steps faster than it coalesced);
  ``stream-<ms>``: with that interval.

Workload: the first ``--requests`` Alpaca prompts as the load generator renders them, greedy,
``--max-new-tokens`` each (fixed length, as ``llmwatts load --greedy --max-new-tokens 256`` against
random weights, which never stop on EOS), or with ``--lengths reference`` each request's reference length
(bench/continuous.py's workload). Closed loop: ``--users`` client threads spread over ``--client-procs``
processes, each sending its next request when the last is answered, against ``llmwatts serve --continuous
--max-batch-size USERS`` (every decode graph captured first on CUDA, as ``serve --warmup
--continuous-slots`` does). Each mode runs ``--warmup-requests`` untimed first.

Per mode: tokens/s, J/token (NVML counter, CUDA), chunks/s, the server process's CPU (user + system,
all its threads, as % of one core), TTFT p50/p95 at the client (send to first chunk with tokens; unary: none),
latency p50/p95, and ITL p50/p99 from the chunks' per-token server times (``token_server_ns``).

    python bench/stream.py --data-dir DIR --users 64 --requests 512                  # llama-7b on cuda
    python bench/stream.py --quick --data-dir DIR                                    # tiny on cpu
"""

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import queue
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
from continuous import GREEDY, Request, pct, workload
from engine_timing import sync
from inprocess_server import alpaca_file, load_once, server_config
from nvml_energy import EnergyCounter

from llmwatts.server.continuous import LoopStats

MODES = {"unary": None, "stream-per-step": 0.0, "stream": None}  # mode -> --stream-interval-ms (None: default)


def interval_of(mode: str) -> float | None:
    """A mode's --stream-interval-ms: ``stream-per-step`` 0, ``stream`` the server's default (None),
    ``stream-<ms>`` that many ms. Raises ValueError for anything else."""
    if mode in MODES:
        return MODES[mode]
    ms = float(mode.removeprefix("stream-")) if mode.startswith("stream-") else -1.0
    if not 0 <= ms <= 10000:
        raise ValueError(mode)
    return ms


def clients(port: int, reqs: list[Request], users: int, stream: bool) -> dict:
    """One client process: ``users`` threads in a closed loop over ``reqs``. Returns per-request lists."""
    import grpc

    from llmwatts.v1 import llmwatts_pb2 as pb
    from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

    todo: queue.Queue = queue.Queue()
    for r in reqs:
        todo.put(r)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.InferenceStub(channel)
    out = {"latency_s": [], "ttft_s": [], "chunks": 0, "tokens": 0, "itl_ms": [], "started": time.time()}

    def user() -> None:
        while True:
            try:
                r = todo.get_nowait()
            except queue.Empty:
                return
            request = pb.GenerateRequest(request_id=uuid.uuid4().hex, run_id="bench", prompts=[r.text],
                                         max_new_tokens=r.new, sampling=pb.SamplingParams(greedy=True),
                                         ignore_eos=True)
            t0 = time.perf_counter()
            if not stream:
                resp = stub.Generate(request, timeout=900)
                assert resp.completions[0].output_tokens == r.new
                out["latency_s"].append(time.perf_counter() - t0)
                out["tokens"] += r.new
                continue
            ttft, times, chunks = None, [], 0
            for chunk in stub.GenerateStream(request, timeout=900):
                if chunk.done:
                    assert chunk.final.completions[0].output_tokens == r.new
                    continue
                chunks += 1
                if ttft is None and chunk.deltas[0].token_ids:
                    ttft = time.perf_counter() - t0
                times += chunk.deltas[0].token_server_ns
            out["latency_s"].append(time.perf_counter() - t0)
            out["ttft_s"].append(ttft)
            out["chunks"] += chunks
            out["tokens"] += r.new
            out["itl_ms"] += [(b - a) / 1e6 for a, b in zip(times, times[1:])]

    with concurrent.futures.ThreadPoolExecutor(users) as pool:
        for f in [pool.submit(user) for _ in range(users)]:
            f.result()
    channel.close()
    return out


def closed_loop(pool, port: int, reqs: list[Request], users: int, procs: int, stream: bool) -> dict:
    """``users`` closed-loop users over ``procs`` client processes; the requests dealt round-robin."""
    futures = [pool.submit(clients, port, reqs[k::procs], len(range(k, users, procs)), stream)
               for k in range(procs)]
    merged = {"latency_s": [], "ttft_s": [], "chunks": 0, "tokens": 0, "itl_ms": []}
    for f in futures:
        part = f.result()
        for key in merged:
            merged[key] += part[key]
    return merged


def measure(run, counter: EnergyCounter, device: torch.device) -> dict:
    sync(device)
    e0, t0, cpu0 = counter.energy_mj(), time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    out = run()
    sync(device)
    seconds = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    row = {"seconds": seconds, "tokens": out["tokens"], "tok_s": out["tokens"] / seconds,
           "chunks_s": out["chunks"] / seconds, "server_cpu_pct": 100 * cpu_s / seconds,
           "server_cpu_ms_per_1k_tok": 1000 * cpu_s / out["tokens"] * 1000,
           "p50_s": pct(out["latency_s"], 0.5), "p95_s": pct(out["latency_s"], 0.95)}
    ttft = [t for t in out["ttft_s"] if t is not None]
    if ttft:
        row.update(ttft_p50_ms=1000 * pct(ttft, 0.5), ttft_p95_ms=1000 * pct(ttft, 0.95))
    if out["itl_ms"]:
        row.update(itl_p50_ms=pct(out["itl_ms"], 0.5), itl_p99_ms=pct(out["itl_ms"], 0.99))
    e1 = counter.energy_mj()
    if e0 is not None:
        joules = (e1 - e0) / 1000.0
        row.update(j_per_token=joules / out["tokens"], watts=joules / seconds)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--users", type=int, default=64, help="closed-loop users = the server's --max-batch-size")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--warmup-requests", type=int, default=0, help="untimed requests per mode first (default: 2 x users)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--lengths", choices=("fixed", "reference"), default="fixed",
                    help="fixed: every request asks for --max-new-tokens; reference: its Alpaca reference length")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"in this order, repeats allowed: {', '.join(MODES)}, or stream-<ms> (that interval)")
    ap.add_argument("--client-procs", type=int, default=4, help="client processes (each with users/N threads)")
    ap.add_argument("--data-dir", help="folder with alpaca_5k.jsonl (default: llmwatts' data folders)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="tiny on cpu: 4 users, 16 requests, 12 new tokens")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.device, args.users, args.requests, args.max_new_tokens = "tiny", "cpu", 4, 16, 12
        args.client_procs = min(args.client_procs, 2)
    modes = [m for m in args.modes.split(",") if m]
    for mode in modes:
        try:
            interval_of(mode)
        except ValueError:
            ap.error(f"unknown mode {mode!r}: use {', '.join(MODES)} or stream-<ms> (e.g. stream-20)")
    path = alpaca_file(args.data_dir)
    if path is None:
        return 2

    from llmwatts.server.config import ServerConfig
    from llmwatts.server.host import Host
    from llmwatts.server.service import create_server

    device = torch.device(args.device)
    counter = EnergyCounter(device)
    db_dir = Path(tempfile.mkdtemp())
    default_interval_ms = ServerConfig().stream_interval_ms

    def config(name: str, **kw) -> ServerConfig:
        return server_config(args, device, db_dir, name, max_batch_size=args.users, queue_size=args.users + 8,
                             continuous=True, **kw)

    t_load = time.perf_counter()
    loaded, engine = load_once(config("load"))
    n_warm = args.warmup_requests or 2 * args.users
    reqs = workload(path, loaded.tokenizer, args.requests + n_warm, args.max_new_tokens)
    if args.lengths == "fixed":
        reqs = [Request(r.text, r.ids, args.max_new_tokens) for r in reqs]
    warm, reqs = reqs[:n_warm], reqs[n_warm:]
    slots = max(len(r.ids) + r.new for r in warm + reqs)
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": getattr(counter, "name", "cpu"),
               "model": args.model, "torch": torch.__version__, "users": args.users, "requests": len(reqs),
               "lengths": args.lengths, "max_new_tokens": args.max_new_tokens, "client_procs": args.client_procs,
               "default_interval_ms": default_interval_ms, "rows": []}
    print(f"[{time.strftime('%H:%M:%S')}] {args.model} loaded in {time.perf_counter() - t_load:.1f} s on "
          f"{results['device']}", flush=True)
    if device.type == "cuda":  # every decode graph of the session first, as serve --warmup --continuous-slots does
        t0 = time.perf_counter()
        n = engine.session(args.users, slots, GREEDY, ignore_eos=True).capture_steps()
        print(f"[{time.strftime('%H:%M:%S')}] captured {n} decode graphs in {time.perf_counter() - t0:.1f} s", flush=True)

    pool = concurrent.futures.ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
    procs = min(args.client_procs, args.users)
    for mode in modes:
        interval = interval_of(mode)
        kw = {"continuous_slots": slots}
        if interval is not None:
            kw["stream_interval_ms"] = interval
        srv, port = create_server(config(mode, **kw), host=Host(config(mode, **kw), loaded=loaded, engine=engine))
        srv.start()
        stream = mode != "unary"
        try:
            closed_loop(pool, port, warm, args.users, procs, stream)  # untimed
            srv.host.batcher.stats = LoopStats()
            row = {"mode": mode, "stream_interval_ms": (default_interval_ms if interval is None else interval)
                   if stream else None,
                   **measure(lambda: closed_loop(pool, port, reqs, args.users, procs, stream), counter, device),
                   "loop": dataclasses.asdict(srv.host.batcher.stats)}
        except Exception as e:  # one failing row must not lose the rest of a paid GPU run
            row = {"mode": mode, "error": f"{type(e).__name__}: {e}"[:300]}
        finally:
            srv.stop(1)
        results["rows"].append(row)
        print(f"[{time.strftime('%H:%M:%S')}] {mode}: " + (row.get("error") or
              f"{row['tok_s']:.1f} tok/s, {row['chunks_s']:.0f} chunks/s, server CPU {row['server_cpu_pct']:.0f}%; "
              f"batcher: {LoopStats(**row['loop']).summary()}"),
              flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    pool.shutdown()
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def print_report(results: dict) -> None:
    print(f"\n# {results['model']} on {results['device']}: {results['users']} closed-loop users, "
          f"{results['requests']} Alpaca requests, {results['lengths']} lengths (max {results['max_new_tokens']} new), "
          f"continuous server, {results['client_procs']} client processes; torch {results['torch']}; {results['date']}\n")
    print("| mode | interval ms | tok/s | vs unary | J/token | W | chunks/s | server CPU % | CPU ms / 1k tok | "
          "TTFT p50 / p95 ms | latency p50 / p95 s | ITL p50 / p99 ms | batcher |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|")
    base = next((r for r in results["rows"] if r["mode"] == "unary" and "tok_s" in r), None)  # the first
    for r in results["rows"]:
        if "error" in r:
            print(f"| {r['mode']} | | {r['error']} | | | | | | | | | | |")
            continue
        rel = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else ""
        j = f"{r['j_per_token']:.4f}" if "j_per_token" in r else "-"
        w = f"{r['watts']:.0f}" if "watts" in r else "-"
        ttft = f"{r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f}" if "ttft_p50_ms" in r else "-"
        itl = f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f}" if "itl_p50_ms" in r else "-"
        interval = "" if r["stream_interval_ms"] is None else f"{r['stream_interval_ms']:g}"
        print(f"| {r['mode']} | {interval} | {r['tok_s']:.1f} | {rel} | {j} | {w} | {r['chunks_s']:.0f} | "
              f"{r['server_cpu_pct']:.0f} | {r['server_cpu_ms_per_1k_tok']:.0f} | {ttft} | "
              f"{r['p50_s']:.2f} / {r['p95_s']:.2f} | {itl} | {LoopStats(**r['loop']).summary()} |")


if __name__ == "__main__":
    sys.exit(main())
