"""FP8 weight matmuls at decode's few rows: fp16 against the three fp8 paths of ``fp8.linear``, per shape.

For each llama-7b projection (q/k/v fused 12,288 x 4,096, o 4,096 x 4,096, gate/up fused 22,016 x 4,096,
down 4,096 x 11,008) and each M (rows: the decode batch), GPU time per call of: ``fp16`` (``F.linear``),
``tensorwise`` and ``rowwise`` (``_scaled_mm`` with x quantized per row: ``LLMWATTS_FP8_GEMM``'s two
cuBLASLt choices) and ``weightonly`` (the Triton kernel of ``server/engine/fp8_gemv.py``, called directly,
so also above ``fp8.GEMV_MAX_ROWS`` where the engine would run tensor-wise). Each runs eagerly as a CUDA
graph of one call per weight copy, enough copies that nothing sits in L2, replayed; columns: µs per call,
weight GB/s, speedup over fp16, and the largest error against the fp32 product of the same dequantized
weight (fp16: against its own fp32 product). Then the sum over a layer's four projections, the same layer
``torch.compile``d as the engine compiles it (plus ``dequant``: inductor's own fusion of a weight cast into
F.linear, for comparison), and a sweep of the kernel's launch configurations at M = 1 and 16 against
``fp8_gemv.pick_config``'s choice. Sections print (and ``--json`` is rewritten) as each ends: projections,
sweep, compiled layers (the compiles take most of the time).

    python bench/fp8_gemv.py --json out.json          # cuda (an FP8 GPU): the whole run, < 90 s on an H100
    python bench/fp8_gemv.py --write-table t.json     # also: the sweep's fastest configs -> $LLMWATTS_FP8_GEMV_TABLE
    python bench/fp8_gemv.py --quick                  # cpu, tiny shapes, reference paths only: it runs
                                                      # (compiled rows: dynamo only; sweep: the reference)
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmwatts.server.engine import fp8
from llmwatts.server.engine.attention import allow_recompiles, inductor_options

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}  # N x K
QUICK_SHAPES = {"qkv": (96, 64), "o": (32, 32), "gate_up": (176, 32), "down": (32, 88)}
PATHS = ("fp16", "tensorwise", "rowwise", "weightonly")
L2_BYTES = 128 << 20  # weight copies per shape: at least this many bytes (an H100's L2 is 50 MB)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,16,64", help="M values (decode batch sizes)")
    ap.add_argument("--compiled-rows", default="1,16", help="M values of the compiled per-layer rows ('' none)")
    ap.add_argument("--compiled-paths", default="fp16,tensorwise,weightonly,dequant",
                    help=f"paths of the compiled per-layer rows, of {','.join(PATHS)},dequant")
    ap.add_argument("--sweep-rows", default="1,16", help="M values of the launch-configuration sweep ('' none)")
    ap.add_argument("--replays", type=int, default=20, help="graph replays per timing (median of 3)")
    ap.add_argument("--write-table", type=Path, metavar="PATH",
                    help="write the sweep's fastest configuration per product (M, N, K) as a tuning table "
                         "for $LLMWATTS_FP8_GEMV_TABLE")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="cpu, tiny shapes, reference paths, no graphs")
    args = ap.parse_args(argv)
    try:
        rows = [int(m) for m in args.rows.split(",") if m]
        compiled_rows = [int(m) for m in args.compiled_rows.split(",") if m]
        sweep_rows = [int(m) for m in args.sweep_rows.split(",") if m]
    except ValueError:
        ap.error("--rows, --compiled-rows and --sweep-rows take comma-separated integers")
    if not rows or min(rows + compiled_rows + sweep_rows) < 1:
        ap.error("rows must be positive integers")
    compiled_paths = [p for p in args.compiled_paths.split(",") if p]
    if set(compiled_paths) - {*PATHS, "dequant"}:
        ap.error(f"--compiled-paths takes {','.join(PATHS)},dequant, got {args.compiled_paths[:80]!r}")
    cuda = not args.quick
    if cuda and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --quick on a CPU")
    if cuda:
        fp8.check_fp8_device(torch.device("cuda"), "fp8")  # one line on a GPU without FP8
        fp8.load_gemv()
    started = time.perf_counter()
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "gemv_max_rows": fp8.GEMV_MAX_ROWS, "rows": [], "layer": [], "compiled": [], "sweep": []}
    bench = Bench(QUICK_SHAPES if args.quick else SHAPES, cuda, args.replays)

    def save():
        results["seconds"] = time.perf_counter() - started
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))

    results["rows"] = bench.projections(rows)
    results["layer"] = layer_sums(results["rows"])
    save()
    print_projections(results)
    results["bf16"] = bench.bf16_errors(rows)
    save()
    print(f"\nweight-only kernel in bf16 (o projection), rel err vs fp32 by M: {results['bf16']}")
    results["sweep"] = bench.sweep(sweep_rows)  # before the compiles: they take most of the time
    save()
    print_sweep(results)
    if args.write_table:
        table = fastest_configs(results["sweep"], results["device"])
        args.write_table.write_text(json.dumps(table, indent=1))
        print(f"tuning table ({len(table['configs'])} products) -> {args.write_table}")
        from llmwatts.server.engine import fp8_gemv  # (imported by the sweep already: Triton is there)

        os.environ[fp8_gemv.TABLE_ENV] = str(args.write_table.resolve())  # the compiled rows run it
    results["compiled"] = bench.compiled_layers(compiled_rows, compiled_paths)
    save()
    print_compiled(results)
    print(f"\n{time.perf_counter() - started:.1f} s in all")
    return 0


def weight_only(x, w_q, scale):
    """The kernel itself on CUDA (every M); on CPU, ``fp8.linear``'s weight-only reference."""
    if x.is_cuda:
        return torch.ops.llmwatts.fp8_gemv(x, w_q, scale)
    return with_gemm("weightonly", fp8.linear, x, w_q, None, scale)


def with_gemm(gemm: str, fn, *args):
    saved, fp8.GEMM = fp8.GEMM, gemm
    try:
        return fn(*args)
    finally:
        fp8.GEMM = saved


def path_fn(path: str):
    """path -> fn(x, weights) with weights = (w16, w_q, scale)."""
    if path == "fp16":
        return lambda x, w: F.linear(x, w[0])
    if path == "weightonly":
        return lambda x, w: weight_only(x, w[1], w[2])
    if path == "dequant":  # compiled only: inductor fuses (or not) the weight cast into the matmul
        return lambda x, w: F.linear(x, w[1].to(x.dtype)) * w[2].to(x.dtype)
    return lambda x, w: with_gemm(path, fp8.linear, x, w[1], None, w[2])


class Bench:
    def __init__(self, shapes: dict, cuda: bool, replays: int):
        self.cuda, self.replays = cuda, replays
        self.device = torch.device("cuda" if cuda else "cpu")
        self.dtype = torch.float16 if cuda else torch.float32
        g = torch.Generator(self.device).manual_seed(0)
        self.shapes, self.weights = shapes, {}
        for name, (n, k) in shapes.items():
            copies = max(2, -(-L2_BYTES // (n * k))) if cuda else 1  # fp8 bytes; fp16 copies read twice that
            ws = []
            for _ in range(copies):
                w16 = (torch.randn(n, k, generator=g, device=self.device) * 0.02).to(self.dtype)
                w_q, scale = fp8.quantize_weight(w16)
                ws.append((w16, w_q, scale))
            self.weights[name] = ws
        self.generator = g

    def x(self, m: int, k: int) -> torch.Tensor:
        return torch.randn(m, k, generator=self.generator, device=self.device).to(self.dtype)

    def time_us(self, body, calls: int) -> float:
        """Median µs per call of ``body`` (``calls`` calls), captured as a CUDA graph and replayed."""
        if not self.cuda:
            body()
            t0 = time.perf_counter()
            body()
            return 1e6 * (time.perf_counter() - t0) / calls
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                body()  # compile, warm
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(self.replays):
                graph.replay()
            end.record()
            end.synchronize()
            times.append(1e3 * start.elapsed_time(end) / (self.replays * calls))
        del graph
        return sorted(times)[1]

    def cases(self, rows: list[int]):
        """(projection name, N, K, its weight copies, M, x [M, K]) for every projection and M."""
        for name, (n, k) in self.shapes.items():
            for m in rows:
                yield name, n, k, self.weights[name], m, self.x(m, k)

    def projections(self, rows: list[int]) -> list[dict]:
        out = []
        for name, n, k, ws, m, x in self.cases(rows):
            exact = x.float() @ fp8.dequantize(ws[0][1], ws[0][2], torch.float32).t()
            for path in PATHS:
                fn = path_fn(path)
                ref = x.float() @ ws[0][0].float().t() if path == "fp16" else exact

                def measure(fn=fn, ref=ref, path=path):
                    err = (fn(x, ws[0]).float() - ref).abs().max().item()
                    us = self.time_us(lambda: [fn(x, w) for w in ws], len(ws))
                    weight_bytes = n * k * (2 if path == "fp16" else 1)
                    return dict(us=us, gb_s=weight_bytes / us / 1e3, max_abs_err=err,
                                rel_err=err / ref.abs().max().item())

                out.append(measured({"shape": name, "n": n, "k": k, "m": m, "path": path}, measure))
        return out

    def bf16_errors(self, rows: list[int]) -> dict:
        """The kernel's largest error over max |y| with bf16 x (the CPU tests' interpreter cannot run bf16
        on the tensor cores), o projection, per M."""
        n, k = self.shapes["o"]
        _, w_q, scale = self.weights["o"][0]
        out = {}
        for m in rows:
            x = self.x(m, k).to(torch.bfloat16)
            ref = x.float() @ fp8.dequantize(w_q, scale, torch.float32).t()
            out[m] = ((weight_only(x, w_q, scale).float() - ref).abs().max() / ref.abs().max()).item()
        return out

    def compiled_layers(self, rows: list[int], paths: list[str]) -> list[dict]:
        """A layer's four projections as one compiled function (dynamic=False, fullgraph=True, the engine's
        inductor options), graphed, per path and M: µs per layer."""
        out = []
        allow_recompiles()  # one code object (``layer``) compiled per path and M
        layer_bytes = sum(n * k for n, k in self.shapes.values())
        for path in paths:
            fn = path_fn(path)
            names = list(self.shapes)

            def layer(xs, ws, fn=fn):
                return [fn(x, w) for x, w in zip(xs, ws)]

            def measure(path=path, m=None):
                # On CPU (--quick) dynamo traces the same function, but no inductor compile (minutes in C++).
                compiled = (torch.compile(layer, dynamic=False, fullgraph=True, options=inductor_options())
                            if self.cuda else torch.compile(layer, dynamic=False, fullgraph=True, backend="eager"))
                xs = [self.x(m, self.shapes[s][1]) for s in names]
                ws = [self.weights[s][0] for s in names]
                t0 = time.perf_counter()
                us = with_gemm(path if path in fp8.GEMMS else fp8.GEMM, self.time_us, lambda: compiled(xs, ws), 1)
                return dict(us=us, gb_s=layer_bytes * (2 if path == "fp16" else 1) / us / 1e3,
                            compile_s=time.perf_counter() - t0)

            out += [measured({"path": path, "m": m}, lambda m=m: measure(m=m)) for m in rows]
        return out

    def sweep(self, rows: list[int]) -> list[dict]:
        """The kernel at each candidate launch configuration (eager, graphed): µs per call."""
        from llmwatts.server.engine import fp8_gemv as g

        out = []
        for name, n, k, ws, m, x in self.cases(rows):
            chosen = g.pick_config(m, n, k)
            for config in dict.fromkeys([chosen, *candidates(g, m, n, k)]):
                def measure(config=config, x=x, ws=ws):
                    def run(w):  # on CPU (--quick) the weight-only reference: the loops and table only
                        return g.gemv_with(x, w[1], w[2], config) if self.cuda else weight_only(x, w[1], w[2])

                    us = self.time_us(lambda: [run(w) for w in ws], len(ws))
                    return dict(us=us, gb_s=n * k / us / 1e3)

                row = {"shape": name, "m": m, "n": n, "k": k, "config": config.label(),
                       "fields": dataclasses.asdict(config), "chosen": config == chosen}
                out.append(measured(row, measure, echo=False))
            print(f"sweep {name} M={m}: {len(out)} rows so far", flush=True)
        return out


def measured(row: dict, measure, echo: bool = True) -> dict:
    """``row`` with ``measure()``'s figures, or its error: one path that fails must not lose the others."""
    try:
        row.update(measure())
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if echo:
        print(row, flush=True)
    return row


def candidates(g, m: int, n: int, k: int) -> list:
    """Launch configurations to try beside ``pick_config``'s: CUDA cores at one row, tensor-core tiles;
    each without split K (unless too few programs) and with K split to ~4 programs per SM."""
    bk = g.block_k_for(k)
    base = [g.GemvConfig(16, 16, min(256, bk), num_warps=4, num_stages=4),
            g.GemvConfig(16, 32, min(256, bk), num_warps=4, num_stages=4),
            g.GemvConfig(16, 64, min(256, bk), num_warps=4, num_stages=3),
            g.GemvConfig(16, 64, 128, num_warps=8, num_stages=4)]
    if m == 1:
        base += [g.GemvConfig(1, 8, bk, num_warps=2), g.GemvConfig(1, 8, bk, num_warps=4),
                 g.GemvConfig(1, 16, bk, num_warps=4), g.GemvConfig(1, 32, min(256, bk), num_warps=4),
                 g.GemvConfig(1, 64, 128, num_warps=8)]
    else:
        base += [g.GemvConfig(16, 16, bk, num_warps=4, num_stages=3), g.GemvConfig(16, 128, 64, num_warps=4)]
        # swapped (y^T = w . x^T): outputs are the MMA's 64/128/256-row side, the rows (padded) the other
        block_m = g.tile_rows(m)
        for block_n, block_k, warps, stages in [(64, 128, 4, 4), (64, 256, 4, 3), (128, 64, 4, 5),
                                                (128, 128, 4, 4), (128, 128, 8, 4), (128, 256, 8, 3),
                                                (256, 64, 8, 4), (256, 128, 8, 3)]:
            base.append(g.GemvConfig(block_m, block_n, min(block_k, bk), num_warps=warps, num_stages=stages,
                                     swap=True))
        if m > 16:  # the unswapped tiles at the rows' own block
            base += [g.GemvConfig(block_m, 64, 128, num_warps=4, num_stages=4),
                     g.GemvConfig(block_m, 128, 64, num_warps=8, num_stages=4)]
    return [g.with_split(c, m, n, k, min_programs) for c in base for min_programs in (g.MIN_PROGRAMS, 512)]


def fastest_configs(sweep: list[dict], device: str) -> dict:
    """The sweep's fastest configuration per (M, N, K): a tuning table for ``$LLMWATTS_FP8_GEMV_TABLE``."""
    best: dict[tuple, dict] = {}
    for r in sweep:
        key = (r["m"], r["n"], r["k"])
        if "us" in r and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    return {"device": device, "torch": torch.__version__,
            "configs": [{"m": m, "n": n, "k": k, **r["fields"], "us": round(r["us"], 2)}
                        for (m, n, k), r in sorted(best.items())]}


def layer_sums(rows: list[dict]) -> list[dict]:
    """Per path and M, the four projections' µs summed (a layer, as docs/performance.md's table)."""
    sums: dict[tuple, dict] = {}
    for r in rows:
        if "us" not in r:
            continue
        s = sums.setdefault((r["path"], r["m"]), {"path": r["path"], "m": r["m"], "us": 0.0, "shapes": 0})
        s["us"] += r["us"]
        s["shapes"] += 1
    return list(sums.values())


def markdown_table(header: list[str], rows: list[list[str]]) -> None:
    """Print a markdown table; the first column left-aligned, the rest right-aligned."""
    print("\n| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for cells in rows:
        print("| " + " | ".join(cells + [""] * (len(header) - len(cells))) + " |")


def speedup(base: float | None, us: float) -> str:
    return f"{base / us:.2f}x" if base else "-"


def print_projections(results: dict) -> None:
    print(f"\n# fp8 weight matmuls on {results['device']}, torch {results['torch']} (eager, CUDA graphs)")
    fp16 = {(r["shape"], r["m"]): r["us"] for r in results["rows"] if r["path"] == "fp16" and "us" in r}
    markdown_table(["projection", "M", "path", "µs / call", "weight GB/s", "vs fp16", "max abs err", "rel err"], [
        [f"{r['shape']} {r['n']}x{r['k']}", str(r["m"]), r["path"]]
        + ([r["error"]] if "error" in r else
           [f"{r['us']:.1f}", f"{r['gb_s']:.0f}", speedup(fp16.get((r["shape"], r["m"])), r["us"]),
            f"{r['max_abs_err']:.2e}", f"{r['rel_err']:.2e}"])
        for r in results["rows"]])
    base = {s["m"]: s["us"] for s in results["layer"] if s["path"] == "fp16"}
    markdown_table(["a layer (sum of 4)", "M", "path", "µs", "vs fp16"], [
        [f"layer ({s['shapes']} shapes)", str(s["m"]), s["path"], f"{s['us']:.1f}", speedup(base.get(s["m"]), s["us"])]
        for s in results["layer"]])


def print_compiled(results: dict) -> None:
    base = {r["m"]: r["us"] for r in results["compiled"] if r["path"] == "fp16" and "us" in r}
    markdown_table(["compiled layer", "M", "path", "µs", "weight GB/s", "vs fp16", "compile + time s"], [
        ["layer", str(r["m"]), r["path"]]
        + ([r["error"]] if "error" in r else
           [f"{r['us']:.1f}", f"{r['gb_s']:.0f}", speedup(base.get(r["m"]), r["us"]), f"{r['compile_s']:.1f}"])
        for r in results["compiled"]])


def print_sweep(results: dict) -> None:
    markdown_table(["sweep: projection", "M", "config (* = pick_config)", "µs", "weight GB/s"], [
        [r["shape"], str(r["m"]), r["config"] + (" *" if r["chosen"] else "")]
        + ([r["error"]] if "error" in r else [f"{r['us']:.1f}", f"{r['gb_s']:.0f}"])
        for r in results["sweep"]])


if __name__ == "__main__":
    sys.exit(main())
