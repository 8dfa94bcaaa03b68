"""Sharding benchmark: tokens/s, power, J/token, J/response, SM % and memory % per (model, shard count).

Rows: llmwatts (``llmwatts serve --shards N``: FairScale tensor parallel, eager engine in lockstep, one
batch of ``--batch`` fixed-length prompts through gRPC), and optionally the baseline, transformers' own
tensor parallel (``from_pretrained(..., tp_plan="auto")`` under ``torchrun``) on the same prompts, batch
and shard count. The baseline needs a checkpoint: this script writes one with the *same* random weights
as the llmwatts preset (``weights.tiled_normal`` tensor by tensor, straight into safetensors files, never
the whole model in memory), then deletes it.

Energy: the sum over every GPU of NVML's cumulative counter between the start and the end of the timed
batch (llmwatts: the server's per-batch ``energy_j``; baseline: read here, read-only). W = J / s.
SM % and memory % (memory-controller busy) are the mean over GPUs of 10 Hz samples inside the batch.

    # on a 4-GPU H100 node (~15-20 min with the baseline for 7b/13b; 65b adds a ~130 GB checkpoint)
    python bench/sharding.py --models llama-7b,llama-13b,llama-65b --shards 1,2,4 --baseline llama-7b,llama-13b
    # CPU smoke run of every code path (gloo, tiny): ~2 min
    python bench/sharding.py --quick

Read-only NVML only: no power limit is ever set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

GIB = 1024**3


# ---------------------------------------------------------------------------------------------------
# Prompts: exactly --prompt-tokens ids with the server's tokenizer
# ---------------------------------------------------------------------------------------------------


def fixed_length_prompts(n_tokens: int, count: int) -> tuple[list[str], list[list[int]]]:
    """``count`` distinct texts that the preset tokenizer turns into exactly ``n_tokens`` ids (BOS included)."""
    from llmwatts.server.tokenizer import llama_like_tokenizer

    tok = llama_like_tokenizer()
    words = "energy power token model batch server latency watt joule cache graph decode prefill".split()
    texts, ids = [], []
    for i in range(count):
        text, k = f"{i}", i
        while len(tok(text)["input_ids"]) < n_tokens:
            k = k * 7 + 3
            candidate = f"{text} {words[k % len(words)]}"
            text = candidate if len(tok(candidate)["input_ids"]) <= n_tokens else f"{text} a"
        if len(tok(text)["input_ids"]) != n_tokens:  # " a" overshot by a merge: trim words off the end
            raise RuntimeError(f"could not build a prompt of exactly {n_tokens} tokens")
        texts.append(text)
        ids.append(tok(text)["input_ids"])
    return texts, ids


# ---------------------------------------------------------------------------------------------------
# Fit: skip configurations that cannot fit (weights + KV cache per GPU)
# ---------------------------------------------------------------------------------------------------


def fits(model: str, shards: int, batch: int, seq_tokens: int, gpu_bytes: int) -> bool:
    from llmwatts.server.models import PRESETS

    p = PRESETS[model]
    h, layers = p["hidden_size"], p["num_hidden_layers"]
    weights = 2 * (layers * (4 * h * h + 3 * h * p["intermediate_size"]) + 2 * 32000 * h)  # fp16
    kv = 2 * 2 * layers * h * batch * seq_tokens
    return (weights + kv) / shards < 0.9 * gpu_bytes


# ---------------------------------------------------------------------------------------------------
# llmwatts rows: a real sharded server per configuration
# ---------------------------------------------------------------------------------------------------


def llmwatts_row(args, model: str, shards: int, texts: list[str], work: Path) -> dict:
    import grpc

    from llmwatts.v1 import llmwatts_pb2 as pb
    from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

    d = work / f"llmwatts-{model}-{shards}"
    d.mkdir(parents=True)
    cmd = [sys.executable, "-m", "llmwatts.cli", "serve", "--shards", str(shards), "--model", model,
           "--device", args.device, "--dtype", args.dtype, "--engine", "eager", "--port", "0",
           "--port-file", str(d / "port"), "--db", str(d / "server.db"), "--telemetry-hz", "10",
           "--power-backend", "nvml-readonly" if args.device != "cpu" else "simulated",
           "--max-batch-size", str(args.batch), "--max-new-tokens-limit", str(args.new_tokens),
           "--default-max-new-tokens", str(args.new_tokens)]
    with open(d / "log", "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + args.start_timeout_s
        while not ((d / "port").exists() and (d / "port").read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{(d / 'log').read_text()[-3000:]}")
            time.sleep(0.5)
        target = f"127.0.0.1:{int((d / 'port').read_text())}"
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.InferenceStub(channel)

            def ask(new_tokens: int) -> pb.GenerateResponse:
                return stub.Generate(pb.GenerateRequest(
                    request_id=uuid.uuid4().hex, run_id="bench-sharding", prompts=texts, max_new_tokens=new_tokens,
                    sampling=pb.SamplingParams(greedy=True), ignore_eos=True), timeout=3600)

            ask(min(8, args.new_tokens))  # warm-up: allocator, kernels, first-batch effects
            batch_ids = [ask(args.new_tokens).batch_id for _ in range(args.repeats)]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return batch_metrics(d / "server.db", batch_ids, args.batch)


def batch_metrics(db: Path, batch_ids: list[str], batch: int) -> dict:
    """Mean over the timed batches of the server DB's rows."""
    rows = []
    with sqlite3.connect(db) as conn:
        n_gpus = conn.execute("select count(*) from gpus").fetchone()[0]
        for b in batch_ids:
            start, end, out_tok, energy_j = conn.execute(
                "select start_ns, end_ns, output_tokens, energy_j from batches where batch_id = ?", [b]).fetchone()
            sm, mem = conn.execute("select avg(sm_pct), avg(mem_pct) from telemetry where ts_ns between ? and ?",
                                   [start, end]).fetchone()
            rows.append(metrics((end - start) / 1e9, out_tok, energy_j, batch, sm, mem))
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    out["gpus"] = n_gpus
    return out


def metrics(seconds: float, out_tokens: int, energy_j: float, batch: int, sm_pct, mem_pct) -> dict:
    return {"seconds": seconds, "tok_s": out_tokens / seconds, "watts": energy_j / seconds,
            "j_per_token": energy_j / out_tokens, "j_per_response": energy_j / batch,
            "sm_pct": sm_pct if sm_pct is not None else float("nan"),
            "mem_pct": mem_pct if mem_pct is not None else float("nan")}


# ---------------------------------------------------------------------------------------------------
# Baseline: transformers' tensor parallel under torchrun, on a checkpoint of the same random weights
# ---------------------------------------------------------------------------------------------------


def write_checkpoint(model: str, out: Path, device: str, dtype: str, seed: int = 0) -> None:
    """The preset's random weights as a safetensors checkpoint, one file per layer (bounded memory)."""
    import torch
    from safetensors.torch import save_file

    from llmwatts.server import models, weights
    from llmwatts.server.tokenizer import llama_like_tokenizer

    config = models.preset_config(model)
    dev = models.resolve_device(device)
    torch_dtype = models.resolve_dtype(dtype, dev)
    meta = models.meta_model(config, torch_dtype)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[tuple[str, tuple]]] = {}
    for name, p in meta.named_parameters():
        part = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(part, []).append((name, tuple(p.shape)))
    weight_map = {}
    for part, params in groups.items():
        tensors = {}
        for name, shape in params:
            if name.endswith("norm.weight"):
                value = torch.ones(shape, dtype=torch_dtype)
            else:
                value = weights.tiled_normal(name, shape, seed=seed, std=0.02, device=dev, dtype=torch_dtype)
            tensors[name] = value.cpu().contiguous()
        file = f"model-{part}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.torch_dtype = torch_dtype
    config.save_pretrained(out)
    llama_like_tokenizer().save_pretrained(out)


def hf_worker(args) -> int:
    """One torchrun rank of the baseline; rank 0 measures and prints one JSON line."""
    import threading

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from llmwatts.server.gpu import open_gpus
    from llmwatts.server.telemetry import sample_row

    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    cuda = args.device != "cpu" and torch.cuda.is_available()
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo")
    dtype = {"float16": torch.float16, "fp16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "auto": torch.float16 if cuda else torch.float32}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, tp_plan="auto").eval()
    _, ids = fixed_length_prompts(args.prompt_tokens, args.batch)
    input_ids = torch.tensor(ids, device=model.device)  # [B, S], all the same length: no padding
    gpus = open_gpus("nvml-readonly", node=socket.gethostname(), device_indices=list(range(world))) \
        if cuda and rank == 0 else []

    def run(new_tokens: int) -> None:
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    run(min(8, args.new_tokens))
    results = []
    for _ in range(args.repeats):
        samples, stop = [], threading.Event()

        def sampler():
            while not stop.wait(0.1):
                samples.extend(sample_row(g, g.sample()) for g in gpus)

        thread = threading.Thread(target=sampler, daemon=True)
        e0 = sum(g.energy_mj() for g in gpus)
        t0 = time.perf_counter()
        thread.start()
        run(args.new_tokens)
        seconds = time.perf_counter() - t0
        stop.set()
        thread.join()
        energy_j = (sum(g.energy_mj() for g in gpus) - e0) / 1000.0
        sm = sum(s["sm_pct"] for s in samples) / len(samples) if samples else None
        mem = sum(s["mem_pct"] for s in samples) / len(samples) if samples else None
        results.append(metrics(seconds, args.batch * args.new_tokens, energy_j, args.batch, sm, mem))
    if rank == 0:
        row = {k: sum(r[k] for r in results) / len(results) for k in results[0]}
        row["gpus"] = world
        print("HF_ROW " + json.dumps(row), flush=True)
    dist.destroy_process_group()
    return 0


def baseline_row(args, model: str, shards: int, work: Path) -> dict:
    ckpt = work / f"ckpt-{model}"
    if not ckpt.exists():
        subprocess.run([sys.executable, __file__, "--write-checkpoint", str(ckpt), "--models", model,
                        "--device", args.device, "--dtype", args.dtype], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--nproc-per-node", str(shards), "--master-addr", "127.0.0.1", "--master-port", str(port),
           __file__, "--hf-worker", "--checkpoint", str(ckpt), "--device", args.device, "--dtype", args.dtype,
           "--batch", str(args.batch), "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("HF_ROW "):
            return json.loads(line.removeprefix("HF_ROW "))
    raise RuntimeError(f"transformers TP run failed ({done.returncode}):\n{done.stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def print_table(rows: list[dict], args) -> None:
    print(f"\nbatch {args.batch}, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens (fixed), "
          f"{args.dtype}, greedy, mean of {args.repeats}\n")
    print("| system | model | shards | tok/s | W (sum) | J/token | J/response | SM % | mem % | s/batch |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['system']} | {r['model']} | {r['shards']} | {r['error']} | | | | | | |")
            continue
        print(f"| {r['system']} | {r['model']} | {r['shards']} | {r['tok_s']:.1f} | {r['watts']:.0f} | "
              f"{r['j_per_token']:.3f} | {r['j_per_response']:.1f} | {r['sm_pct']:.0f} | {r['mem_pct']:.0f} | "
              f"{r['seconds']:.2f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama-7b,llama-13b,llama-65b")
    p.add_argument("--shards", default="1,2,4", help="shard counts to run (each needs that many GPUs)")
    p.add_argument("--baseline", default="", help="models to also run with transformers' tp_plan='auto' ('all')")
    p.add_argument("--no-llmwatts", action="store_true", help="run only the transformers baseline rows")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--start-timeout-s", type=float, default=900)
    p.add_argument("--workdir", type=Path, help="where checkpoints and server DBs go (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: tiny, shards 1,2, batch 2, 4 tokens")
    p.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--write-checkpoint", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.shards, args.baseline, args.device, args.dtype = "tiny", "1,2", "all", "cpu", "float32"
        args.batch, args.prompt_tokens, args.new_tokens = 2, 8, 4
    if args.hf_worker:
        return hf_worker(args)
    if args.write_checkpoint:
        write_checkpoint(args.models, args.write_checkpoint, args.device, args.dtype)
        return 0

    import torch

    models_ = args.models.split(",")
    baseline = models_ if args.baseline == "all" else [m for m in args.baseline.split(",") if m]
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if args.device != "cpu" else 1 << 50
    n_gpus = torch.cuda.device_count() if args.device != "cpu" else 1 << 10
    texts, _ = fixed_length_prompts(args.prompt_tokens, args.batch)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-sharding-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in models_:
        for shards in map(int, args.shards.split(",")):
            base = {"model": model, "shards": shards}
            if shards > n_gpus:
                continue
            if not fits(model, shards, args.batch, args.prompt_tokens + args.new_tokens, gpu_bytes):
                rows.append(dict(base, system="llmwatts", error="does not fit"))
                continue
            systems = (() if args.no_llmwatts else ("llmwatts",)) + (("transformers-tp",) if model in baseline else ())
            for system in systems:
                t0 = time.monotonic()
                try:
                    row = llmwatts_row(args, model, shards, texts, work) if system == "llmwatts" \
                        else baseline_row(args, model, shards, work)
                except Exception as e:  # one broken configuration must not cost the others
                    row = {"error": f"failed: {str(e).splitlines()[0][:80]}"}
                    print(f"{system} {model} x{shards} failed: {e}", file=sys.stderr)
                rows.append(dict(base, system=system, **row))
                print(f"# {system} {model} x{shards}: {time.monotonic() - t0:.0f} s {json.dumps(rows[-1])}",
                      file=sys.stderr, flush=True)
                if args.json:  # after every row: a run cut off by a time limit keeps what it measured
                    args.json.write_text(json.dumps(rows, indent=1))
        shutil.rmtree(work / f"ckpt-{model}", ignore_errors=True)  # 65b: ~130 GB
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
