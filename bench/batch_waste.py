"""Would continuous batching pay? The share of decode work static batching spends on finished sequences.

A static batch decodes until its longest response is done; the rows that finished earlier still run every
step. Continuous batching (new requests join between decode steps) would fill those rows. This measures the
bound on what it can save for a real response-length distribution, on CPU: the reference responses of
Alpaca (``output``) and GSM8K (``answer``), tokenized with the server's tokenizer, +1 for the EOS token, capped
at ``--max-new-tokens``, shuffled into batches of each size. Per batch size it prints the static decode
steps per batch, the share of row-steps spent on finished rows, and the fewest steps perfect packing would
need (``ceil(total tokens / batch)``): the upper bound on the decode steps continuous batching saves. It
ignores prefill and treats every step as costing the same; in the fixed-length mode of the benchmarks
(``ignore_eos``) the waste is zero by construction.

Reference responses stand in for a trained LLaMA's (the random-weight presets never stop on EOS).

    python bench/batch_waste.py                            # ../shared/data or LLMWATTS_DATA_DIR
    python bench/batch_waste.py --data-dir DIR --batches 1,8,64
"""

import argparse
import json
import math
import random
import sys
from pathlib import Path

from llmwatts import paths
from llmwatts.loadgen.prompts import ALPACA_FILES, _find, _read_records

# The files the load generator reads (loadgen/prompts.py), and each record's reference response.
DATASETS = {"alpaca": (ALPACA_FILES, "output"), "gsm8k": (("gsm8k_test.jsonl",), "answer")}


def waste(lengths: list[int], batch: int, seed: int = 0) -> dict:
    """Static batching of ``lengths`` (decode steps each response needs) into full batches of ``batch``,
    in a seeded shuffle; the leftover partial batch is dropped."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    batches = [order[i:i + batch] for i in range(0, len(order) - batch + 1, batch)]
    if not batches:
        raise ValueError(f"{len(lengths)} responses do not fill one batch of {batch}")
    static = sum(max(b) for b in batches)
    useful = sum(sum(b) for b in batches)
    packed = math.ceil(useful / batch)
    return {"batch": batch, "batches": len(batches), "static_steps_per_batch": static / len(batches),
            "mean_tokens": useful / (batch * len(batches)), "finished_row_share": 1 - useful / (batch * static),
            "step_saving_bound": 1 - packed / static}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", help="folder with alpaca_5k.jsonl and gsm8k_test.jsonl (default: llmwatts' "
                                       "data folders, LLMWATTS_DATA_DIR first)")
    ap.add_argument("--datasets", default="alpaca,gsm8k")
    ap.add_argument("--batches", default="1,8,32,64,256")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from llmwatts.server.tokenizer import llama_like_tokenizer

    dirs = [Path(args.data_dir)] if args.data_dir else paths.data_dirs(None)
    tokenizer = llama_like_tokenizer()
    results = {"max_new_tokens": args.max_new_tokens, "rows": []}
    for name in [d for d in args.datasets.split(",") if d]:
        if name not in DATASETS:
            ap.error(f"unknown dataset {name!r}: use {','.join(DATASETS)}")
        files, field = DATASETS[name]
        path = _find(dirs, files)
        if path is None:
            print(f"error: {' or '.join(files)} not found in {', '.join(map(str, dirs))}", file=sys.stderr)
            return 2
        texts = [r[field] for r in _read_records(path)]
        lengths = [min(len(ids) + 1, args.max_new_tokens)  # + EOS; generation stops at the cap
                   for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for b in [int(x) for x in args.batches.split(",") if x]:
            try:
                row = {"dataset": name, "responses": len(lengths), **waste(lengths, b, args.seed)}
            except ValueError as e:
                print(f"error: {name}: {e}", file=sys.stderr)
                return 2
            results["rows"].append(row)
    print(f"\n| dataset | batch | mean tokens | static steps / batch | finished-row share | "
          f"continuous batching saves at most |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results["rows"]:
        print(f"| {r['dataset']} | {r['batch']} | {r['mean_tokens']:.1f} | {r['static_steps_per_batch']:.1f} | "
              f"{100 * r['finished_row_share']:.1f}% | {100 * r['step_saving_bound']:.1f}% of decode steps |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
