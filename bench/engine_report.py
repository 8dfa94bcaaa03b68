"""bench/engine.py's report: the table of every engine's rows, the roofline, the telemetry sampler's cost,
the argmax agreement, fp8's accuracy, and the targets."""

from agreement import fmt_gaps
from weights_accuracy import fmt_accuracy

TARGETS = "≥160 tok/s @1; ≥3,500 tok/s @32; ≤0.10 J/tok @64; ≤0.06 J/tok @largest; server ≤3% below fast; telemetry ≤1%"


FP8_TARGETS = "fast-fp8 ≥1.5× fast's tok/s @1 (last column ≥150%); ≤0.07 J/tok @64"


def print_report(results: dict) -> None:
    print()
    print(f"# {results['model']} on {results['device']}, {results['prompt_tokens']} prompt + "
          f"{results['new_tokens']} new tokens, greedy fixed length; torch {results['torch']}, "
          f"transformers {results['transformers']}; {results['date']}")
    rows = results["rows"]
    fast = {r["batch"]: r for r in rows if r["engine"] == "fast" and "tok_s" in r}
    print()
    print("| engine | batch | tok/s | J/token | W | % of fast in-process |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | {r['batch']} | {r['error']} | | | |")
            continue
        rel = f"{100 * r['tok_s'] / fast[r['batch']]['tok_s']:.1f}%" if r["batch"] in fast else ""
        j = f"{r['j_per_token']:.4f}" if "j_per_token" in r else "-"
        w = f"{r['watts']:.0f}" if "watts" in r else "-"
        print(f"| {r['engine']} | {r['batch']} | {r['tok_s']:.1f} | {j} | {w} | {rel} |")
    roof = results.get("roofline_tok_s")
    if roof and roof == roof and 1 in fast:
        print(f"\nbatch-1 roofline: {results['weight_bytes'] / 1e9:.2f} GB weights / "
              f"{results['copy_bandwidth_bytes_s'] / 1e12:.2f} TB/s copy = {roof:.1f} tok/s; "
              f"fast engine at {100 * fast[1]['tok_s'] / roof:.1f}% of it")
    for t in results.get("telemetry", []):
        runs = ", ".join(f"{x:.1f}" for x in t["runs_tok_s"])
        print(f"telemetry sampler {t['hz']:g} Hz, batch {t['batch']}: median {t['tok_s']:.1f} tok/s of [{runs}] "
              f"({t['overhead_pct']:+.2f}% vs without; spread {t['spread_pct']:.1f}%)")
    if "agreement" in results:
        known = ("agreement_full_forward", "agreement_eager_incremental", "agreement_positions",
                 "agreement_median_top2_gap", "agreement_exact")
        variants = [(k.removeprefix("agreement_"), v, results[f"{k}_gaps"]) for k, v in results.items()
                    if k.startswith("agreement_") and k not in known and not k.endswith("_gaps")]
        print(f"teacher-forced argmax agreement with eager token-by-token ({results['agreement_positions']} "
              f"positions): {100 * results['agreement']:.2f}% (eager's logit gaps where it differs: "
              f"{fmt_gaps(results['agreement_gaps'])}); vs eager full forward "
              f"{100 * results['agreement_full_forward']:.2f}%; eager token-by-token vs full forward (the fp16 "
              f"noise floor) {100 * results['agreement_eager_incremental']:.2f}% (gaps "
              f"{fmt_gaps(results['agreement_eager_incremental_gaps'])}); median top-2 gap "
              f"{results['agreement_median_top2_gap']:.3f}"
              + "".join(f"; {name} variant {100 * v:.2f}% (gaps {fmt_gaps(g)})" for name, v, g in variants))
        if "agreement_exact" in results:
            print("argmax agreement with exact (fp32) arithmetic on the same weights: " + ", ".join(
                f"{k} {100 * v:.2f}%" for k, v in results["agreement_exact"].items()))
    for precision, a in results.get("weights_accuracy", {}).items():
        print(f"{precision} weights vs fp16 logits: {fmt_accuracy(a)} (random weights say little about real quality)")
    for precision, a in results.get("kv_accuracy", {}).items():
        print(f"{precision}: fp8 KV cache vs fp16 KV cache on the same weights, teacher-forced argmax agreement "
              f"{100 * a['top1_agreement']:.2f}% over {a['positions']} positions (random weights: near-tied logits)"
              + (f"; decode kernel vs the same cache widened for SDPA {100 * a['kernel_vs_widened']:.2f}%"
                 if "kernel_vs_widened" in a else ""))
    if results.get("weights_accuracy"):
        print(f"fp8 targets: {FP8_TARGETS}")
    print(f"targets: {TARGETS}")

