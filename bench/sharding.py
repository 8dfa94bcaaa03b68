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
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fixed_prompts import fixed_length_prompts

GIB = 1024**3
# What ``max`` in --batches may resolve to: the fast engine's batch buckets above 64.
MAX_BATCH_CANDIDATES = (96, 128, 160, 192, 256, 320, 384, 512)
# fits() rounds prompt + new tokens up to this many KV-cache slots.
KV_SLOT_ROUNDING = 128


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


# -- Fit: skip configurations that cannot fit (weights + KV cache per GPU); resolve ``max`` --------


def preset_shape(model: str) -> tuple[int, int, int]:
    """(parameters (untied embeddings), layers, K/V width) of a preset, from its config alone."""
    from llmwatts.server.models import preset_config

    c = preset_config(model)
    h, kv_dim = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * c.intermediate_size + 2 * h  # q,o; k,v; MLP; norms
    return c.num_hidden_layers * per_layer + 2 * c.vocab_size * h + h, c.num_hidden_layers, kv_dim


def fits(model: str, shards: int, batch: int, seq_tokens: int, gpu_bytes: int) -> bool:
    """fp16 weights + KV cache (``seq_tokens`` rounded up to ``KV_SLOT_ROUNDING``), both split over the
    shards (tensor parallel splits the heads), under 0.9 × ``gpu_bytes`` per GPU."""
    n_params, n_layers, kv_dim = preset_shape(model)
    seq_slots = -(-seq_tokens // KV_SLOT_ROUNDING) * KV_SLOT_ROUNDING
    kv_bytes = 2 * 2 * n_layers * kv_dim * batch * seq_slots  # K and V, fp16
    return (2 * n_params + kv_bytes) / shards < 0.9 * gpu_bytes


def resolve_batches(tokens: list[str], model: str, shards: int, seq_tokens: int, gpu_bytes: int) -> list[int]:
    """``tokens`` (ints and ``max``) as batch sizes for (model, shards); ``max`` dropped when the largest
    candidate that fits is not above the other sizes."""
    fixed = [int(t) for t in tokens if t != "max"]
    out = []
    for t in tokens:
        if t != "max":
            out.append(int(t))
            continue
        fitting = [b for b in MAX_BATCH_CANDIDATES if fits(model, shards, b, seq_tokens, gpu_bytes)]
        if fitting and fitting[-1] > max(fixed, default=0):
            out.append(fitting[-1])
            log(f"{model} x{shards}: max batch = {fitting[-1]}")
        else:
            log(f"{model} x{shards}: max batch dropped (largest fitting: {fitting[-1] if fitting else 'none'})")
    return out


# -- Processes: one session each, so a timeout kills everything a process started ------------------


@dataclass(frozen=True)
class Budget:
    """When a configuration must be done, and what its unfinished rows then say."""
    t_end: float   # time.monotonic()
    reason: str    # "timeout after 300 s", "timeout: deadline"

    def left_s(self) -> float:
        return self.t_end - time.monotonic()


def kill_group(proc: subprocess.Popen, grace_s: float = 0.0) -> None:
    """SIGTERM ``proc`` and wait up to ``grace_s`` (when > 0), then SIGKILL its whole process group."""
    if grace_s > 0 and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children outlive their leader: the group may still exist
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:100]


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
    return dict(mean(rows), gpus=n_gpus)


def mean(rows: list[dict]) -> dict:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def metrics(seconds: float, out_tokens: int, energy_j: float, batch: int, sm_pct, mem_pct) -> dict:
    return {"seconds": seconds, "tok_s": out_tokens / seconds, "watts": energy_j / seconds,
            "j_per_token": energy_j / out_tokens, "j_per_response": energy_j / batch,
            "sm_pct": sm_pct if sm_pct is not None else float("nan"),
            "mem_pct": mem_pct if mem_pct is not None else float("nan")}


# -- Baseline: transformers' tensor parallel, on a checkpoint of the same random weights -----------


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
            else:  # generated on the device (tile by tile, seeded per tile), copied to host once
                value = weights.tiled_normal(name, shape, seed=seed, std=0.02, device=dev, dtype=torch_dtype)
            tensors[name] = value.cpu().contiguous()
        file = f"model-{part}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.torch_dtype = torch_dtype
    config.save_pretrained(out)
    llama_like_tokenizer().save_pretrained(out)


def checkpoint(args, model: str, work: Path, budget: Budget) -> Path:
    """Write the baseline checkpoint in a killable subprocess: /dev/shm when it has 1.3 × the room."""
    import torch

    from llmwatts.server.models import DTYPES

    itemsize = DTYPES.get(args.dtype, torch.float16).itemsize
    size_bytes = preset_shape(model)[0] * itemsize
    shm = Path("/dev/shm")
    root = shm if shm.is_dir() and shutil.disk_usage(shm).free > 1.3 * size_bytes else work
    out = Path(tempfile.mkdtemp(prefix=f"bench-sharding-ckpt-{model}-", dir=root))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, __file__, "--write-checkpoint", str(out), "--models", model,
                             "--device", args.device, "--dtype", args.dtype], start_new_session=True)
    try:
        returncode = proc.wait(timeout=max(0.0, budget.left_s()))
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        kill_group(proc)
    if returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        raise (TimeoutError(f"{budget.reason}: writing the checkpoint") if returncode is None
               else RuntimeError(f"writing the checkpoint failed ({returncode})"))
    log(f"baseline {model}: checkpoint ({size_bytes / GIB:.2f} GiB) written in {time.monotonic() - t0:.1f} s "
        f"to {out}")
    return out


def hf_worker(args) -> int:
    """One rank of the baseline: load once, then per batch size a warm-up and ``--repeats`` timed
    generates; rank 0 measures, prints one ``HF_ROW {json}`` line per batch size on stdout and its
    phase timings on stderr."""
    t_imports = time.perf_counter()
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from llmwatts.server.gpu import nvml_index_of_cuda_device, open_gpus
    from llmwatts.server.models import resolve_dtype
    from llmwatts.server.telemetry import sample_row
    from llmwatts.server.tokenizer import llama_like_tokenizer

    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])

    def say(msg: str) -> None:
        if rank == 0:
            log(f"baseline {args.models} x{world}: {msg}")

    cuda = args.device != "cpu" and torch.cuda.is_available()
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(dev)
    t0 = time.perf_counter()
    dist.init_process_group("nccl" if cuda else "gloo")
    dtype = resolve_dtype(args.dtype, dev)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, tp_plan="auto").eval()
    placed = {p.device.type for p in model.parameters()}
    if cuda and placed != {"cuda"}:
        # transformers 5.17 leaves a world-of-1 tp_plan model on the CPU (seen on the H100s: 2.8 tok/s);
        # one rank is plain transformers on one GPU, so move it. A real split must already be on GPU.
        if world > 1:
            raise RuntimeError(f"tp_plan='auto' left parameters on {sorted(placed)} with {world} ranks")
        model.to(dev)
    say(f"imports {t0 - t_imports:.1f} s, process group + loaded in {time.perf_counter() - t0:.1f} s "
        f"(on {model.device})")
    batches = [int(b) for b in args.batches.split(",")]
    _, ids = fixed_length_prompts(llama_like_tokenizer(), args.prompt_tokens, max(batches))
    all_ids = torch.tensor(ids, device=model.device)  # [B_max, S], all the same length: no padding
    # NVML numbers GPUs in PCI order, ignoring CUDA_VISIBLE_DEVICES: map each rank's device by uuid.
    gpus = open_gpus("nvml-readonly", node=socket.gethostname(),
                     device_indices=[nvml_index_of_cuda_device(i) for i in range(world)]) if cuda and rank == 0 else []

    def run(input_ids: torch.Tensor, new_tokens: int) -> None:
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    for batch in batches:
        input_ids = all_ids[:batch]  # [B, S]
        t0 = time.perf_counter()
        run(input_ids, min(8, args.new_tokens))  # warm-up: HF eager captures nothing, 8 tokens suffice
        t1 = time.perf_counter()
        results = []
        for _ in range(args.repeats):
            samples, stop = [], threading.Event()

            def sampler():
                while not stop.wait(0.1):
                    samples.extend(sample_row(g, g.sample()) for g in gpus)

            thread = threading.Thread(target=sampler, daemon=True)
            e0_mj = sum(g.energy_mj() for g in gpus)
            t_run = time.perf_counter()
            thread.start()
            run(input_ids, args.new_tokens)
            seconds = time.perf_counter() - t_run
            stop.set()
            thread.join()
            energy_j = (sum(g.energy_mj() for g in gpus) - e0_mj) / 1000.0
            sm = sum(s["sm_pct"] for s in samples) / len(samples) if samples else None
            mem = sum(s["mem_pct"] for s in samples) / len(samples) if samples else None
            results.append(metrics(seconds, batch * args.new_tokens, energy_j, batch, sm, mem))
        if rank == 0:
            print("HF_ROW " + json.dumps(dict(mean(results), batch=batch, gpus=world)), flush=True)
        say(f"batch {batch}: warm-up {t1 - t0:.1f} s, {args.repeats} timed {time.perf_counter() - t1:.1f} s")
    dist.destroy_process_group()
    return 0


def baseline_rows(args, model: str, shards: int, batches: list[int], ckpt: Path, budget: Budget) -> dict[int, dict]:
    """Run ``shards`` hf_worker ranks (the environment torchrun would give them; each its own session so a
    timeout kills all, which torchrun's own per-worker sessions would not allow); rows per batch size."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(shards),
               LOCAL_WORLD_SIZE=str(shards), GROUP_RANK="0")
    cmd = [sys.executable, __file__, "--hf-worker", "--checkpoint", str(ckpt), "--models", model,
           "--device", args.device, "--dtype", args.dtype, "--batches", ",".join(map(str, batches)),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats)]
    ranks = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), text=True,
                              stdout=subprocess.PIPE if r == 0 else sys.stderr.fileno(), start_new_session=True)
             for r in range(shards)]
    rows: dict[int, dict] = {}

    def read_rank0() -> None:  # stream rank 0's stdout to stderr as it comes, keeping the HF_ROW lines
        for line in ranks[0].stdout:
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.startswith("HF_ROW "):
                row = json.loads(line.removeprefix("HF_ROW "))
                rows[row.pop("batch")] = row

    reader = threading.Thread(target=read_rank0, daemon=True)
    reader.start()
    error = None
    try:
        while (codes := [p.poll() for p in ranks]) != [0] * shards:
            if any(codes) or budget.left_s() < 0:  # a rank failed (the others would hang), or out of time
                error = f"failed: rank exit codes {codes}" if any(codes) else budget.reason
                break
            time.sleep(0.5)
    finally:
        for p in ranks:
            kill_group(p)
        reader.join(timeout=10)
    return {b: rows.get(b, {"error": error or "failed: no HF_ROW line"}) for b in batches}


# -- Report ----------------------------------------------------------------------------------------


def print_table(rows: list[dict], args, device_name: str) -> None:
    print(f"\n{device_name}, {time.strftime('%Y-%m-%d')}: {args.prompt_tokens}-token prompts, "
          f"{args.new_tokens} new tokens (fixed), {args.dtype}, greedy, mean of {args.repeats} timed request(s) "
          f"per batch after one warm-up\n")
    print("| system | model | shards | batch | tok/s | W (sum) | J/token | J/response | SM % | mem % | s/batch |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        head = f"| {r['system']} | {r['model']} | {r['shards']} | {r['batch']} |"
        if "error" in r:
            print(f"{head} {r['error']} | | | | | | |")
            continue
        print(f"{head} {r['tok_s']:.1f} | {r['watts']:.0f} | {r['j_per_token']:.3f} | {r['j_per_response']:.1f} | "
              f"{r['sm_pct']:.0f} | {r['mem_pct']:.0f} | {r['seconds']:.2f} |")


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
