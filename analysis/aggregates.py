"""Per-run tables the views read that SQL alone does not give: percentiles (``run_percentiles``), the
steady-state span (``run_steady``) and idle power per GPU (``study_idle_power``).

Percentiles and steady spans come from one vectorised pass: the study's requests are read once from
``request_join_rows`` in chunks into numpy arrays (memory: ~70 bytes a request), grouped by run with one sort, and every
percentile is ``llmwatts.stats.percentiles`` (numpy ``linear``), the project's one definition.
"""

from __future__ import annotations

import gc

import numpy as np
import sqlite_utils

from llmwatts.analysis import sample_reads
from llmwatts.stats import percentiles

PCTS = (50, 90, 95, 99)
# metric -> SQL expression over request_join_rows (ok rows only).
METRICS = {
    "e2e_ms": "e2e_ms",
    "ttft_ms": "ttft_ms",
    "tpot_ms": "tpot_ms",
    "lag_ms": "lag_ms",
    "j_per_request": "energy_j",
    "j_per_output_token": "j_per_output_token",
    "itl_ms": None,  # from client_chunks, when recorded; else the pooled mean only
}
STATS = ("p50", "p90", "p95", "p99", "mean", "n")
FETCH_ROWS = 100_000
STEADY_FRACTION = 0.9  # steady state: in-flight requests at >= 90% of the run's target concurrency
IDLE_LOOKBACK_NS = 10_000_000_000  # idle power fallback: telemetry of the 10 s before a server's first run


def ensure_tables(db: sqlite_utils.Database) -> None:
    columns = ", ".join(f"[{m}_{s}] {'INTEGER' if s == 'n' else 'REAL'}" for m in METRICS for s in STATS)
    db.execute(f"CREATE TABLE IF NOT EXISTS run_percentiles (run_id TEXT PRIMARY KEY, {columns})")


def _run_code(column: str) -> str:
    """SQL: the small integer code of the run id in ``column`` (``temp.run_codes``, made by ``_run_codes``)."""
    return f"(SELECT k.code FROM temp.run_codes k WHERE k.run_id IS {column})"


def _run_codes(db: sqlite_utils.Database) -> list[str]:
    """Number every run id of the requests (either side) 0.. in ``temp.run_codes``; the ids in code order.
    Rows then come back all numbers, so each chunk is one numpy array, not a Python object per value."""
    db.execute("DROP TABLE IF EXISTS temp.run_codes")
    db.execute("CREATE TEMP TABLE run_codes (run_id TEXT UNIQUE, code INTEGER)")
    db.execute("INSERT INTO temp.run_codes SELECT run_id, row_number() OVER () - 1 "
               "FROM (SELECT run_id FROM requests UNION SELECT run_id FROM client_requests)")
    return [r[0] for r in db.execute("SELECT run_id FROM temp.run_codes ORDER BY code")]


def _fetch(db: sqlite_utils.Database, sql: str, names: list[str], params=()) -> tuple[list[str], dict]:
    """Rows of ``sql`` (first column a run code, ``_run_code``; the rest numbers) as (run ids by code,
    {name: float64 array, "_code": int32 array}). None reads as NaN."""
    runs = _run_codes(db)
    blocks: list[np.ndarray] = []
    cursor = db.execute(sql, params)
    collecting = gc.isenabled()
    gc.disable()  # a million row tuples, each freed at once: no cycles to find, but full collections to pay
    try:
        while chunk := cursor.fetchmany(FETCH_ROWS):
            blocks.append(np.array(chunk, dtype=np.float64))
    finally:
        if collecting:
            gc.enable()
    block = np.concatenate(blocks) if blocks else np.empty((0, len(names) + 1))
    arrays = {n: block[:, i + 1] for i, n in enumerate(names)}
    arrays["_code"] = block[:, 0].astype(np.int32)
    return runs, arrays


def _groups(codes: np.ndarray):
    """(code, index array) per run code, from one stable sort."""
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]) if codes.size else []
    bounds = list(starts) + [codes.size]
    for i in range(len(starts)):
        yield int(sorted_codes[bounds[i]]), order[bounds[i]:bounds[i + 1]]


def _summary(values: np.ndarray) -> list:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return [None] * 5 + [0]
    return [*percentiles(values, PCTS), float(values.mean()), int(values.size)]


def fetch_requests(db: sqlite_utils.Database) -> tuple[list[str], dict, int]:
    """The one pass: every request row of every run that is ok or reached a server, as arrays (times in ns
    since the study's first BeginRun, so float64 keeps every nanosecond). Returns (runs, arrays, base_ns)."""
    base_ns = db.execute("SELECT coalesce(min(begin_ns), 0) FROM runs").fetchone()[0]
    names = [m for m, expr in METRICS.items() if expr]
    columns = [METRICS[m] for m in names] + ["itl_mean_ms", "itl_count", "ok", "has_server", "output_tokens"]
    runs, arrays = _fetch(db, f"SELECT {_run_code('j.run_id')}, {', '.join(columns)}, received_ns - ?, done_ns - ? "
                              "FROM request_join_rows j WHERE ok OR has_server",
                          names + columns[len(names):] + ["received_ns", "done_ns"], [base_ns, base_ns])
    return runs, arrays, base_ns


def _subset(arrays: dict, mask: np.ndarray) -> dict:
    return {k: v[mask] for k, v in arrays.items()}


def refresh_percentiles(db: sqlite_utils.Database, fetched=None) -> None:
    """``run_percentiles``: p50/p90/p95/p99/mean/n of each ``METRICS`` entry over each run's ok requests."""
    names = [m for m, expr in METRICS.items() if expr]
    runs, arrays, _ = fetched or fetch_requests(db)
    arrays = _subset(arrays, arrays["ok"] == 1)
    rows: dict[str, dict] = {}
    for code, idx in _groups(arrays["_code"]):
        row = rows.setdefault(runs[code], {})
        for m in names:
            row.update(zip((f"{m}_{s}" for s in STATS), _summary(arrays[m][idx])))
        mean_ms, count = arrays["itl_mean_ms"][idx], arrays["itl_count"][idx]
        have = ~np.isnan(mean_ms) & ~np.isnan(count) & (count > 0)
        if have.any():  # every gap of the run pooled: sum of per-request means x counts over all gaps
            row["itl_ms_mean"] = float((mean_ms[have] * count[have]).sum() / count[have].sum())
            row["itl_ms_n"] = int(count[have].sum())
    _itl_from_chunks(db, rows)
    columns = ["run_id"] + [f"{m}_{s}" for m in METRICS for s in STATS]
    with db.conn:
        db.execute("DELETE FROM run_percentiles")
        db.conn.executemany(
            f"INSERT INTO run_percentiles ({', '.join(f'[{c}]' for c in columns)}) "
            f"VALUES ({', '.join('?' * len(columns))})",
            [[run_id] + [row.get(c) for c in columns[1:]] for run_id, row in rows.items()],
        )


def _itl_from_chunks(db: sqlite_utils.Database, rows: dict[str, dict]) -> None:
    """Exact ITL percentiles over every inter-chunk gap of ok streamed requests (``client_chunks``)."""
    if db.execute("SELECT 1 FROM client_chunks LIMIT 1").fetchone() is None:
        return
    runs, arrays = _fetch(db, f"""
        SELECT {_run_code('j.run_id')}, ch.elapsed_ms - lag(ch.elapsed_ms) OVER (PARTITION BY ch.request_id ORDER BY ch.chunk_index)
        FROM client_chunks ch JOIN request_join_rows j ON j.request_id = ch.request_id AND j.has_client AND j.ok
    """, ["gap_ms"])
    for code, idx in _groups(arrays["_code"]):
        rows.setdefault(runs[code], {}).update(
            zip((f"itl_ms_{s}" for s in STATS), _summary(arrays["gap_ms"][idx])))


def refresh_idle_power(db: sqlite_utils.Database) -> None:
    """``study_idle_power``: per GPU, the latest ``idle_power`` measurement a server (or the study runner)
    recorded before its first run; without one, the mean power of the GPU's telemetry in the 10 s before the
    server's first BeginRun (source says which)."""
    rows = db.execute("""
        SELECT i.server_id, i.gpu_uuid, i.power_mw, NULL, 'idle_power' FROM idle_power i
        WHERE i.begin_ns = (SELECT max(i2.begin_ns) FROM idle_power i2
                            WHERE i2.server_id = i.server_id AND i2.gpu_uuid = i.gpu_uuid)
          AND i.power_mw IS NOT NULL
    """).fetchall()
    measured = {(r[0], r[1]) for r in rows}
    ranges = {}
    for server_id, begin_ns in db.execute("SELECT server_id, min(begin_ns) FROM runs GROUP BY server_id").fetchall():
        for (gpu_uuid,) in db.execute("SELECT gpu_uuid FROM telemetry_gpus WHERE server_id = ?", [server_id]):
            if (server_id, gpu_uuid) not in measured and begin_ns is not None:
                ranges[(server_id, gpu_uuid)] = (begin_ns - IDLE_LOOKBACK_NS, begin_ns)
    for (server_id, gpu_uuid), (mean_mw, n) in sample_reads.mean_powers(db, ranges).items():
        rows.append((server_id, gpu_uuid, mean_mw, n, "telemetry before first run"))
    with db.conn:
        db.execute("DELETE FROM study_idle_power")
        db.conn.executemany("INSERT INTO study_idle_power VALUES (?, ?, ?, ?, ?)", rows)


def steady_span(received_ns: np.ndarray, done_ns: np.ndarray, target: float) -> tuple[int, int] | None:
    """The steady-state span of a run: from the first moment the count of requests in flight on the server
    (received, not yet done) reaches ``STEADY_FRACTION × target`` to the last moment it is still there.
    None when it never does (or ``target`` is unknown)."""
    keep = ~np.isnan(received_ns) & ~np.isnan(done_ns)
    if not keep.any() or not target or target <= 0:
        return None
    times = np.concatenate([received_ns[keep], done_ns[keep]])
    steps = np.concatenate([np.ones(keep.sum()), -np.ones(keep.sum())])
    order = np.lexsort((steps, times))  # at equal times a finish (-1) before a start: never over-count
    in_flight = np.cumsum(steps[order])
    times = times[order]
    above = in_flight >= STEADY_FRACTION * target
    if not above.any():
        return None
    first = int(np.argmax(above))
    last = len(above) - 1 - int(np.argmax(above[::-1]))  # the last step that left it above: it holds till the next
    end = times[last + 1] if last + 1 < len(times) else times[last]
    return int(times[first]), int(end)


def refresh_steady(db: sqlite_utils.Database, fetched=None) -> None:
    """``run_steady``: each run's steady-state span (``steady_span``; target = the run's load users, else
    the most requests ever in flight), the telemetry energy inside it (per-GPU counter delta between the
    first and last sample in the span) and the output tokens of ok requests done inside it."""
    targets = dict(db.execute("SELECT run_id, sum(users) FROM client_runs GROUP BY run_id").fetchall())
    runs, arrays, base_ns = fetched or fetch_requests(db)
    arrays = _subset(arrays, arrays["has_server"] == 1)
    spans = {}
    for code, idx in _groups(arrays["_code"]):
        run_id = runs[code]
        received, done = arrays["received_ns"][idx], arrays["done_ns"][idx]
        target = targets.get(run_id) or _max_in_flight(received, done)
        span = steady_span(received, done, target)
        if span is None:
            continue
        inside = (done >= span[0]) & (done <= span[1]) & (arrays["ok"][idx] == 1)
        spans[run_id] = (float(target), span[0] + base_ns, span[1] + base_ns,
                         int(np.nansum(arrays["output_tokens"][idx][inside])))
    energies = _span_energies(db, spans)
    rows = [(run_id, target, begin_ns, end_ns, energies.get(run_id), tokens)
            for run_id, (target, begin_ns, end_ns, tokens) in spans.items()]
    with db.conn:
        db.execute("DELETE FROM run_steady")
        db.conn.executemany("INSERT INTO run_steady VALUES (?, ?, ?, ?, ?, ?)", rows)


def _max_in_flight(received: np.ndarray, done: np.ndarray) -> float:
    keep = ~np.isnan(received) & ~np.isnan(done)
    times = np.concatenate([received[keep], done[keep]])
    steps = np.concatenate([np.ones(keep.sum()), -np.ones(keep.sum())])
    order = np.lexsort((steps, times))
    return float(np.cumsum(steps[order]).max()) if times.size else 0.0


def _span_energies(db: sqlite_utils.Database, spans: dict) -> dict[str, float | None]:
    """Per run, Σ over its servers' GPUs of the energy counter's rise between the first and the last sample
    inside the steady span (server clock), J (sample_reads.span_energies). A span unchanged since the last refresh
    keeps its energy (the server DB may be gone by then)."""
    known = {(r[0], r[1], r[2]): r[3] for r in db.execute("SELECT run_id, begin_ns, end_ns, energy_j FROM run_steady")}
    out, todo = {}, {}
    for run_id, (_, begin_ns, end_ns, _) in spans.items():
        if (run_id, begin_ns, end_ns) in known:
            out[run_id] = known[(run_id, begin_ns, end_ns)]
            continue
        for (server_id,) in db.execute("SELECT DISTINCT server_id FROM runs WHERE run_id = ?", [run_id]):
            todo[(run_id, server_id)] = (server_id, begin_ns, end_ns)
    for (run_id, _), energy_j in sample_reads.span_energies(db, todo).items():
        if energy_j is not None:
            out[run_id] = (out.get(run_id) or 0.0) + energy_j
    return out


def refresh(db: sqlite_utils.Database) -> None:
    refresh_idle_power(db)
    fetched = fetch_requests(db)
    refresh_percentiles(db, fetched)
    refresh_steady(db, fetched)
