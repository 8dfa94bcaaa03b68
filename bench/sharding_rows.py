"""The rows of bench/sharding.py: metrics of a timed batch (from a llmwatts server's DB or measured by the
baseline), their mean over the repeats, and the table."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path


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

