"""Analysis at study scale (issue 21): `llmwatts report` (ingest + report) beside pandas and DuckDB doing
the same join and aggregates on the same synthetic server and client DBs, in one run, checking that all
agree on every compared number.

    python bench/analysis.py                       # the four studies: 10k/1M … 1M requests/10M samples
    python bench/analysis.py --studies 0,3         # only the smallest and the largest
    python bench/analysis.py --quick               # a tiny study, all methods (CPU test of this script)

Inputs are made by bench/analysis_study.py (the project's own schemas) into --data-dir and reused. Each
method runs in its own process, so its peak memory (VmHWM) is its own; llmwatts's request pass runs in a
child process of its own (analysis/request_pass.py): its CPU seconds count, its peak memory is added. pandas
and DuckDB are optional (`pip install pandas duckdb==1.5.5 duckdb-extension-sqlite==1.5.5`); a method that is not
installed is reported as such, never silently dropped. Results: docs/performance.md ("Analysis").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from analysis_study import BENCH_STUDIES, StudySpec, generate  # noqa: E402

from llmwatts.analysis.duck import peak_mib  # noqa: E402

# The numbers every method computes per run (names as in runs.csv).
COMPARED = ("requests_ok", "output_tokens", "output_words", "energy_total_j", "energy_busy_j", "j_per_token",
            "sm_pct_mean", "mem_pct_mean", "gpu_energy_min_j", "gpu_energy_max_j", "latency_p50_ms",
            "latency_p95_ms", "latency_p99_ms", "ttft_p50_ms", "ttft_p95_ms")
METHODS = ("llmwatts", "pandas", "duckdb-1", "duckdb-2")
QUICK = StudySpec(2_000, 20_000)


def _cpu_s() -> float:
    """CPU seconds of this process (every thread) and of its children that ended (llmwatts runs its request
    pass in a child process: its CPU counts too)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _peak_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and
    exec, so a child would report at least its parent's peak (the study generator's arrays)."""
    return peak_mib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_llmwatts(server_db: Path, client_db: Path, work: Path) -> dict:
    from llmwatts.analysis.ingest import ingest
    from llmwatts.analysis.report import build_report
    from rich.console import Console

    study = work / "study.db"
    ingest(study, [server_db], [client_db])
    result = build_report(study, work / "report", console=Console(file=open(os.devnull, "w")))
    return {r["run_id"]: {k: r[k] for k in COMPARED} for r in result.runs}


def run_pandas(server_db: Path, client_db: Path, work: Path) -> dict:
    import sqlite3

    import numpy as np
    import pandas as pd

    server, client = sqlite3.connect(server_db), sqlite3.connect(client_db)
    runs = pd.read_sql("SELECT run_id, server_id, begin_ns, end_ns, begin_energy_j, end_energy_j FROM runs", server)
    reqs = pd.read_sql("SELECT request_id, server_id, batch_id, status, n_prompts, output_tokens FROM requests",
                       server)
    batches = pd.read_sql("SELECT server_id, batch_id, energy_j FROM batches", server)
    cli = pd.read_sql("SELECT request_id, run_id, status, output_words, latency_ms, ttft_ms FROM client_requests",
                      client)
    tel = pd.read_sql("SELECT server_id, gpu_uuid, ts_ns, energy_mj, sm_pct, mem_pct FROM telemetry", server)
    joined = cli.merge(reqs, on="request_id", how="left", suffixes=("_c", "_s"))
    ok = joined[(joined.status_c.str.lower() == "ok") & (joined.status_s.str.lower() == "ok")]
    out = {}
    for run in runs.itertuples():
        rows = ok[ok.run_id == run.run_id]
        served = joined[(joined.run_id == run.run_id) & joined.batch_id.notna()]
        keys = served[["server_id", "batch_id"]].drop_duplicates()
        busy = keys.merge(batches, on=["server_id", "batch_id"]).energy_j.sum()
        window = tel[(tel.server_id == run.server_id) & tel.ts_ns.between(run.begin_ns, run.end_ns)]
        window = window.sort_values(["gpu_uuid", "ts_ns"])
        by_gpu = window.groupby("gpu_uuid").energy_mj
        gpu_j = (by_gpu.last() - by_gpu.first()) / 1000
        energy = run.end_energy_j - run.begin_energy_j
        tokens = int(rows.output_tokens.sum())
        lat = rows.latency_ms.dropna().to_numpy()
        ttft = rows.ttft_ms.dropna().to_numpy()
        out[run.run_id] = {
            "requests_ok": len(rows), "output_tokens": tokens, "output_words": int(rows.output_words.sum()),
            "energy_total_j": energy, "energy_busy_j": float(busy), "j_per_token": energy / tokens,
            "sm_pct_mean": float(window.sm_pct.mean()), "mem_pct_mean": float(window.mem_pct.mean()),
            "gpu_energy_min_j": float(gpu_j.min()), "gpu_energy_max_j": float(gpu_j.max()),
            **{f"latency_p{p}_ms": float(np.percentile(lat, p)) for p in (50, 95, 99)},
            **{f"ttft_p{p}_ms": float(np.percentile(ttft, p)) for p in (50, 95)},
        }
    return out


def _duckdb(threads: int):
    import duckdb
    import duckdb_extension_sqlite

    # The wheel's extension file is named for DuckDB's repository; LOAD wants the name it was built as.
    ext = next(Path(duckdb_extension_sqlite.__file__).parent.glob("extensions/*/sqlite.duckdb_extension"))
    folder = Path(tempfile.mkdtemp())
    shutil.copy(ext, folder / "sqlite_scanner.duckdb_extension")
    conn = duckdb.connect(config={"allow_unsigned_extensions": "true", "threads": threads})
    conn.execute(f"LOAD '{folder / 'sqlite_scanner.duckdb_extension'}'")
    return conn


def run_duckdb(server_db: Path, client_db: Path, work: Path, threads: int) -> dict:
    conn = _duckdb(threads)
    conn.execute(f"ATTACH '{server_db}' AS s (TYPE sqlite, READ_ONLY)")
    conn.execute(f"ATTACH '{client_db}' AS c (TYPE sqlite, READ_ONLY)")
    rows = conn.execute("""
        WITH ok AS (
          SELECT cr.run_id, r.output_tokens, cr.output_words, cr.latency_ms, cr.ttft_ms
          FROM c.client_requests cr JOIN s.requests r ON r.request_id = cr.request_id
          WHERE lower(cr.status) = 'ok' AND lower(r.status) = 'ok'),
        req AS (
          SELECT run_id, count(*) AS n, sum(output_tokens) AS tokens, sum(output_words) AS words,
            quantile_cont(latency_ms, [0.5, 0.95, 0.99]) AS lat, quantile_cont(ttft_ms, [0.5, 0.95]) AS ttft
          FROM ok GROUP BY run_id),
        busy AS (
          SELECT k.run_id, sum(b.energy_j) AS busy_j
          FROM (SELECT DISTINCT cr.run_id, r.server_id, r.batch_id FROM c.client_requests cr
                JOIN s.requests r ON r.request_id = cr.request_id WHERE r.batch_id IS NOT NULL) k
          JOIN s.batches b ON b.server_id = k.server_id AND b.batch_id = k.batch_id GROUP BY k.run_id),
        gpu AS (
          SELECT w.run_id, t.gpu_uuid, (arg_max(t.energy_mj, t.ts_ns) - arg_min(t.energy_mj, t.ts_ns)) / 1000.0 AS j,
            sum(t.sm_pct) AS sm, count(t.sm_pct) AS sm_n, sum(t.mem_pct) AS mem, count(t.mem_pct) AS mem_n
          FROM s.runs w JOIN s.telemetry t ON t.server_id = w.server_id AND t.ts_ns BETWEEN w.begin_ns AND w.end_ns
          GROUP BY w.run_id, t.gpu_uuid),
        tel AS (
          SELECT run_id, sum(sm) / sum(sm_n) AS sm, sum(mem) / sum(mem_n) AS mem, min(j) AS jmin, max(j) AS jmax
          FROM gpu GROUP BY run_id)
        SELECT w.run_id, req.n, req.tokens, req.words, w.end_energy_j - w.begin_energy_j, busy.busy_j,
          tel.sm, tel.mem, tel.jmin, tel.jmax, req.lat, req.ttft
        FROM s.runs w JOIN req ON req.run_id = w.run_id JOIN busy ON busy.run_id = w.run_id
        JOIN tel ON tel.run_id = w.run_id
    """).fetchall()
    out = {}
    for run_id, n, tokens, words, energy, busy, sm, mem, jmin, jmax, lat, ttft in rows:
        out[run_id] = {
            "requests_ok": n, "output_tokens": int(tokens), "output_words": int(words), "energy_total_j": energy,
            "energy_busy_j": busy, "j_per_token": energy / tokens, "sm_pct_mean": sm, "mem_pct_mean": mem,
            "gpu_energy_min_j": jmin, "gpu_energy_max_j": jmax, "latency_p50_ms": lat[0], "latency_p95_ms": lat[1],
            "latency_p99_ms": lat[2], "ttft_p50_ms": ttft[0], "ttft_p95_ms": ttft[1],
        }
    return out


def run_one(method: str, server_db: Path, client_db: Path) -> dict:
    """One method in this process: {"seconds", "peak_mib", "runs"} or {"missing": why}."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-analysis-{method}-"))
    try:
        start, cpu = time.perf_counter(), _cpu_s()
        if method == "llmwatts":
            runs = run_llmwatts(server_db, client_db, work)
        elif method == "pandas":
            runs = run_pandas(server_db, client_db, work)
        else:
            runs = run_duckdb(server_db, client_db, work, int(method.split("-")[1]))
        # Peak memory: this process's plus its largest child of each kind, the telemetry buckets' and the request
        # pass's (an upper bound: in a new study DB the two may run at the same time, ingest.py).
        from llmwatts.analysis.bucket_prefetch import CHILD_PEAKS_MIB as BUCKET_PEAKS_MIB
        from llmwatts.analysis.request_pass import CHILD_PEAKS_MIB as PASS_PEAKS_MIB

        children = max(BUCKET_PEAKS_MIB, default=0.0) + max(PASS_PEAKS_MIB, default=0.0)
        return {"seconds": time.perf_counter() - start, "cpu_s": _cpu_s() - cpu,
                "peak_mib": _peak_mib() + children, "runs": runs}
    except ImportError as e:
        return {"missing": f"{e.name or e} not installed"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _spawn(method: str, server_db: Path, client_db: Path, timeout_s: float) -> dict:
    cmd = [sys.executable, __file__, "--one", method, str(server_db), str(client_db)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"missing": f"did not finish in {timeout_s:.0f} s"}
    if done.returncode != 0:
        return {"missing": f"failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def disagreements(reference: dict, other: dict, rel: float = 1e-9) -> list[str]:
    """Every (run, number) where ``other`` differs from ``reference`` beyond ``rel`` (relative)."""
    out = []
    for run_id, numbers in reference.items():
        mine = other.get(run_id)
        if mine is None:
            out.append(f"{run_id}: missing")
            continue
        for key in COMPARED:
            a, b = numbers.get(key), mine.get(key)
            if a is None or b is None or not math.isclose(a, b, rel_tol=rel, abs_tol=1e-9):
                out.append(f"{run_id} {key}: {a} vs {b}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "llmwatts-bench-analysis"))
    parser.add_argument("--studies", default="0,1,2,3", help="indexes into the four bench studies")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--quick", action="store_true", help="one tiny study (a CPU check of this script)")
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "SERVER_DB", "CLIENT_DB"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], Path(args.one[1]), Path(args.one[2]))))
        return 0
    specs = [QUICK] if args.quick else [BENCH_STUDIES[int(i)] for i in args.studies.split(",")]
    methods = args.methods.split(",")
    results, failed = [], False
    print(f"| study | {' | '.join(methods)} | agree |")
    print("|---|" + "---|" * (len(methods) + 1))
    for spec in specs:
        server_db, client_db = generate(spec, Path(args.data_dir) / spec.name)
        row = {m: _spawn(m, server_db, client_db, args.timeout_s) for m in methods}
        reference = next((row[m]["runs"] for m in ("pandas", "duckdb-1", "duckdb-2", "llmwatts")
                          if m in row and "runs" in row[m]), {})
        problems = {m: disagreements(reference, r["runs"]) for m, r in row.items() if "runs" in r}
        failed |= any(problems.values())
        # wall s (CPU s of every thread: on a shared box the steadier of the two), peak memory
        cells = [f"{r['seconds']:.1f} s (cpu {r['cpu_s']:.1f} s), {r['peak_mib']:.0f} MiB" if "runs" in r else r["missing"]
                 for r in row.values()]
        agree = "yes" if not any(problems.values()) else "; ".join(f"{m}: {p[:3]}" for m, p in problems.items() if p)
        print(f"| {spec.requests:,} requests, {spec.samples:,} samples | {' | '.join(cells)} | {agree} |", flush=True)
        results.append({"study": spec.name, "results": {m: {k: v for k, v in r.items() if k != "runs"}
                                                        for m, r in row.items()}, "problems": problems})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
