"""Does continuous batching pay? The same requests through static batches and through continuous batching.

Workload: Alpaca requests as the load generator renders them, each asking for as many new tokens as its
reference response has (tokenized, +1 for EOS, capped at ``--max-new-tokens``), fixed-length
(``ignore_eos``): the random-weight presets never stop on EOS, so the reference lengths stand in for a
trained model's (as in ``bench/batch_waste.py``). Greedy decoding.

Two parts, each with its baseline in the same run:

- ``engine``, in-process and offline (every request queued at t0): static batches of ``B`` requests in
  arrival order (``FastEngine.generate``: a batch decodes until its longest response ends) against a
  ``ContinuousSession`` of ``B`` rows that waiting requests join as soon as a row frees (``continuous``) or
  once ``N`` rows are free, several in one prefill (``continuous-joinN``, ``--join-rows``). Latency is each
  request's completion time from t0.
- ``server``, closed loop: ``B`` client threads (``B + --extra-users``), each sending its next request
  when the last is answered, against ``llmwatts serve --merge-requests`` (concurrent requests merged into one batch,
  ``batch_wait_ms`` 50) and against ``--continuous`` (its default join rounds), same model and engine; the
  clients run in a process of their own. ``--server-modes``: ``continuous-captured`` (the default)
  captures every decode graph of the server's session first (``ContinuousSession.capture_steps``, as
  ``serve --warmup --continuous-slots`` does); ``continuous`` captures them as they are met, in the
  untimed run or, for the ones it did not meet, in the timed one. Latency is per request at the
  client; ``after last token`` is the client's receipt minus the server's last-token stamp (the energy
  read and the response path; with ``--continuous`` the wait for the meter thread's read).

Energy is the NVML counter over each whole region (read-only NVML); the server rows also give the
requests' attributed joules as a share of it. The engine rows' "joins of N ms" is the wall time of
``admit``: the prefill and the wait for the decode step in flight (up to one step). ``--join-tokens``
runs every continuous mode once per value: joins of up to that many padded tokens run from static
buffers, replayed as captured graphs on CUDA (the default, ``JOIN_GRAPH_TOKENS``), or ``0``: every join
runs the eager prefill, its kernels launched one by one (as before 2026-11-28's graphed joins). Each
mode runs the workload once untimed first (compiles and the graph captures of every batch bucket,
attention window and row prefix it meets); a row's notes count the graphs captured in its timed run
anyway (a closed loop's batches differ from run to run), and the continuous batcher's own account of
its time (``LoopStats``: steps, the host's time between them, live rows, joins).

    python bench/continuous.py --data-dir DIR            # llama-7b on cuda, B = 64 and 256 (~9 min on an H200)
    python bench/continuous.py --quick --data-dir DIR     # tiny on cpu: proves the script runs
"""

import argparse
import concurrent.futures
import dataclasses
import json
import queue
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from engine_timing import sync
from inprocess_server import alpaca_file, load_once, server_config
from nvml_energy import EnergyCounter

from llmwatts.loadgen.prompts import _read_records, alpaca_prompt
from llmwatts.server.continuous import LoopStats
from llmwatts.server.engine import JOIN_GRAPH_TOKENS, BatchSpec, Sampling

GREEDY = Sampling(greedy=True)
# The merge baseline waits this long for company: 64 clients' next requests arrive within a few ms of the
# batch's answers, and the server's default 5 ms split them into several batches.
MERGE_WAIT_MS = 50.0
PARTS = ("engine", "server")


@dataclass
class Request:
    text: str
    ids: list[int]
    new: int


def workload(path: Path, tokenizer, count: int, max_new: int) -> list[Request]:
    """The first ``count`` Alpaca records: prompt as loadgen renders it, reference length as max_new_tokens."""
    records = _read_records(path)[:count]
    if len(records) < count:
        raise ValueError(f"{path} has {len(records)} records; --requests asks for {count}")
    texts = [alpaca_prompt(r["instruction"], r.get("input", "")) for r in records]
    ids = tokenizer(texts)["input_ids"]
    outs = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"]
    return [Request(t, i, min(len(o) + 1, max_new)) for t, i, o in zip(texts, ids, outs)]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def engine_static(engine, reqs: list[Request], b: int) -> dict:
    t0, latencies, steps = time.time_ns(), [], 0
    for i in range(0, len(reqs), b):
        chunk = reqs[i:i + b]
        out = engine.generate(BatchSpec([r.ids for r in chunk], [r.new for r in chunk], GREEDY, ignore_eos=True))
        assert [len(t) for t in out.tokens] == [r.new for r in chunk]
        latencies += [(d - t0) / 1e9 for d in out.done_ns]
        steps += max(r.new for r in chunk)
    return {"latencies": latencies, "steps": steps}


def engine_continuous(engine, reqs: list[Request], b: int, join_rows: int = 1) -> dict:
    """As the server's continuous batcher admits: first come, first served, every request that fits in
    one prefill, once ``join_rows`` rows are free (or the session is empty)."""
    session = engine.session(b, max(len(r.ids) + r.new for r in reqs), GREEDY, ignore_eos=True,
                             prefill_width=max(len(r.ids) for r in reqs))
    t0, latencies, occupancy, prefills, admit_s = time.time_ns(), [], [], 0, 0.0
    waiting = [(k, BatchSpec([r.ids], [r.new], GREEDY, ignore_eos=True)) for k, r in enumerate(reqs)]
    while waiting or session.busy:
        if not session.live_rows or session.free_rows >= join_rows:
            joins = {}
            while waiting and session.can_admit([*joins.values(), waiting[0][1]]):
                k, spec = waiting.pop(0)
                joins[k] = spec
            if joins:
                a0 = time.perf_counter()
                # (it returns the first tokens, so it waits for the GPU: for the step in flight too)
                session.admit(joins)
                admit_s += time.perf_counter() - a0
                prefills += 1
        occupancy.append(session.live_rows)
        session.step()
        for k in [k for k in session.trackers if session.done(k)]:
            out = session.pop(k)
            assert len(out.tokens[0]) == reqs[k].new
            latencies.append((out.done_ns[0] - t0) / 1e9)
    return {"latencies": latencies, "steps": session.steps, "mean_live_rows": statistics.mean(occupancy),
            "prefills": prefills, "prefill_ms": 1000 * admit_s / max(prefills, 1),
            "decode_ms": 1000 * ((time.time_ns() - t0) / 1e9 - admit_s) / max(session.steps, 1)}


def closed_loop(port: int, reqs: list[Request], users: int) -> dict:
    import grpc

    from llmwatts.v1 import llmwatts_pb2 as pb
    from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

    todo: queue.Queue = queue.Queue()
    for r in reqs:
        todo.put(r)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = pb_grpc.InferenceStub(channel)
    latencies, after_last, energy = [], [], []

    def user() -> None:
        while True:
            try:
                r = todo.get_nowait()
            except queue.Empty:
                return
            t0 = time.perf_counter()
            resp = stub.Generate(pb.GenerateRequest(
                request_id=uuid.uuid4().hex, run_id="bench", prompts=[r.text], max_new_tokens=r.new,
                sampling=pb.SamplingParams(greedy=True), ignore_eos=True), timeout=900)
            got_ns = time.time_ns()
            latencies.append(time.perf_counter() - t0)
            after_last.append((got_ns - resp.times.done_ns) / 1e6)
            energy.append(resp.energy_j)
            assert resp.completions[0].output_tokens == r.new

    with concurrent.futures.ThreadPoolExecutor(users) as pool:
        for f in [pool.submit(user) for _ in range(users)]:
            f.result()
    channel.close()
    return {"latencies": latencies, "after_last_ms": statistics.mean(after_last), "attributed_j": sum(energy)}


def measure(fn, counter: EnergyCounter, device: torch.device, tokens: int) -> dict:
    sync(device)
    e0, t0 = counter.energy_mj(), time.perf_counter()
    row = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    e1 = counter.energy_mj()
    lat = row.pop("latencies")
    row.update(seconds=seconds, tok_s=tokens / seconds, p50_s=pct(lat, 0.5), p95_s=pct(lat, 0.95))
    if e0 is not None:
        joules = (e1 - e0) / 1000.0
        row.update(j_per_token=joules / tokens, watts=joules / seconds, counter_j=joules)
        if "attributed_j" in row:
            row["attributed_share"] = row["attributed_j"] / joules
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="64,256", help="rows (engine) and client threads (server)")
    ap.add_argument("--requests", type=int, default=0, help="requests per batch size (default: max(512, 4 B))")
    ap.add_argument("--join-rows", default="1,8", help="engine part: continuous rows once this many rows are free, "
                                                      "each (capped at B / 2)")
    ap.add_argument("--join-tokens", default=str(JOIN_GRAPH_TOKENS),
                    help="continuous rows: each mode once per value (joins of up to that many padded tokens "
                         "replay captured graphs on CUDA; 0: every join runs the eager prefill)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    ap.add_argument("--server-modes", default="merge,continuous-captured",
                    help="server part: subset of merge,continuous,continuous-captured (continuous after "
                         "ContinuousSession.capture_steps: every decode graph captured first, as serve --warmup "
                         "--continuous-slots does)")
    ap.add_argument("--extra-users", type=int, default=0,
                    help="server part: B + this many client threads against B rows (default 0), so a row that "
                         "frees finds a request waiting, as the offline engine's queue always has one")
    ap.add_argument("--data-dir", help="folder with alpaca_5k.jsonl (default: llmwatts' data folders)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="tiny on cpu, 2 and 4 rows, 12 requests")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.device, args.batches, args.requests, args.max_new_tokens = "tiny", "cpu", "2,4", 12, 12
    parts = [p for p in args.parts.split(",") if p]
    try:
        join_tokens = [int(x) for x in args.join_tokens.split(",") if x]
    except ValueError:
        ap.error(f"--join-tokens takes integers, got {args.join_tokens!r}")
    if not join_tokens or min(join_tokens) < 0:
        ap.error(f"--join-tokens takes integers >= 0, got {args.join_tokens!r}")
    if args.extra_users < 0:
        ap.error(f"--extra-users must be 0 or more, got {args.extra_users}")
    if set(parts) - set(PARTS):
        ap.error(f"unknown parts {sorted(set(parts) - set(PARTS))}: use {','.join(PARTS)}")
    path = alpaca_file(args.data_dir)
    if path is None:
        return 2

    from llmwatts.server.config import ServerConfig
    from llmwatts.server.host import Host
    from llmwatts.server.service import create_server

    device = torch.device(args.device)
    counter = EnergyCounter(device)
    db_dir = Path(tempfile.mkdtemp())

    def config(name: str, b: int, **kw) -> ServerConfig:
        return server_config(args, device, db_dir, name, max_batch_size=b, queue_size=b + 8 + args.extra_users, **kw)

    t_load = time.perf_counter()
    loaded, engine = load_once(config("load", 1))
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": getattr(counter, "name", "cpu"),
               "model": args.model, "torch": torch.__version__, "data": str(path), "rows": []}

    def note(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
        if args.json:  # after every row, so a run cut short still leaves its numbers
            args.json.write_text(json.dumps(results, indent=2, default=str))

    note(f"{args.model} loaded in {time.perf_counter() - t_load:.1f} s on {results['device']}")
    # The clients run in a process of their own: their threads do not compete with the server's batcher
    # thread for this process's interpreter lock. Started once; the warm-up run pays for its imports.
    import multiprocessing

    clients = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    for b in [int(x) for x in args.batches.split(",") if x]:
        reqs = workload(path, loaded.tokenizer, args.requests or max(512, 4 * b), args.max_new_tokens)
        tokens = sum(r.new for r in reqs)
        slots = max(len(r.ids) + r.new for r in reqs)
        common = {"batch": b, "requests": len(reqs), "tokens": tokens, "mean_new": tokens / len(reqs)}

        def add(part: str, mode: str, fn, timed=None) -> None:
            try:
                t0 = time.perf_counter()
                fn()  # untimed: compiles, and the graphs (bucket, window, row prefix) this run meets
                note(f"{part} {mode} b={b}: warm-up {time.perf_counter() - t0:.1f} s")
                if timed is not None:
                    timed()
                graphs, graph_s = engine.captures, engine.capture_s
                row = {"part": part, "mode": mode, **common, **measure(fn, counter, device, tokens),
                       "captures": engine.captures - graphs, "capture_s": engine.capture_s - graph_s}
            except Exception as e:  # one failing row must not lose the rest of a paid GPU run
                row = {"part": part, "mode": mode, **common, "error": f"{type(e).__name__}: {e}"[:200]}
                if device.type == "cuda":
                    engine.release()
            results["rows"].append(row)
            note(f"{part} {mode} b={b}: " + (row.get("error") or f"{row['tok_s']:.1f} tok/s, "
                 f"{row.get('j_per_token', float('nan')):.4f} J/tok, p50 {row['p50_s']:.2f} s"))

        if "engine" in parts:
            add("engine", "static", lambda: engine_static(engine, reqs, b))
            for j in sorted({min(int(x), max(1, b // 2)) for x in args.join_rows.split(",") if x}):
                for w in join_tokens:
                    engine.join_tokens = w
                    add("engine", ("continuous" if j == 1 else f"continuous-join{j}") + join_note(w),
                        lambda j=j: engine_continuous(engine, reqs, b, j))
        if "server" in parts:
            modes = [("merge", dict(merge_requests=True, batch_wait_ms=MERGE_WAIT_MS), JOIN_GRAPH_TOKENS)]
            modes += [(m, dict(continuous=True, continuous_slots=slots), w)
                      for m in ("continuous", "continuous-captured") for w in join_tokens]
            for mode, kw, w in (m for m in modes if m[0] in args.server_modes.split(",")):
                engine.join_tokens = w
                if mode == "continuous-captured":  # every decode graph of the server's session, before it opens
                    t0 = time.perf_counter()
                    try:
                        n = engine.session(b, slots, GREEDY, ignore_eos=True).capture_steps()
                        note(f"server {mode} b={b}: captured {n} more decode graphs in "
                             f"{time.perf_counter() - t0:.1f} s")
                    except Exception as e:  # (the row still runs, and counts what it captures)
                        note(f"server {mode} b={b}: capture_steps failed: {type(e).__name__}: {e}"[:300])
                mode += join_note(w) if mode.startswith("continuous") else ""
                name = f"{mode.split()[0]}-{w}-{b}"
                srv, port = create_server(config(name, b, **kw), host=Host(config(name, b, **kw), loaded=loaded,
                                                                          engine=engine))
                srv.start()
                batcher = srv.host.batcher

                def reset_stats() -> None:
                    batcher.stats = LoopStats()

                try:
                    add("server", mode, lambda: clients.submit(closed_loop, port, reqs, b + args.extra_users).result(),
                        timed=reset_stats if mode.startswith("continuous") else None)
                    srv.host.store.flush()
                    sizes = [r[0] for r in srv.host.store.db.execute("select n_sequences from batches").fetchall()]
                    if mode == "merge" and sizes and "error" not in results["rows"][-1]:
                        results["rows"][-1]["mean_batch"] = statistics.mean(sizes)
                    results["rows"][-1]["users"] = b + args.extra_users
                    if mode.startswith("continuous"):
                        results["rows"][-1]["join_rows"] = batcher.join_rows
                        results["rows"][-1]["loop"] = dataclasses.asdict(batcher.stats)
                finally:
                    srv.stop(1)
        engine.release()
    clients.shutdown()

    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def join_note(tokens: int) -> str:
    return "" if tokens == JOIN_GRAPH_TOKENS else " (eager joins)" if tokens == 0 else f" (graphed joins <= {tokens})"


def print_report(results: dict) -> None:
    print(f"\n# {results['model']} on {results['device']}, Alpaca requests with their reference lengths, greedy; "
          f"torch {results['torch']}; {results['date']}\n")
    print("| part | B | mode | requests | mean new tokens | tok/s | J/token | W | p50 s | p95 s | decode steps | "
          "vs static/merge | notes |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    rows = results["rows"]
    base = {(r["part"], r["batch"]): r for r in rows if r["mode"] in ("static", "merge") and "tok_s" in r}
    for r in rows:
        if "error" in r:
            print(f"| {r['part']} | {r['batch']} | {r['mode']} | {r['requests']} | | {r['error']} | | | | | | | |")
            continue
        b = base.get((r["part"], r["batch"]))
        rel = f"{r['tok_s'] / b['tok_s']:.2f}x tok/s" if b else ""
        if b and "j_per_token" in r and "j_per_token" in b:
            rel += f", {100 * (r['j_per_token'] / b['j_per_token'] - 1):+.1f}% J/tok"
        notes = []
        if "mean_live_rows" in r:
            notes.append(f"{r['mean_live_rows']:.1f} live rows a step; {r['prefills']} joins of "
                         f"{r['prefill_ms']:.1f} ms; {r['decode_ms']:.2f} ms a decode step")
        if "mean_batch" in r:
            notes.append(f"mean batch {r['mean_batch']:.1f}")
        if r.get("users", r["batch"]) != r["batch"]:
            notes.append(f"{r['users']} client threads")
        if "join_rows" in r:
            notes.append(f"joins once {r['join_rows']} rows are free")
        if "loop" in r:
            notes.append(f"batcher: {LoopStats(**r['loop']).summary()}")
        if r.get("captures"):
            notes.append(f"{r['captures']} graphs captured in the timed run ({r['capture_s']:.1f} s)")
        if "after_last_ms" in r:
            notes.append(f"after last token {r['after_last_ms']:.1f} ms")
        if "attributed_share" in r:
            notes.append(f"attributed {100 * r['attributed_share']:.1f}% of the counter's J")
        j = f"{r['j_per_token']:.4f}" if "j_per_token" in r else "-"
        w = f"{r['watts']:.0f}" if "watts" in r else "-"
        print(f"| {r['part']} | {r['batch']} | {r['mode']} | {r['requests']} | {r['mean_new']:.1f} | "
              f"{r['tok_s']:.1f} | {j} | {w} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r.get('steps', '')} | {rel} | "
              f"{'; '.join(notes)} |")


if __name__ == "__main__":
    sys.exit(main())
