"""The continuous server at the engine's efficiency? Host time between decode steps, server against engine.

Issue 20: on an H100 the continuous server ran ~0.79x the tokens/s of the same engine offline at 64 rows.
A decode step only keeps the GPU busy while the host's work between steps (admission, the segment's
ledger, per-step records, stream chunks, stop checks) stays under the GPU's step time. On CPU with the
``tiny`` preset the model's forward is small, so that host work shows up clearly. One run, one process,
the same engine object, in this order per ``B``:

- ``engine``: a ``ContinuousSession`` of ``B`` rows, every request queued at t0, joining in rounds of
  ``B / 8`` free rows (the server's default round, ``JOIN_FRACTION``) -- ``bench/continuous.py``'s
  ``engine_continuous``, the baseline;
- ``unary``: ``llmwatts serve --continuous --max-batch-size B``, ``B + --extra-users`` closed-loop client
  threads in a process of their own (``Generate``);
- ``stream``: the same with ``GenerateStream`` (the server's default chunk interval).

Per row: tokens/s and its ratio to the engine row; decode steps and live rows a step; the forward's ms a
step (``FastEngine.decode_step``, timed around each call); and the **host ms a step outside the forward**:
the loop's time less the forward and the prefills (``FastEngine.join``), per step, as wall time
(``perf_counter_ns``: includes waits for the interpreter lock and for the CPU) and as the loop thread's CPU
time (``thread_time_ns``: the work itself, which other processes on a shared box do not inflate). For the
engine row the loop is the whole run; for the server rows, the batcher thread (wall: its busy time,
``LoopStats``; CPU: every turn, an idle turn's wait for work costing none), and beside it the meter
thread's time a step (``_settle``: energy reads, the split, the segment's rows written), which competes
for the interpreter lock. On CUDA ``decode_step`` only launches (the step runs asynchronously), so the
host columns are CPU figures there; the tokens/s ratio is the GPU's. ``--profile`` prints the batcher's
and the meter thread's cProfile (by own time) after each server row. On a shared CPU box tokens/s swing
with other processes' load: repeat modes (``--modes engine,unary,stream,engine,unary,stream``) and read
the CPU columns.

On CUDA each row also gives J/token and watts from the GPU's NVML energy counter over the timed region
(read-only).

Workload: Alpaca requests with their reference lengths, greedy, fixed length (``bench/continuous.py``).

    python bench/server_host.py --data-dir DIR                        # tiny on cpu, B = 64 and 256
    python bench/server_host.py --data-dir DIR --model llama-7b --device cuda
    python bench/server_host.py --quick --data-dir DIR                # 4 rows, proves the script runs
"""

import argparse
import concurrent.futures
import cProfile
import gc
import io
import json
import multiprocessing
import pstats
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from continuous import GREEDY, engine_continuous, pct, sync, workload
from nvml_energy import EnergyCounter
from stream import closed_loop

from llmwatts import paths
from llmwatts.loadgen.prompts import ALPACA_FILES, _find
from llmwatts.server.continuous import JOIN_FRACTION, LoopStats

MODES = ("engine", "unary", "stream")


@dataclass
class Spent:
    """Time inside a method: wall (``perf_counter_ns``) and the calling thread's CPU (``thread_time_ns``:
    what other processes on a shared box do not inflate; a wait for the interpreter lock is not CPU)."""

    wall_ns: int = 0
    cpu_ns: int = 0
    calls: int = 0


def timed(obj, name: str, spent: Spent, profile: cProfile.Profile | None = None) -> None:
    """Wrap ``obj.name`` (a method looked up on the instance at each call; ``del obj.name`` unwraps it) to add
    its time to ``spent`` (and profile it)."""
    method = getattr(obj, name)

    def timed_call(*a, **kw):
        w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        if profile is not None:
            profile.enable()
        try:
            return method(*a, **kw)
        finally:
            if profile is not None:
                profile.disable()
            spent.wall_ns += time.perf_counter_ns() - w0
            spent.cpu_ns += time.thread_time_ns() - c0
            spent.calls += 1

    setattr(obj, name, timed_call)


class ForwardClock:
    """Time inside the engine's ``decode_step`` (the forward) and ``join`` (the prefills)."""

    def __init__(self, engine):
        self.engine, self.forward, self.join = engine, Spent(), Spent()
        timed(engine, "decode_step", self.forward)
        timed(engine, "join", self.join)

    def reset(self) -> None:
        for spent in (self.forward, self.join):
            spent.wall_ns = spent.cpu_ns = spent.calls = 0

    def close(self) -> None:
        del self.engine.decode_step, self.engine.join


def host_columns(busy: Spent, clock: ForwardClock, steps: int) -> dict:
    """Forward ms a step, and the host's ms a step outside the forward and the joins: wall and CPU."""
    n = max(steps, 1)
    f, j = clock.forward, clock.join
    return {"forward_ms": f.wall_ns / 1e6 / n, "host_ms": (busy.wall_ns - f.wall_ns - j.wall_ns) / 1e6 / n,
            "host_cpu_ms": (busy.cpu_ns - f.cpu_ns - j.cpu_ns) / 1e6 / n, "join_s": j.wall_ns / 1e9}


def joules(counter: EnergyCounter, e0_mj: int | None) -> dict:
    """The GPU's joules since ``e0_mj`` (NVML's counter, read-only); nothing on CPU."""
    return {} if e0_mj is None else {"energy_j": (counter.energy_mj() - e0_mj) / 1000.0}


def engine_row(engine, reqs, b: int, clock: ForwardClock, device, counter: EnergyCounter) -> dict:
    engine_continuous(engine, reqs[:b], b, max(1, b // JOIN_FRACTION))  # untimed
    sync(device)
    clock.reset()
    busy = Spent()
    e0, w0, c0 = counter.energy_mj(), time.perf_counter_ns(), time.thread_time_ns()
    out = engine_continuous(engine, reqs, b, max(1, b // JOIN_FRACTION))
    sync(device)
    busy.wall_ns, busy.cpu_ns = time.perf_counter_ns() - w0, time.thread_time_ns() - c0
    return {"seconds": busy.wall_ns / 1e9, "steps": out["steps"], "live_rows": out["mean_live_rows"],
            "p50_s": pct(out["latencies"], 0.5), **host_columns(busy, clock, out["steps"]), **joules(counter, e0)}


def server_row(create, pool, reqs, warm, users: int, stream: bool, clock: ForwardClock, device,
               counter: EnergyCounter, profile: bool) -> dict:
    srv, port = create()
    srv.start()
    batcher = srv.host.batcher
    try:
        closed_loop(pool, port, warm, users, 1, stream)  # untimed
        batcher.stats = LoopStats()
        profs = [cProfile.Profile(), cProfile.Profile()] if profile else [None, None]
        turns, meter = Spent(), Spent()
        timed(batcher, "_run_once", turns, profs[0])  # the batcher thread's turns
        timed(batcher, "_settle", meter, profs[1])    # the meter thread's reads, splits and writes
        sync(device)
        clock.reset()
        e0, t0 = counter.energy_mj(), time.perf_counter_ns()
        out = closed_loop(pool, port, reqs, users, 1, stream)
        sync(device)
        wall_ns = time.perf_counter_ns() - t0
        energy = joules(counter, e0)
        s = batcher.stats
    finally:
        srv.stop(1)
    row = {"seconds": wall_ns / 1e9, "steps": s.steps, "live_rows": s.live_rows / max(s.steps, 1),
           "p50_s": pct(out["latency_s"], 0.5), "joins": s.joins, "users": users, **energy,
           "meter_ms": meter.wall_ns / 1e6 / max(s.steps, 1), "meter_cpu_ms": meter.cpu_ns / 1e6 / max(s.steps, 1),
           # wall: the batcher's busy time (LoopStats, idle waits excluded); CPU: every turn's (an idle
           # turn's wait for work costs none)
           **host_columns(Spent(int(1e9 * (s.step_s + s.between_s + s.join_s)), turns.cpu_ns), clock, s.steps)}
    if out["ttft_s"] and None not in out["ttft_s"]:
        row["ttft_p50_ms"] = 1000 * pct(out["ttft_s"], 0.5)
    if profile:
        text = io.StringIO()
        for title, prof in zip(("batcher thread", "meter thread"), profs):
            text.write(f"-- {title}\n")
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        row["profile"] = text.getvalue()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="64,256", help="rows (engine and server's --max-batch-size)")
    ap.add_argument("--requests", type=int, default=0, help="requests per batch size (default: 4 B)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--modes", default=",".join(MODES), help=f"in this order, repeats allowed: {', '.join(MODES)}")
    ap.add_argument("--extra-users", type=int, default=-1,
                    help="server rows: B + this many client threads (default: B / 8, one round's worth: a row "
                         "that frees finds a request waiting, as the offline engine's queue always has one)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default 1: the clients and "
                                                          "gRPC get the other core of a 2-core box)")
    ap.add_argument("--join-tokens", type=int, default=-1,
                    help="joins of up to this many padded tokens replay captured graphs (the server's "
                         "--continuous-join-tokens; default: the engine's JOIN_GRAPH_TOKENS; 0: none)")
    ap.add_argument("--weights", default="fp16", choices=("fp16", "fp8"), help="serve --weights (default fp16)")
    ap.add_argument("--kv-cache", default="fp16", choices=("fp16", "fp8"), help="serve --kv-cache (default fp16)")
    ap.add_argument("--profile", action="store_true", help="print the batcher thread's cProfile per server row")
    ap.add_argument("--data-dir", help="folder with alpaca_5k.jsonl (default: llmwatts' data folders)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="4 rows, 16 requests, 12 new tokens")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.requests, args.max_new_tokens = "4", 16, 12
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES):
        ap.error(f"unknown modes {sorted(set(modes) - set(MODES))}: use {', '.join(MODES)}")
    dirs = [Path(args.data_dir)] if args.data_dir else paths.data_dirs(None)
    path = _find(dirs, ALPACA_FILES)
    if path is None:
        print(f"error: {' or '.join(ALPACA_FILES)} not found in {', '.join(map(str, dirs))}", file=sys.stderr)
        return 2

    from llmwatts.server.config import ServerConfig
    from llmwatts.server.host import Host
    from llmwatts.server.service import create_server

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    db_dir = Path(tempfile.mkdtemp())
    counter = EnergyCounter(device)

    cpu = device.type == "cpu"  # the fp8 paths' CPU reference maths (``fp8-reference``)
    weights = "fp8-reference" if args.weights == "fp8" and cpu else args.weights
    kv_cache = "fp8-reference" if args.kv_cache == "fp8" and cpu else args.kv_cache

    def config(name: str, b: int, users: int, **kw) -> ServerConfig:
        return ServerConfig(model=args.model, device=args.device, engine="fast", port=0, weights=weights,
                            kv_cache=kv_cache,
                            power_backend="nvml-readonly" if device.type == "cuda" else "simulated",
                            db_path=db_dir / f"{name}.db", cap_state_path=db_dir / f"{name}.caps.json",
                            max_batch_size=b, queue_size=users + 8, **kw)

    base = Host(config("load", 1, 1))
    loaded, engine = base.loaded, base.engine
    base.close()
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "model": args.model, "dtype": base.dtype_text,
               "device": getattr(counter, "name", str(device)),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": []}
    if args.join_tokens >= 0:
        engine.join_tokens = args.join_tokens
    results["join_tokens"] = engine.join_tokens
    clock = ForwardClock(engine)
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    for b in [int(x) for x in args.batches.split(",") if x]:
        users = b + (args.extra_users if args.extra_users >= 0 else max(1, b // JOIN_FRACTION))
        n = args.requests or 4 * b
        reqs = workload(path, loaded.tokenizer, n + users, args.max_new_tokens)
        warm, reqs = reqs[n:], reqs[:n]
        tokens, slots = sum(r.new for r in reqs), max(len(r.ids) + r.new for r in reqs + warm)
        if device.type == "cuda":
            # The previous size's caches and graphs go first: the rows' sessions and servers may still
            # hold them until collected, and B = 256's then left no room for 64's (2026-12-06, OOM).
            gc.collect()
            engine.release()
            engine.session(b, slots, GREEDY, ignore_eos=True).capture_steps()
        for k, mode in enumerate(modes):
            name = f"{mode}-{b}-{k}"
            t0 = time.perf_counter()
            try:
                if mode == "engine":
                    row = engine_row(engine, reqs, b, clock, device, counter)
                else:
                    cfg = config(name, b, users, continuous=True, continuous_slots=slots)
                    row = server_row(lambda: create_server(cfg, host=Host(cfg, loaded=loaded, engine=engine)), pool,
                                     reqs, warm, users, mode == "stream", clock, device, counter,
                                     args.profile)
                row.update(tok_s=tokens / row["seconds"])
                if "energy_j" in row:
                    row.update(j_per_token=row["energy_j"] / tokens, watts=row["energy_j"] / row["seconds"])
            except Exception as e:
                row = {"error": f"{type(e).__name__}: {e}"[:300]}
            row.update(mode=mode, batch=b, requests=len(reqs), tokens=tokens)
            results["rows"].append(row)
            print(f"[{time.strftime('%H:%M:%S')}] b={b} {mode} ({time.perf_counter() - t0:.0f} s): " +
                  (row.get("error") or f"{row['tok_s']:.0f} tok/s, {row['steps']} steps, forward "
                   f"{row['forward_ms']:.2f} ms + host {row['host_ms']:.3f} ms ({row['host_cpu_ms']:.3f} ms CPU) a step, "
                   f"joins {row.get('join_s', float('nan')):.2f} s"), flush=True)
            if "profile" in row:
                print(row["profile"], flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
        engine.release()
    pool.shutdown()
    clock.close()
    print_report(results)
    return 0


def print_report(results: dict) -> None:
    print(f"\n# {results['model']} ({results.get('dtype', '')}) on {results['device']} ({results['threads']} torch "
          f"threads), Alpaca reference "
          f"lengths, greedy; joins graphed up to {results['join_tokens']} tokens; torch {results['torch']}; "
          f"{results['date']}\n")
    print("| B | mode | client threads | tok/s | vs engine | J/token | W | steps | live rows | forward ms/step | "
          "host ms/step (wall / CPU) | meter ms/step (wall / CPU) | p50 s | TTFT p50 ms |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|")
    base = {}
    for r in results["rows"]:
        if "error" in r:
            print(f"| {r['batch']} | {r['mode']} | | {r['error']} | | | | | | | | | | |")
            continue
        if r["mode"] == "engine":
            base[r["batch"]] = r  # the latest engine row of this B
        b = base.get(r["batch"])
        rel = f"{r['tok_s'] / b['tok_s']:.2f}x" if b else ""
        ttft = f"{r['ttft_p50_ms']:.0f}" if "ttft_p50_ms" in r else "-"
        meter = f"{r['meter_ms']:.3f} / {r['meter_cpu_ms']:.3f}" if "meter_ms" in r else "-"
        j = f"{r['j_per_token']:.4f} | {r['watts']:.0f}" if "j_per_token" in r else "- | -"
        print(f"| {r['batch']} | {r['mode']} | {r.get('users', '-')} | {r['tok_s']:.0f} | {rel} | {j} | {r['steps']} | "
              f"{r['live_rows']:.1f} | {r['forward_ms']:.2f} | {r['host_ms']:.3f} / {r['host_cpu_ms']:.3f} | "
              f"{meter} | {r['p50_s']:.2f} | {ttft} |")


if __name__ == "__main__":
    sys.exit(main())
