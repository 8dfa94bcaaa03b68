r"""Sharding benchmark: tokens/s, power, J/token, J/response, SM % and memory % per (model, shards, engine, batch).

llmwatts rows: one ``llmwatts serve --shards N --engine E`` per (model, shards, engine) serves each
``--batches`` size in turn through gRPC: one untimed warm-up request of the same prompts and length (the
fast engine captures a batch bucket's CUDA graphs, one per attention window, on its first request of a
size), then ``--repeats`` timed ones. ``max``: the largest of ``MAX_BATCH_CANDIDATES`` that ``fits()``,
per (model, shards). Baseline rows (``--baseline``): transformers' tensor parallel (``from_pretrained(...,
tp_plan="auto")``, one process per rank with torchrun's environment), loaded once per shard count, same
prompts and sizes (not ``max``), on a checkpoint of the *same* random weights written here
(``weights.tiled_normal`` on the device) to /dev/shm when it has room, else the workdir, deleted after
the model's rows.

Energy: the sum over every GPU of NVML's cumulative counter between the start and the end of a timed
batch (llmwatts: the server's per-batch ``energy_j``; baseline: read here, read-only). W = J / s.
SM % and memory % (memory-controller busy) are the mean over GPUs of 10 Hz samples inside the batch.

Time: a configuration (a server and all its sizes; a baseline run, checkpoint write included) gets
``--row-timeout-s``, cut at ``--deadline-s``, then its processes are killed and its unfinished sizes
become error rows; one that would start after the deadline gets ``skipped: deadline`` rows. ``--json`` is
rewritten after every configuration; the table is printed whatever failed; phase timings go to stderr.

    # 4-GPU H100 node, inside a ~570 s limit
    python bench/sharding.py --models llama-7b,llama-13b,llama-65b --shards 1,2,4 --engines fast \
        --batches 1,64,max --baseline llama-7b --json OUT.json --deadline-s 540
    # CPU smoke run of every code path (gloo, tiny, both engines, the baseline): ~1.5 min on 2 cores
    python bench/sharding.py --quick

Read-only NVML only: no power limit is ever set.

Beside it: sharding_fit.py (what fits, ``max``), sharding_procs.py (process sessions, budgets),
sharding_rows.py (a row's metrics, the table), sharding_baseline.py (the transformers baseline).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from fixed_prompts import fixed_length_prompts
from sharding_baseline import baseline_rows, checkpoint, hf_worker, write_checkpoint
from sharding_fit import fits, resolve_batches
from sharding_procs import Budget, first_line, kill_group, log
from sharding_rows import batch_metrics, print_table


# -- llmwatts rows: one real sharded server per (model, shards, engine), all its batch sizes in turn ---


def llmwatts_rows(args, model: str, shards: int, engine: str, batches: list[int], texts: list[str],
                  work: Path, budget: Budget) -> dict[int, dict]:
    """Metrics (or an error) per batch size; the server is killed when the budget runs out."""
    import grpc

    from llmwatts.v1 import llmwatts_pb2 as pb
    from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

    label = f"llmwatts-{engine} {model} x{shards}"
    t_start = time.monotonic()
    d = work / f"llmwatts-{engine}-{model}-{shards}"
    d.mkdir(parents=True)
    cmd = [sys.executable, "-m", "llmwatts.cli", "serve", "--shards", str(shards), "--model", model,
           "--device", args.device, "--dtype", args.dtype, "--engine", engine, "--port", "0",
           "--port-file", str(d / "port"), "--db", str(d / "server.db"), "--telemetry-hz", "10",
           "--power-backend", "nvml-readonly" if args.device != "cpu" else "simulated",
           "--max-batch-size", str(max(batches)), "--max-new-tokens-limit", str(args.new_tokens),
           "--default-max-new-tokens", str(args.new_tokens)]
    with open(d / "log", "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    batch_ids: dict[int, list[str]] = {}  # batch size -> the server's batch ids of its timed requests
    error = None
    try:
        while not ((d / "port").exists() and (d / "port").read_text().strip()):
            if proc.poll() is not None:
                last_line = ([ln for ln in (d / "log").read_text().splitlines() if ln.strip()] or [""])[-1]
                raise RuntimeError(f"server exited ({proc.returncode}): {last_line}")
            if budget.left_s() < 0:
                raise TimeoutError(f"{budget.reason}: server not up")
            time.sleep(0.5)
        log(f"{label}: server up in {time.monotonic() - t_start:.0f} s")
        with grpc.insecure_channel(f"127.0.0.1:{int((d / 'port').read_text())}") as channel:
            stub = pb_grpc.InferenceStub(channel)

            def ask(batch: int) -> str:
                return stub.Generate(pb.GenerateRequest(
                    request_id=uuid.uuid4().hex, run_id="bench-sharding", prompts=texts[:batch],
                    max_new_tokens=args.new_tokens, sampling=pb.SamplingParams(greedy=True), ignore_eos=True),
                    timeout=max(1.0, budget.left_s())).batch_id

            for batch in batches:
                t0 = time.monotonic()
                ask(batch)  # warm-up: CUDA graphs of this bucket and every window, allocator, kernels
                t1 = time.monotonic()
                ids = [ask(batch) for _ in range(args.repeats)]
                batch_ids[batch] = ids
                log(f"{label} batch {batch}: warm-up {t1 - t0:.1f} s, {args.repeats} timed "
                    f"{time.monotonic() - t1:.1f} s")
    except grpc.RpcError as e:
        timed_out = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        error = budget.reason if timed_out else f"failed: {e.code().name} {e.details()}"
    except Exception as e:  # noqa: BLE001 - the row records it; the next configuration still runs
        error = first_line(e) if isinstance(e, TimeoutError) else f"failed: {first_line(e)}"
    finally:
        kill_group(proc, grace_s=5 if error else min(60, max(5, budget.left_s())))  # SIGTERM flushes telemetry
    if error:
        log(f"{label}: {error}; server log tail:\n{(d / 'log').read_text()[-3000:]}")
    rows = {}
    for batch in batches:
        try:
            rows[batch] = batch_metrics(d / "server.db", batch_ids[batch], batch) if batch in batch_ids \
                else {"error": error or "failed: no result"}
        except Exception as e:  # noqa: BLE001
            rows[batch] = {"error": f"failed: reading the server DB: {first_line(e)}"}
    return rows


def parse_batches(text: str) -> list[str]:
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    if not tokens or any(t != "max" and not (t.isdigit() and int(t) > 0) for t in tokens):
        raise SystemExit(f"--batches {text!r}: use positive integers and 'max', comma-separated")
    return tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama-7b,llama-13b,llama-65b")
    p.add_argument("--shards", default="1,2,4", help="shard counts to run (each needs that many GPUs)")
    p.add_argument("--engines", default="fast", help="llmwatts engines, comma-separated: fast, eager")
    p.add_argument("--batches", "--batch", dest="batches", default="64",
                   help="batch sizes, comma-separated, in order; 'max': the largest of 96..512 that fits")
    p.add_argument("--baseline", default="", help="models to also run with transformers' tp_plan='auto' ('all')")
    p.add_argument("--no-llmwatts", action="store_true", help="run only the transformers baseline rows")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1, help="timed requests per batch size")
    p.add_argument("--row-timeout-s", type=float, default=300,
                   help="per configuration (a server with all its batches; a baseline run): killed past it")
    p.add_argument("--deadline-s", type=float, help="wall-clock budget of the whole script; later configurations "
                   "are skipped and running ones cut at it")
    p.add_argument("--workdir", type=Path, help="where server DBs (and checkpoints without /dev/shm room) go")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: tiny, shards 1,2, batches 1,2, fast and eager, baseline, 4 tokens")
    p.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--write-checkpoint", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    t_start = time.monotonic()
    if args.quick:
        args.models, args.shards, args.baseline, args.device, args.dtype = "tiny", "1,2", "all", "cpu", "float32"
        args.batches, args.engines, args.prompt_tokens, args.new_tokens = "1,2", "fast,eager", 8, 4
    if args.hf_worker:
        return hf_worker(args)
    if args.write_checkpoint:
        write_checkpoint(args.models, args.write_checkpoint, args.device, args.dtype)
        return 0

    import torch

    from llmwatts.server.tokenizer import llama_like_tokenizer

    models_ = args.models.split(",")
    baseline = models_ if args.baseline == "all" else [m for m in args.baseline.split(",") if m]
    engines = [] if args.no_llmwatts else [e for e in args.engines.split(",") if e]
    tokens = parse_batches(args.batches)
    cuda = args.device != "cpu"
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else 1 << 50
    n_gpus = torch.cuda.device_count() if cuda else 1 << 10
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    seq_tokens = args.prompt_tokens + args.new_tokens
    deadline = t_start + args.deadline_s if args.deadline_s is not None else float("inf")

    # The plan: models outer, then shards, then the llmwatts engines, then the baseline of that (model, shards).
    plan: list[tuple[str, int, str, list[int]]] = []
    for model in models_:
        for shards in map(int, args.shards.split(",")):
            if shards > n_gpus:
                log(f"{model} x{shards}: skipped, {n_gpus} GPUs")
                continue
            llmwatts_batches = resolve_batches(tokens, model, shards, seq_tokens, gpu_bytes)
            plan += [(model, shards, f"llmwatts-{e}", llmwatts_batches) for e in engines]
            if model in baseline:
                plan.append((model, shards, "transformers-tp", [int(t) for t in tokens if t != "max"]))
    max_batch = max((b for *_, batches in plan for b in batches), default=1)
    t0 = time.monotonic()
    texts, _ = fixed_length_prompts(llama_like_tokenizer(), args.prompt_tokens, max_batch)
    log(f"{max_batch} prompts of {args.prompt_tokens} tokens built in {time.monotonic() - t0:.1f} s")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-sharding-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    checkpoints: dict[str, Path] = {}
    try:
        for i, (model, shards, system, batches) in enumerate(plan):
            base = {"model": model, "shards": shards, "system": system}
            fitting = [b for b in batches if fits(model, shards, b, seq_tokens, gpu_bytes)]
            results = {b: {"error": "does not fit"} for b in batches if b not in fitting}
            t_cfg = time.monotonic()
            budget = Budget(t_cfg + args.row_timeout_s, f"timeout after {args.row_timeout_s:.0f} s") \
                if t_cfg + args.row_timeout_s < deadline else Budget(deadline, "timeout: deadline")
            if fitting and budget.left_s() <= 0:
                results.update({b: {"error": "skipped: deadline"} for b in fitting})
            elif fitting:
                try:
                    if system.startswith("llmwatts-"):
                        results.update(llmwatts_rows(args, model, shards, system.removeprefix("llmwatts-"),
                                                     fitting, texts, work, budget))
                    else:
                        if model not in checkpoints:
                            checkpoints[model] = checkpoint(args, model, work, budget)
                        results.update(baseline_rows(args, model, shards, fitting, checkpoints[model], budget))
                except Exception as e:  # noqa: BLE001 - one broken configuration must not cost the others
                    error = first_line(e) if isinstance(e, TimeoutError) else f"failed: {first_line(e)}"
                    log(f"{system} {model} x{shards}: {error}")
                    results.update({b: {"error": error} for b in fitting if b not in results})
            rows += [dict(base, batch=b, **results[b]) for b in batches]
            log(f"{system} {model} x{shards}: {time.monotonic() - t_cfg:.0f} s "
                f"(script {time.monotonic() - t_start:.0f} s) {json.dumps(rows[-len(batches):])}")
            if args.json:  # after every configuration: a run cut off by a time limit keeps what it measured
                args.json.write_text(json.dumps(rows, indent=1))
            if model in checkpoints and all(m != model for m, *_ in plan[i + 1:]):
                shutil.rmtree(checkpoints.pop(model), ignore_errors=True)  # after the model's rows (65b: ~130 GB)
    finally:
        for ckpt in checkpoints.values():
            shutil.rmtree(ckpt, ignore_errors=True)
        print_table(rows, args, device_name)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    log(f"done in {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
