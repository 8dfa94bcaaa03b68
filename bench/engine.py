"""Engine benchmark: throughput, energy per token and power of every engine, in one table.

Rows: raw transformers eager ``generate``; transformers static cache (``cache_implementation="static"``,
which makes ``generate`` compile itself); our fast engine in-process; the same engine through the gRPC
server (unary ``Generate``, fixed-length prompts). Columns: tok/s, J/token and W from the NVML energy
counter, read only at the start and end of each timed region (one read costs ~4 ms and the counter
refreshes every ~100 ms, so each region runs for at least ``--min-seconds``). Also: the batch-1
memory-bandwidth roofline (weights / measured copy bandwidth), the telemetry sampler's cost at 10 and
100 Hz (interleaved rounds, medians), the teacher-forced argmax agreement of the fast engine with eager's
token-by-token argmax (fp16, ``--agreement-seqs`` random sequences of 256 tokens; eager's own token-by-token
vs full-forward agreement beside it as the noise floor, and eager's logit gap at every disagreement),
and rows for fast-engine variants (``--variants bmm,flex``: decode attention as two matmuls, or as
FlexAttention over the whole cache; ``sdpa:64`` etc. also sets the window granularity), run last.
``--weights fp16,fp8`` adds the fast engine (and server) rows with fp8 weights, each further precision in
a process of its own (its model alone in GPU memory), labelled ``fast-fp8``, their last column against
fp16's, and fp8's accuracy cost: top-1 agreement and mean KL against the fp16 logits on a fixed token
set (``weights_accuracy.py``). A precision ``+kv8`` (``fp16+kv8``, ``fp8+kv8``) also keeps the KV cache in
e4m3 (``--kv-cache fp8``: decode reads it with its own Triton kernel), and adds the cache's own accuracy
cost: the teacher-forced argmax agreement of that engine with an fp16-cache engine on the same weights.

Read-only NVML only: no setter is ever called (shared GPUs).

    python bench/engine.py                      # llama-7b on cuda, everything (~9 min on an H100)
    python bench/engine.py --quick              # tiny on cpu: proves the script runs
    python bench/engine.py --engines fast,server --batches 1,64,256
    python bench/engine.py --engines fast --batches 1,64,320 --weights fp16,fp8 --variants '' --telemetry-hz ''
    python bench/engine.py --engines fast --batches 64 --weights fp16,fp8,fp8+kv8 --variants '' --telemetry-hz ''
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
from fixed_prompts import fixed_length_prompts
from nvml_energy import EnergyCounter
from agreement import AgreementCheck, fmt_gaps
from engine_report import print_report
from engine_timing import copy_bandwidth_bytes_s, timed
from weights_accuracy import against_fp16, fmt_accuracy, other_precision

from llmwatts.server.engine import WINDOW_SLOTS, BatchSpec, FastEngine, Sampling, check_decode_options

ENGINES = ("eager", "static", "fast", "server")
PRECISIONS = ("fp16", "fp8", "fp16+kv8", "fp8+kv8")  # weights, and +kv8: an fp8 KV cache too


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"subset of {','.join(ENGINES)}")
    ap.add_argument("--batches", default="1,8,32,64,128,256,320",
                    help="batch sizes for fast and server (320: the largest that fits llama-7b with 128 + 256 "
                         "tokens on an 80 GB H100)")
    ap.add_argument("--eager-batches", default="1,8,32,64,128")
    ap.add_argument("--static-batches", default="1,32", help="each size compiles afresh (~1 min)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--min-seconds", type=float, default=3.0, help="shortest timed region")
    ap.add_argument("--telemetry-hz", default="10,100", help="sampler rates to price ('' skips)")
    ap.add_argument("--telemetry-batch", type=int, default=1)
    ap.add_argument("--telemetry-rounds", type=int, default=3, help="interleaved rounds of (without, each rate)")
    ap.add_argument("--variants", default="bmm,flex",
                    help="fast-engine variants to also run: decode attention[:window slots], e.g. bmm,sdpa:64 "
                         "('' skips)")
    ap.add_argument("--variant-batches", default="1,64,256")
    ap.add_argument("--no-agreement", action="store_true", help="skip the teacher-forced argmax check")
    ap.add_argument("--agreement-seqs", type=int, default=4, help="random 256-token sequences it feeds")
    ap.add_argument("--weights", default="fp16",
                    help="weight precisions, comma-separated: fp16 and/or fp8 (an FP8 GPU; on --quick the CPU "
                         "reference); each after the first runs fast/server rows in its own process")
    ap.add_argument("--accuracy-seqs", type=int, default=4, help="256-token sequences for fp8's accuracy vs fp16")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="tiny on cpu, short: proves the script runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.device, args.prompt_tokens, args.new_tokens = "tiny", "cpu", 16, 8
        args.batches, args.eager_batches, args.static_batches = "1,4", "1,4", "1"
        args.min_seconds, args.telemetry_hz, args.telemetry_rounds = 0.2, "10", 1
        args.variant_batches, args.agreement_seqs = "1,4", 1
    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        ap.error(f"unknown engines {sorted(unknown)}: use {','.join(ENGINES)}")
    batches = [int(b) for b in args.batches.split(",") if b]
    precisions = [w for w in args.weights.split(",") if w]
    if not precisions or set(precisions) - set(PRECISIONS):
        ap.error(f"--weights takes some of {','.join(PRECISIONS)}, got {args.weights!r}")
    args.weights = precisions[0]
    results = run_bench(args, engines, batches)
    for precision in precisions[1:]:
        fast_rows = ",".join(e for e in engines if e in ("fast", "server")) or "fast"
        results["rows"] += other_precision(__file__, sys.argv[1:] if argv is None else argv, precision, fast_rows, results,
                                           args.json)
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


def run_bench(args, engines: list[str], batches: list[int]) -> dict:
    import grpc

    from llmwatts.server.config import ServerConfig
    from llmwatts.server.service import create_server
    from llmwatts.server.telemetry import TelemetrySampler
    from llmwatts.v1 import llmwatts_pb2 as pb
    from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

    device = torch.device(args.device)
    counter = EnergyCounter(device)
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": getattr(counter, "name", "cpu"),
               "model": args.model, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
               "torch": torch.__version__, "rows": [], "events": []}
    import transformers
    results["transformers"] = transformers.__version__

    def note(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
        results["events"].append(msg)
        if args.json:  # after every row, so a run cut short still leaves its numbers
            args.json.write_text(json.dumps(results, indent=2, default=str))

    t_load = time.perf_counter()
    db = Path(tempfile.mkdtemp()) / "bench.db"
    largest = max(batches + [1])
    weights, _, kv = args.weights.partition("+")
    weights = "fp8-reference" if weights == "fp8" and device.type == "cpu" else weights
    kv_cache = ("fp8-reference" if device.type == "cpu" else "fp8") if kv == "kv8" else "fp16"
    cfg = ServerConfig(model=args.model, device=args.device, engine="fast", weights=weights, kv_cache=kv_cache,
                       power_backend="nvml-readonly" if device.type == "cuda" else "simulated",
                       port=0, db_path=db, telemetry_hz=0, max_batch_size=max(largest, 256),
                       queue_size=8, cap_state_path=db.with_suffix(".caps.json"))
    srv, port = create_server(cfg)
    srv.start()
    host = srv.host
    model, engine, tokenizer = host.loaded.model, host.engine, host.loaded.tokenizer
    note(f"server up on port {port} with {args.model} in {time.perf_counter() - t_load:.1f} s "
         f"(engine {engine.name}, compiled {getattr(engine, 'compiled', None)})")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth_bytes_s(device)
    results.update(weight_bytes=weight_bytes, copy_bandwidth_bytes_s=bw, roofline_tok_s=bw / weight_bytes)
    note(f"weights {weight_bytes / 1e9:.2f} GB, copy bandwidth {bw / 1e12:.2f} TB/s, "
         f"batch-1 roofline {bw / weight_bytes:.1f} tok/s")
    texts, ids = fixed_length_prompts(tokenizer, args.prompt_tokens, largest)
    new = args.new_tokens

    def add(engine_name: str, batch: int, row: dict) -> None:
        if args.weights != "fp16":
            engine_name = f"{engine_name}-{args.weights}"
        row.update(engine=engine_name, batch=batch)
        results["rows"].append(row)
        note(f"{engine_name:>7} b={batch:<4} " + (row.get("error") or
             f"{row['tok_s']:9.1f} tok/s  {row.get('j_per_token', float('nan')):.4f} J/tok  "
             f"{row.get('watts', float('nan')):6.1f} W  ({row['runs']} runs, {row['seconds']:.1f} s)"))

    def guarded(engine_name: str, batch: int, fn, owner=None) -> None:
        try:
            add(engine_name, batch, fn())
        except torch.OutOfMemoryError as e:
            add(engine_name, batch, {"error": f"OOM ({str(e).splitlines()[0][:80]})"})
            (owner or engine).release()
            torch.cuda.empty_cache()
        except Exception as e:  # one failing row must not lose the rest of a paid GPU run
            add(engine_name, batch, {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})

    def fast_spec(b: int) -> BatchSpec:
        return BatchSpec([ids[i] for i in range(b)], [new] * b, Sampling(greedy=True), ignore_eos=True)

    if "fast" in engines:
        for b in batches:
            def fast_row(b=b):
                t0 = time.perf_counter()
                out = engine.generate(fast_spec(b))  # warm-up: captures this bucket's graphs
                assert all(len(t) == new for t in out.tokens)
                note(f"fast b={b}: warm-up (compile/capture) {time.perf_counter() - t0:.1f} s")
                return timed(lambda: engine.generate(fast_spec(b)), b * new, counter, device, args.min_seconds)
            guarded("fast", b, fast_row)

    if "server" in engines:
        stub = pb_grpc.InferenceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

        def call(b: int) -> None:
            r = stub.Generate(pb.GenerateRequest(
                request_id=uuid.uuid4().hex, run_id="bench", prompts=texts[:b], max_new_tokens=new,
                sampling=pb.SamplingParams(greedy=True), ignore_eos=True), timeout=600)
            assert len(r.completions) == b
        for b in batches:
            def server_row(b=b):
                call(b)
                return timed(lambda: call(b), b * new, counter, device, args.min_seconds)
            guarded("server", b, server_row)

    hz_list = [float(h) for h in args.telemetry_hz.split(",") if h]
    if "fast" in engines and hz_list:
        # Rounds of (without, each rate), interleaved so clock and thermal drift hit every rate alike;
        # the cost is the median over rounds of each rate's throughput against the median without.
        b, per_hz = args.telemetry_batch, {}
        engine.generate(fast_spec(b))  # untimed: the larger batches may have evicted this one's cache
        for _ in range(args.telemetry_rounds):
            for hz in [0.0] + hz_list:
                sampler = TelemetrySampler(host.gpus, host.store, hz) if hz else None
                if sampler:
                    sampler.start()
                try:
                    row = timed(lambda: engine.generate(fast_spec(b)), b * new, counter, device, args.min_seconds)
                finally:
                    if sampler:
                        sampler.stop()
                per_hz.setdefault(hz, []).append(row["tok_s"])
                note(f"telemetry {hz:g} Hz b={b}: {row['tok_s']:.1f} tok/s")
        base = statistics.median(per_hz[0.0])
        results["telemetry"] = [
            {"hz": hz, "batch": b, "tok_s": statistics.median(v), "runs_tok_s": v,
             "overhead_pct": 100.0 * (1 - statistics.median(v) / base),
             "spread_pct": 100.0 * (max(v) - min(v)) / statistics.median(v)} for hz, v in per_hz.items()]

    check = None
    if "fast" in engines and not args.no_agreement:
        try:
            engine.release()  # the fp32 copy of the model needs the caches' memory
            check = AgreementCheck(model, device, args.agreement_seqs)
            fast = check.record(results, "", engine)
            results["agreement_full_forward"] = check.rate(check.full, fast)
            # The noise floor of random weights in fp16: eager token by token vs eager's full forward.
            results["agreement_eager_incremental"] = check.rate(check.full, check.ref)
            results["agreement_eager_incremental_gaps"] = check.gaps(check.full)
            results["agreement_exact"] = {"fast": check.rate(check.exact, fast),
                                          "eager token-by-token": check.rate(check.exact, check.ref),
                                          "eager full forward": check.rate(check.exact, check.full)}
            note("argmax agreement with exact (fp32) arithmetic on the same weights: " + ", ".join(
                f"{k} {100 * v:.2f}%" for k, v in results["agreement_exact"].items()))
            note(f"teacher-forced argmax agreement over {check.positions} positions: fast vs eager token-by-token "
                 f"{100 * results['agreement']:.2f}%, fast vs eager full forward "
                 f"{100 * results['agreement_full_forward']:.2f}%, eager token-by-token vs eager full forward "
                 f"{100 * results['agreement_eager_incremental']:.2f}%; eager's logit gaps where fast differs "
                 f"{fmt_gaps(results['agreement_gaps'])}, where its full forward differs "
                 f"{fmt_gaps(results['agreement_eager_incremental_gaps'])}; median top-2 gap "
                 f"{results['agreement_median_top2_gap']:.3f}")
        except Exception as e:
            note(f"agreement check failed: {type(e).__name__}: {e}")

    if hasattr(engine, "release"):
        engine.release()

    def hf_ids(b: int):
        x = torch.tensor([ids[i] for i in range(b)], device=device)
        return x, torch.ones_like(x)

    def hf_generate(b: int, **kw):
        x, m = hf_ids(b)
        with torch.inference_mode():
            out = model.generate(input_ids=x, attention_mask=m, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id, **kw)
        assert out.shape[1] == x.shape[1] + new

    if "eager" in engines:
        for b in [int(x) for x in args.eager_batches.split(",") if x]:
            def eager_row(b=b):
                x, m = hf_ids(b)
                with torch.inference_mode():
                    model.generate(input_ids=x, attention_mask=m, max_new_tokens=2, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
                return timed(lambda: hf_generate(b), b * new, counter, device, args.min_seconds)
            guarded("eager", b, eager_row)
            torch.cuda.empty_cache() if device.type == "cuda" else None

    if "static" in engines and device.type == "cuda":
        for b in [int(x) for x in args.static_batches.split(",") if x]:
            def static_row(b=b):
                t0 = time.perf_counter()
                hf_generate(b, cache_implementation="static")  # compiles at this shape
                note(f"static b={b}: warm-up (compile) {time.perf_counter() - t0:.1f} s")
                return timed(lambda: hf_generate(b, cache_implementation="static"), b * new, counter, device,
                             args.min_seconds)
            guarded("static", b, static_row)
    # Variants last: a run cut short by its time limit keeps the baselines.
    if "fast" in engines and args.variants:
        for variant in (v for v in args.variants.split(",") if v):
            name = f"fast-{variant}"
            try:
                attention, window_slots = parse_variant(variant)
                alt = FastEngine(model, tokenizer.pad_token_id, engine.eos_id, device, host.loaded.context_length,
                                 attention=attention, window_slots=window_slots)
            except Exception as e:
                add(name, 0, {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
                continue
            for b in [int(x) for x in args.variant_batches.split(",") if x]:
                def variant_row(b=b):
                    alt.generate(fast_spec(b))  # warm-up: compile and capture
                    return timed(lambda: alt.generate(fast_spec(b)), b * new, counter, device, args.min_seconds)
                guarded(name, b, variant_row, owner=alt)
            if check is not None:
                try:
                    pred = check.record(results, f"_{variant}", alt)
                    results["agreement_exact"][f"fast-{variant}"] = check.rate(check.exact, pred)
                    note(f"{name}: teacher-forced agreement with eager token-by-token "
                         f"{100 * results[f'agreement_{variant}']:.2f}%; eager's logit gaps where it differs "
                         f"{fmt_gaps(results[f'agreement_{variant}_gaps'])}")
                except Exception as e:
                    note(f"{name} agreement check failed: {type(e).__name__}: {e}")
            alt.release()
            del alt

    if kv_cache != "fp16" and "fast" in engines:
        try:  # the fp8 cache's own cost, on these weights: its engine against an fp16-cache engine
            alt = FastEngine(model, tokenizer.pad_token_id, engine.eos_id, device, host.loaded.context_length)
            acc = kv_agreement(engine, alt, args.accuracy_seqs)
            alt.release()
            if kv_cache == "fp8":  # and the kernel against the same cache widened for SDPA: the same maths
                alt = FastEngine(model, tokenizer.pad_token_id, engine.eos_id, device, host.loaded.context_length,
                                 kv_cache="fp8-reference")
                acc["kernel_vs_widened"] = kv_agreement(engine, alt, args.accuracy_seqs)["top1_agreement"]
                alt.release()
            results["kv_accuracy"] = {args.weights: acc}
            note(f"{args.weights}: fp8 cache vs fp16 cache, teacher-forced argmax agreement "
                 f"{100 * acc['top1_agreement']:.2f}% over {acc['positions']} positions of random weights"
                 + (f"; the kernel vs the widened fp8 cache {100 * acc['kernel_vs_widened']:.2f}%"
                    if "kernel_vs_widened" in acc else ""))
        except Exception as e:
            note(f"kv accuracy check failed: {type(e).__name__}: {e}")
    if weights != "fp16" and "fast" in engines:  # the weights' own cost (a full forward: no KV cache)
        try:
            engine.release()
            precision = args.weights.partition("+")[0]
            results["weights_accuracy"] = {precision: against_fp16(args.model, device, model, args.accuracy_seqs)}
            note(f"{precision} weights vs fp16: {fmt_accuracy(results['weights_accuracy'][precision])}")
        except Exception as e:
            note(f"{args.weights} accuracy check failed: {type(e).__name__}: {e}")

    srv.stop(grace=1)
    return results


def kv_agreement(engine, reference, n_seqs: int, length: int = 256) -> dict:
    """Teacher-forced argmax (``FastEngine.teacher_forced_argmax``: prefill of the first token, then one
    decode step per token fed in, so every prediction reads the cache) of ``engine`` against
    ``reference`` on ``fixed_tokens``: the fraction of positions where they agree."""
    from weights_accuracy import fixed_tokens

    agree = total = 0
    for seq in fixed_tokens(n_seqs, length).tolist():
        a, b = engine.teacher_forced_argmax(seq), reference.teacher_forced_argmax(seq)
        agree += sum(x == y for x, y in zip(a, b))
        total += len(a)
    return {"positions": total, "top1_agreement": agree / total}


def parse_variant(variant: str) -> tuple[str, int]:
    """A fast-engine variant as the benches name it, decode attention[:window slots] ("bmm", "sdpa:64") ->
    (attention, window_slots), checked as the engine checks them; ValueError otherwise."""
    attention, _, slots = variant.partition(":")
    if slots and not slots.isdigit():
        raise ValueError(f"window slots must be a number, got {slots!r}")
    window_slots = int(slots or WINDOW_SLOTS)
    check_decode_options(attention, window_slots)
    return attention, window_slots



if __name__ == "__main__":
    sys.exit(main())
