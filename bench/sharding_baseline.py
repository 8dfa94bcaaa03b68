"""The baseline of bench/sharding.py: transformers' tensor parallel (``tp_plan="auto"``, one process per rank
with torchrun's environment) on a checkpoint of the same random weights as llmwatts' preset. Its ranks and
the checkpoint writer run as ``bench/sharding.py --hf-worker`` / ``--write-checkpoint``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fixed_prompts import fixed_length_prompts
from sharding_fit import preset_shape
from sharding_procs import Budget, kill_group, log
from sharding_rows import mean, metrics

GIB = 1024**3
SCRIPT = Path(__file__).with_name("sharding.py")  # the entry point its subprocesses run


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
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--write-checkpoint", str(out), "--models", model,
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
    cmd = [sys.executable, str(SCRIPT), "--hf-worker", "--checkpoint", str(ckpt), "--models", model,
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

