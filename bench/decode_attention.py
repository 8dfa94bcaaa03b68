"""Decode attention microbenchmark: the fast engine's decode-attention kernels alone, at one step's shape.

One decode step of llama-7b reads the weights once (13.5 GB) and every sequence's K/V cache once per layer;
at batch 64-256 the cache read is as large as the weights, so the attention kernel decides much of a step's
time and energy. This times each of the engine's decode-attention functions (``server/engine/attention.py``) on
the same cache: ``sdpa`` (the default: SDPA with an additive mask over the attention window), ``bmm`` (two
batched matmuls, compiled as the engine compiles it), ``flex`` (FlexAttention with the engine's block mask
over the whole cache, compiled), and, as a bound no engine path reaches, ``sdpa-nomask`` (SDPA over exactly
the live keys, no mask: flash attention); ``kernel`` and ``kernel-fp8``: the Triton decode kernel of
``--kv-cache fp8`` (``server/engine/fp8_attention.py``) over the same cache in fp16 and over its e4m3 copy
(the bandwidth column counts the bytes each reads). Each runs as a CUDA graph of one call per layer over ``--layers``
distinct caches (so nothing sits in L2), replayed for at least ``--min-seconds``; energy from the NVML
counter (read-only) around the replays. Columns: µs per call, K/V bandwidth over the live keys, W, µJ per
call, and the largest difference from an fp32 reference.

    python bench/decode_attention.py                       # cuda: batches 64,256, slot 319 of a 384 cache
    python bench/decode_attention.py --quick               # cpu, tiny shapes: proves the script runs
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nvml_energy import EnergyCounter

from llmwatts.server.engine import attention as fe
from llmwatts.server.engine.cache import CACHE_SLOTS, round_up


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--cache-len", type=int, default=384, help="slots in the cache (128 prompt + 256 new)")
    ap.add_argument("--slot", type=int, default=319, help="the slot this step writes (live keys = slot + 1)")
    ap.add_argument("--padding", type=int, default=0, help="left-padding slots masked in every other row")
    ap.add_argument("--window-slots", type=int, default=fe.WINDOW_SLOTS, help="the engine's window granularity")
    ap.add_argument("--layers", type=int, default=8, help="distinct caches per graph replay")
    ap.add_argument("--impls", help="default: sdpa,bmm,flex,sdpa-nomask, and on cuda kernel,kernel-fp8 (Triton)")
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="cpu, small shapes, no graphs")
    args = ap.parse_args(argv)
    if args.quick:
        args.device, args.batches, args.heads, args.head_dim = "cpu", "2", 2, 16
        args.cache_len, args.slot, args.padding, args.layers, args.min_seconds = 128, 70, 3, 2, 0.05
    if args.impls is None:
        args.impls = "sdpa,bmm,flex,sdpa-nomask" + (",kernel,kernel-fp8" if args.device.startswith("cuda") else "")
    if not 0 <= args.slot < args.cache_len or args.cache_len % CACHE_SLOTS:
        ap.error(f"need 0 <= --slot < --cache-len and --cache-len a multiple of {CACHE_SLOTS}")
    if args.window_slots <= 0 or CACHE_SLOTS % args.window_slots:
        ap.error(f"--window-slots must divide {CACHE_SLOTS}")
    results = run(args)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def run(args) -> dict:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    counter = EnergyCounter(device)
    results = {"device": getattr(counter, "name", "cpu"), "torch": torch.__version__, "heads": args.heads,
               "head_dim": args.head_dim, "cache_len": args.cache_len, "slot": args.slot, "rows": []}
    scale = args.head_dim ** -0.5
    window = min(round_up(args.slot + 1, args.window_slots), args.cache_len)
    options = {}
    for b in [int(x) for x in args.batches.split(",") if x]:
        g = torch.Generator(device).manual_seed(0)
        shape = (b, args.heads, args.cache_len, args.head_dim)
        ks = [torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(args.layers)]
        vs = [torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(args.layers)]
        q = torch.randn(b, args.heads, 1, args.head_dim, generator=g, device=device, dtype=dtype)
        cols = torch.arange(args.cache_len, device=device)
        valid = (cols[None, :] >= torch.tensor([args.padding * (i % 2) for i in range(b)], device=device)[:, None])
        slot = torch.tensor([args.slot], device=device)
        additive = torch.zeros(b, 1, 1, window, device=device, dtype=dtype).masked_fill_(
            ~(valid[:, :window] & (cols[:window] <= slot))[:, None, None, :], float("-inf"))
        blocks = torch.zeros(b, 1, 1, dtype=torch.int32, device=device)
        indices = torch.arange(args.cache_len // fe.FLEX_KV_BLOCK, dtype=torch.int32, device=device).expand(
            b, 1, 1, -1).contiguous()
        block_mask = fe.flex_block_mask(valid, slot, blocks, indices)
        live = args.slot + 1
        ref = F.scaled_dot_product_attention(q.float(), ks[0][:, :, :window].float(), vs[0][:, :, :window].float(),
                                             attn_mask=additive.float(), scale=scale)
        bmm = fe.compiled_decode_attention("bmm") if cuda else fe.attend_bmm
        flex = fe.compiled_decode_attention("flex") if cuda else fe.attend_flex
        ks8 = [k.to(torch.float8_e4m3fn) for k in ks] if "kernel-fp8" in args.impls else ks
        vs8 = [v.to(torch.float8_e4m3fn) for v in vs] if "kernel-fp8" in args.impls else vs
        fp8_of = {id(k): k8 for k, k8 in zip(ks + vs, ks8 + vs8)}

        def kernel(k, v):
            from llmwatts.server.engine import fp8_attention

            return fp8_attention.launch(q, k[:, :, :window], v[:, :, :window], additive, scale)

        impls = {
            "kernel": kernel,
            "kernel-fp8": lambda k, v: kernel(fp8_of[id(k)], fp8_of[id(v)]),
            "sdpa": lambda k, v: fe.attend_sdpa(q, k[:, :, :window], v[:, :, :window], additive, scale),
            "bmm": lambda k, v: bmm(q, k[:, :, :window], v[:, :, :window], additive, scale),
            "flex": lambda k, v: flex(q, k, v, block_mask, scale),
            "sdpa-nomask": lambda k, v: F.scaled_dot_product_attention(q, k[:, :, :live], v[:, :, :live], scale=scale),
        }
        kv_bytes = 2 * b * args.heads * (live - args.padding * (b // 2) / b) * args.head_dim * ks[0].element_size()
        for name in [x for x in args.impls.split(",") if x]:
            row = {"impl": name, "batch": b}
            try:
                fn = impls[name]
                err = (fn(ks[0], vs[0]).float() - ref).abs().max().item()
                if name == "sdpa-nomask" and args.padding:
                    err = float("nan")  # it ignores the padding by construction
                step = measure(lambda: [fn(k, v) for k, v in zip(ks, vs)], cuda, counter, args.min_seconds)
                per_call = step["seconds"] / (step["replays"] * args.layers)
                read = kv_bytes / 2 if name == "kernel-fp8" and cuda else kv_bytes  # e4m3: half fp16's bytes
                row.update(us=1e6 * per_call, gb_s=read / per_call / 1e9, max_abs_err=err)
                if "joules" in step:
                    row.update(watts=step["joules"] / step["seconds"],
                               uj=1e6 * step["joules"] / (step["replays"] * args.layers))
            except Exception as e:  # one kernel that will not build must not lose the others
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            results["rows"].append(row)
            print(row, flush=True)
        del ks, vs
        if cuda:
            torch.cuda.empty_cache()
    return results


def measure(body, cuda: bool, counter, min_s: float) -> dict:
    """Replay ``body`` (as one CUDA graph on cuda) until ``min_s`` passed; time and NVML energy."""
    if cuda:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                body()  # compile, autotune, warm
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        run = graph.replay
        torch.cuda.synchronize()
    else:
        body()
        run = body
    e0, t0, replays = counter.energy_mj(), time.perf_counter(), 0
    while True:
        for _ in range(20 if cuda else 1):
            run()
            replays += 1
        if cuda:
            torch.cuda.synchronize()
        if time.perf_counter() - t0 >= min_s:
            break
    out = {"seconds": time.perf_counter() - t0, "replays": replays}
    e1 = counter.energy_mj()
    if e0 is not None:
        out["joules"] = (e1 - e0) / 1000.0
    return out


def print_table(results: dict) -> None:
    print(f"\n# decode attention on {results['device']}, torch {results['torch']}: {results['heads']} heads × "
          f"{results['head_dim']}, cache {results['cache_len']} slots, writing slot {results['slot']}\n")
    print("| impl | batch | µs / call | K/V GB/s (live keys) | W | µJ / call | max abs err vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        if "error" in r:
            print(f"| {r['impl']} | {r['batch']} | {r['error']} | | | | |")
            continue
        w = f"{r['watts']:.0f}" if "watts" in r else "-"
        uj = f"{r['uj']:.0f}" if "uj" in r else "-"
        print(f"| {r['impl']} | {r['batch']} | {r['us']:.1f} | {r['gb_s']:.0f} | {w} | {uj} | {r['max_abs_err']:.2e} |")


if __name__ == "__main__":
    sys.exit(main())
