"""Per-run tables the views read that SQL alone does not give: percentiles (``run_percentiles``), the
steady-state span (``run_steady``) and idle power per GPU (``study_idle_power``).

The request pass (request_pass.py: DuckDB in a child process, or SQLite over the ``request_join`` view)
gives per-run totals (``run_request_totals``), the reconciliation's request ids (``run_request_flags``), the
per-request scatter (``run_request_points``) and the per-request columns as numpy arrays; percentiles and
steady spans are computed here from those arrays, grouped by run with one sort, and every percentile is
``llmwatts.stats.percentiles`` (numpy ``linear``), the project's one definition.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

import numpy as np

from llmwatts.analysis import request_pass, sample_reads
from llmwatts.stats import percentiles

if TYPE_CHECKING:  # annotations only: the request pass's child (request_pass.py) need not import it (nor the
    import sqlite_utils  # pandas it imports where installed)

PCTS = (50, 90, 95, 99)
# metric -> column of the request pass (ok rows only; request_pass.METRIC_EXPRS).
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
    totals = ", ".join(f"[{c}] {'REAL' if c in ('attributed_j', 'batch_j') else 'INTEGER'}"
                       for c in request_pass.TOTAL_COLUMNS)
    db.execute(f"CREATE TABLE IF NOT EXISTS run_request_totals (run_id TEXT PRIMARY KEY, {totals})")
    db.execute("CREATE TABLE IF NOT EXISTS run_request_flags (run_id TEXT, request_id TEXT, kind TEXT, seq INTEGER)")
    db.execute("CREATE TABLE IF NOT EXISTS run_request_points (run_id TEXT, e2e_ms REAL, energy_j REAL, seq INTEGER)")


def run_code(column: str) -> str:
    """SQL: the small integer code of the run id in ``column`` (``temp.run_codes``, made by ``fetch``)."""
    return f"(SELECT k.code FROM temp.run_codes k WHERE k.run_id IS {column})"


def _run_codes(db: sqlite_utils.Database) -> list[str]:
    """Number every run id of the requests (either side) 0.. in ``temp.run_codes``; the ids in code order.
    Rows then come back all numbers, so each chunk is one numpy array, not a Python object per value."""
    db.execute("DROP TABLE IF EXISTS temp.run_codes")
    db.execute("CREATE TEMP TABLE run_codes (run_id TEXT UNIQUE, code INTEGER)")
    db.execute("INSERT INTO temp.run_codes SELECT run_id, row_number() OVER () - 1 "
               "FROM (SELECT run_id FROM requests UNION SELECT run_id FROM client_requests)")
    return [r[0] for r in db.execute("SELECT run_id FROM temp.run_codes ORDER BY code")]


def fetch(db: sqlite_utils.Database, sql: str, names: list[str], params=()) -> tuple[list[str], dict]:
    """Rows of ``sql`` (first column a run code, ``run_code``; the rest numbers) as (run ids by code,
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


def _groups(codes: np.ndarray, mask: np.ndarray | None = None):
    """(code, index array into ``codes``) per run code, over the rows where ``mask`` holds (all rows without
    one), from one stable sort. Indexes, not copies of the masked arrays: a million-row copy of every column
    cost more than the summaries (issue 21)."""
    rows = np.flatnonzero(mask) if mask is not None else np.arange(codes.size)
    order = rows[np.argsort(codes[rows], kind="stable")]
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]) if order.size else []
    bounds = list(starts) + [order.size]
    for i in range(len(starts)):
        yield int(sorted_codes[bounds[i]]), order[bounds[i]:bounds[i + 1]]


def _summary(values: np.ndarray) -> list:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return [None] * 5 + [0]
    return [*percentiles(values, PCTS), float(values.mean()), int(values.size)]


def percentile_rows(runs: list, arrays: dict, gaps: tuple | None) -> dict[str, dict]:
    """Per run: p50/p90/p95/p99/mean/n of each ``METRICS`` entry over its counted requests (``arrays``:
    request_pass.COLUMNS by run code), ITL from ``gaps`` (run codes, every inter-chunk gap) when recorded."""
    names = [m for m, expr in METRICS.items() if expr]
    rows: dict[str, dict] = {}
    for code, idx in _groups(arrays["_code"], arrays["ok"] == 1):
        row = rows.setdefault(runs[code], {})
        for m in names:
            row.update(zip((f"{m}_{s}" for s in STATS), _summary(arrays[m][idx])))
        mean_ms, count = arrays["itl_mean_ms"][idx], arrays["itl_count"][idx]
        have = ~np.isnan(mean_ms) & ~np.isnan(count) & (count > 0)
        if have.any():  # every gap of the run pooled: sum of per-request means x counts over all gaps
            row["itl_ms_mean"] = float((mean_ms[have] * count[have]).sum() / count[have].sum())
            row["itl_ms_n"] = int(count[have].sum())
    if gaps is not None:  # exact ITL percentiles over every inter-chunk gap of ok streamed requests
        for code, idx in _groups(gaps[0]):
            rows.setdefault(runs[code], {}).update(zip((f"itl_ms_{s}" for s in STATS), _summary(gaps[1][idx])))
    return {run_id: row for run_id, row in rows.items() if run_id is not None}


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


def steady_spans(runs: list, arrays: dict, base_ns: int, targets: dict) -> dict[str, list]:
    """Per run: [target, begin_ns, end_ns, output tokens] of its steady-state span (``steady_span``; target =
    the run's load users, else the most requests ever in flight) and of the ok requests done inside it."""
    spans = {}
    for code, idx in _groups(arrays["_code"], arrays["has_server"] == 1):
        run_id = runs[code]
        received, done = arrays["received_ns"][idx], arrays["done_ns"][idx]
        target = targets.get(run_id) or _max_in_flight(received, done)
        span = steady_span(received, done, target)
        if span is None or run_id is None:
            continue
        inside = (done >= span[0]) & (done <= span[1]) & (arrays["ok"][idx] == 1)
        spans[run_id] = [float(target), span[0] + base_ns, span[1] + base_ns,
                         int(np.nansum(arrays["output_tokens"][idx][inside]))]
    return spans


def write_steady(db: sqlite_utils.Database, spans: dict[str, list]) -> None:
    """``run_steady``: each run's steady span, the telemetry energy inside it (per-GPU counter delta between the
    first and last sample in the span) and the output tokens of ok requests done inside it."""
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


def write_requests(db: sqlite_utils.Database, result: dict) -> None:
    """The request pass's tables: ``run_request_totals``, ``run_percentiles``, ``run_request_flags``,
    ``run_request_points`` (request_pass.summarise's dict)."""
    totals = ["run_id", *request_pass.TOTAL_COLUMNS]
    pcts = ["run_id"] + [f"{m}_{s}" for m in METRICS for s in STATS]
    with db.conn:
        for table in ("run_request_totals", "run_percentiles", "run_request_flags", "run_request_points"):
            db.execute(f"DELETE FROM {table}")
        db.conn.executemany(f"INSERT INTO run_request_totals VALUES ({', '.join('?' * len(totals))})",
                            [[run_id] + [row.get(c) for c in totals[1:]]
                             for run_id, row in result["totals"].items() if run_id is not None])
        db.conn.executemany(f"INSERT INTO run_percentiles ({', '.join(f'[{c}]' for c in pcts)}) "
                            f"VALUES ({', '.join('?' * len(pcts))})",
                            [[run_id] + [row.get(c) for c in pcts[1:]] for run_id, row in result["percentiles"].items()])
        db.conn.executemany("INSERT INTO run_request_flags VALUES (?, ?, ?, ?)",
                            [(*flag, i) for i, flag in enumerate(result["flags"])])
        db.conn.executemany("INSERT INTO run_request_points VALUES (?, ?, ?, ?)",
                            [(run_id, e2e_ms, energy_j, i) for run_id, (e2e, joules) in result["points"].items()
                             for i, (e2e_ms, energy_j) in enumerate(zip(e2e, joules))])


def request_pass_result(db: sqlite_utils.Database) -> dict:
    """The request pass (request_pass.py): DuckDB in a child process where it can, else SQLite here. A child
    the ingest started once the pass's tables were in (``db._request_pass_child``, ingest.py) is waited for
    instead of starting one."""
    started = getattr(db, "_request_pass_child", None)
    if started is not None:
        del db._request_pass_child
        result = started.result()
    else:
        db.conn.commit()  # the child reads what this connection wrote
        path = db.execute("PRAGMA database_list").fetchone()[2]
        result = request_pass.run_child(path) if path else None
    return result if result is not None else request_pass.sqlite_pass(db)


def refresh_requests(db: sqlite_utils.Database) -> None:
    """Totals, percentiles, reconciliation ids, scatter and steady spans from one request pass."""
    result = request_pass_result(db)
    write_requests(db, result)
    write_steady(db, result["spans"])


def refresh(db: sqlite_utils.Database) -> None:
    refresh_idle_power(db)
    refresh_requests(db)
