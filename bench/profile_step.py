"""Where the fast engine's decode step spends its time: its kernels by kind, per step, at each batch size.

One decode step of llama-7b should cost about (weight bytes + K/V bytes read) / memory bandwidth; the
engine runs at ~75% of that (docs/performance.md). This says where the rest goes. For each batch it
prefills ``--prompt-tokens``-token prompts, replays the graphed decode steps once untimed (capture), then
times ``--steps`` steps with CUDA events (no profiler: the step's real wall time), then replays them again
under ``torch.profiler`` and sorts every kernel into a kind (cuBLAS/cuDNN matmul, attention, inductor's
fused Triton kernels, copies and indexing, sampling reductions, other) by its name. Columns: µs per step
of each kind, its share of the kernel time, and the gap between the kernels' sum and the step's wall time
(launch gaps, host syncs). The byte floor is (weights + the K/V the steps' windows read) / ``--bandwidth``
(or the measured copy bandwidth): the step time a kernel-perfect engine would reach. The top kernels by
time are listed under the table. Timing only; no NVML.

    python bench/profile_step.py                       # llama-7b on cuda, batches 1,64,256
    python bench/profile_step.py --quick               # tiny on cpu: proves the script runs
    python bench/profile_step.py --variants bmm        # also the engine with another decode attention
"""

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from engine import parse_variant
from engine_timing import copy_bandwidth_bytes_s, sync
from fixed_prompts import fixed_length_prompts

from llmwatts.errors import InvalidArgument
from llmwatts.server.engine import FastEngine, bucket
from llmwatts.server.models import load_model

# First match wins; matched against the kernel's (demangled) name. Attention before matmul: flash
# kernels' names mention their tiles too.
KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|attn|Attention|flex", re.I)),
    ("matmul", re.compile(r"gemm|gemv|nvjet|cutlass|xmma|cublas|sm90_|sm80_|ampere_|splitK|addmm|\bmm\b|matmul|linear", re.I)),
    ("triton (fused by inductor)", re.compile(r"^triton", re.I)),
    ("copy / index", re.compile(r"copy|index|scatter|gather|cat|fill|memcpy|memset", re.I)),
    ("sampling / reductions", re.compile(r"reduce|argmax|softmax|sort|cumsum|exponential", re.I)),
)
OTHER = "other"


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return OTHER


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=128, help="decode steps timed and profiled per batch")
    ap.add_argument("--variants", default="", help="other decode attentions[:window slots] to profile too, e.g. bmm")
    ap.add_argument("--bandwidth", type=float, default=0.0, help="bytes/s for the byte floor (default: measured copy)")
    ap.add_argument("--top", type=int, default=12, help="kernels listed per batch")
    ap.add_argument("--weights", default="fp16", choices=("fp16", "fp8"),
                    help="fp8: the decoder's projections in e4m3 (an FP8 GPU; LLMWATTS_FP8_GEMM picks the kernel)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="tiny on cpu, few steps: proves the script runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.device, args.batches, args.prompt_tokens, args.steps = "tiny", "cpu", "1,4", 16, 8
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        ap.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not batches or min(batches) < 1 or args.steps < 1 or args.prompt_tokens < 1:
        ap.error("--batches, --steps and --prompt-tokens must be positive")
    for variant in (v for v in args.variants.split(",") if v):
        try:  # before the model loads
            parse_variant(variant)
        except ValueError as e:
            ap.error(f"bad variant {variant!r} ({e}): an attention, optionally ':' and a window size, e.g. "
                     f"bmm or sdpa:16")
    try:
        results = run(args, batches)
    except (InvalidArgument, ValueError) as e:  # a device without CUDA, a run past the context, ...
        ap.error(str(e))
    print_report(results, args.top)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def run(args, batches: list[int]) -> dict:
    loaded = load_model(args.model, device=args.device, weights_precision=args.weights)
    device, model = loaded.device, loaded.model
    if args.prompt_tokens + args.steps + 1 > loaded.context_length:
        raise ValueError(f"--prompt-tokens + --steps must stay below the model's context of "
                         f"{loaded.context_length} tokens")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = args.bandwidth or copy_bandwidth_bytes_s(device)
    _, ids = fixed_length_prompts(loaded.tokenizer, args.prompt_tokens, max(batches))
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "model": args.model, "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "weight_bytes": weight_bytes, "bandwidth_bytes_s": bw, "steps": args.steps,
               "prompt_tokens": args.prompt_tokens, "weights": args.weights, "rows": []}
    for variant in ["sdpa"] + [v for v in args.variants.split(",") if v]:
        attention, window_slots = parse_variant(variant)
        engine = FastEngine(model, loaded.tokenizer.pad_token_id, loaded.eos_token_id, device,
                            loaded.context_length, attention=attention, window_slots=window_slots)
        for b in batches:
            row = profile_batch(engine, [ids[i] for i in range(b)], args.steps)
            row.update(variant=variant, batch=b, floor_us=1e6 * (weight_bytes + row["kv_bytes_per_step"]) / bw
                       if bw == bw else float("nan"))
            results["rows"].append(row)
            print(f"[{time.strftime('%H:%M:%S')}] {variant} b={b}: {row['wall_us']:.0f} µs/step wall, "
                  f"{row['kernel_us']:.0f} µs in kernels", flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2))
        engine.release()
    return results


def profile_batch(engine: FastEngine, prompts: list[list[int]], steps: int) -> dict:
    """Decode ``steps`` steps after a prefill of ``prompts``: wall µs per step (CUDA events), then per-kind
    kernel µs per step from one profiled replay of the same steps."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.device.type == "cuda"
    width = max(len(p) for p in prompts)
    # The engine's own steps (internals: a bench, not an API): prefill, then decode steps t = 1..steps
    # with width + t live slots, as ``generate`` runs them.
    ws = engine.workspace(bucket(len(prompts)), width + steps + 1, prefill_width=width)

    def prefill() -> None:
        engine.prefill(ws, prompts, True)
        sync(engine.device)

    def decode() -> None:
        for t in range(1, steps + 1):
            engine.decode_step(ws, width + t, True)
        sync(engine.device)

    prefill()
    decode()  # compile / capture every window these steps use
    prefill()
    t0 = time.perf_counter()
    decode()
    wall_us = 1e6 * (time.perf_counter() - t0) / steps
    prefill()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        decode()
    per_kind, per_kernel = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        on_device = getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
        if cuda and not on_device:
            continue
        if not cuda and (e.cpu_parent is not None or not e.name.startswith("aten::")):
            continue  # on CPU: top-level aten ops stand in for kernels
        us = (e.device_time if cuda else e.cpu_time_total)
        per_kind[kind_of(e.name)] += us
        k = per_kernel[e.name]
        k[0] += us
        k[1] += 1
    kernel_us = sum(per_kind.values()) / steps
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])
    # K/V the steps read: each step's window of every layer's cache, every row of the bucket.
    mean_window = sum(engine.window(ws, width + t) for t in range(1, steps + 1)) / steps
    return {"bucket": ws.batch, "kv_bytes_per_step": ws.nbytes * mean_window / ws.cache_len, "wall_us": wall_us, "kernel_us": kernel_us,
            "kinds": {k: v / steps for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n, "us_per_step": us / steps, "calls_per_step": c / steps} for n, (us, c) in top]}


def print_report(results: dict, top: int) -> None:
    print()
    print(f"# decode step of {results['model']} on {results['device']}, {results['prompt_tokens']}-token prompts, "
          f"{results['steps']} steps; torch {results['torch']}; {results['date']}")
    bw = results["bandwidth_bytes_s"]
    print(f"byte floor: ({results['weight_bytes'] / 1e9:.2f} GB weights + the steps' K/V windows) / "
          f"{bw / 1e12:.2f} TB/s")
    kinds = [k for k, _ in KINDS] + [OTHER]
    print()
    print("| variant | batch | wall µs/step | byte floor µs | % of floor | " + " | ".join(kinds)
          + " | gap (wall − kernels) |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(kinds) + "---:|")
    for r in results["rows"]:
        cells = []
        for k in kinds:
            us = r["kinds"].get(k, 0.0)
            cells.append(f"{us:.0f} ({100 * us / r['kernel_us']:.0f}%)" if r["kernel_us"] else "0")
        floor = r["floor_us"]
        print(f"| {r['variant']} | {r['batch']} | {r['wall_us']:.0f} | {floor:.0f} | "
              f"{100 * floor / r['wall_us']:.1f}% | " + " | ".join(cells) + f" | {r['wall_us'] - r['kernel_us']:.0f} |")
    for r in results["rows"]:
        print(f"\n{r['variant']} batch {r['batch']}: top kernels (µs per step, calls per step)")
        for k in r["top"][:top]:
            print(f"  {k['us_per_step']:9.1f} µs  {k['calls_per_step']:6.1f}×  {kind_of(k['name']):<12.12}  "
                  f"{k['name'][:110]}")


if __name__ == "__main__":
    sys.exit(main())
