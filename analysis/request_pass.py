"""The one pass over a study's requests (issue 21): the client-to-server join, per-run totals and
reconciliation counts, and the per-request columns the numpy summaries need (aggregates.py).

The join is the ``request_join`` view's (views.py). Two engines run it, with the same aggregate SQL:

- DuckDB (the ``[analysis]`` extra), reading the study DB through its ``sqlite`` extension **in a child
  process** (``python -m llmwatts.analysis.request_pass STUDY_DB [NICENESS]``): DuckDB links its own SQLite, and two
  SQLite libraries must never have one file open in one process (closing either drops the other's POSIX
  locks: https://sqlite.org/howtocorrupt.html#_multiple_copies_of_sqlite_linked_into_the_same_application).
  The child prints its results as JSON; this process writes them (aggregates.py). At a million requests
  the join, totals and columns take ~2 s against ~18 s in SQLite (docs/performance.md).
- SQLite, in this process, over the ``request_join`` view itself: without DuckDB, when the child fails, and
  in the tests that check one engine against the other.

Both hand the same numbers to the same numpy code (percentiles: ``llmwatts.stats``, numpy ``linear``).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from llmwatts.analysis import duck

# The per-request values both dialects of the join select alike (views.REQUEST_JOIN_ROWS, JOIN_DUCKDB).
REQUEST_VALUES = """r.received_ns AS received_ns, r.done_ns AS done_ns, r.batch_id AS batch_id,
  r.n_prompts AS n_prompts, r.output_tokens AS output_tokens, c.output_words AS output_words,
  c.latency_ms AS e2e_ms, c.ttft_ms AS ttft_ms, c.tpot_ms AS tpot_ms,
  c.itl_count AS itl_count, c.itl_mean_ms AS itl_mean_ms,
  (c.client_send_ns - c.scheduled_send_ns) / 1e6 AS lag_ms,
  r.energy_j AS energy_j, r.energy_j / nullif(r.output_tokens, 0) AS j_per_output_token"""
# The request_join view in DuckDB's dialect over the study DB attached as ``s``: the same rows and values
# (flags as 0/1 integers, NULL where SQLite gives NULL); correlated subqueries written as joins. The two big
# tables are read once each into DuckDB (``c``, ``r``: the columns used; reading through the sqlite extension
# is most of the pass's time) and joined there.
READ_DUCKDB = (
    "CREATE TEMP TABLE c AS SELECT request_id, run_id, status, client_send_ns, client_clock_offset_ns, "
    "scheduled_send_ns, output_words, latency_ms, ttft_ms, tpot_ms, itl_count, itl_mean_ms FROM s.client_requests",
    "CREATE TEMP TABLE r AS SELECT request_id, run_id, server_id, status, received_ns, done_ns, batch_id, n_prompts, "
    "output_tokens, energy_j FROM s.requests",
)
# Request ids several servers answered (``dups``): none where every row names one server (the study key is
# (request_id, server_id)), and then the GROUP BY over every request id is skipped (~0.15 s at 1M requests).
DUPS = "SELECT request_id, count(*) AS n FROM r GROUP BY request_id HAVING count(*) > 1"
NO_DUPS = "SELECT request_id, 0 AS n FROM r WHERE false"
ONE_SERVER = "SELECT count(*) = count(server_id) AND coalesce(min(server_id) = max(server_id), true) FROM r"
JOIN_DUCKDB = f"""
WITH dups AS ({{dups}}),
client_runs AS (SELECT DISTINCT run_id FROM s.client_runs),
rows AS (
  SELECT c.run_id AS run_id, c.request_id AS request_id, r.server_id AS server_id, 1 AS has_client,
    CAST(r.request_id IS NOT NULL AS INTEGER) AS has_server,
    coalesce(d.n, CAST(r.request_id IS NOT NULL AS INTEGER)) AS server_rows,
    c.status AS client_status, r.status AS server_status,
    coalesce(CAST(lower(r.status) = 'ok' AND lower(c.status) = 'ok' AS INTEGER), 0) AS ok,
    c.client_send_ns + c.client_clock_offset_ns AS send_server_ns,
    {REQUEST_VALUES},
    CAST(w.begin_ns IS NOT NULL AND (c.client_send_ns + c.client_clock_offset_ns < w.begin_ns
      OR (w.end_ns IS NOT NULL AND c.client_send_ns + c.client_clock_offset_ns > w.end_ns)) AS INTEGER)
      AS outside_window,
    coalesce(CAST(r.done_ns > w.end_ns AS INTEGER), 0) AS done_after_window
  FROM c
  LEFT JOIN r ON r.request_id = c.request_id
  LEFT JOIN s.runs w ON w.server_id = r.server_id AND w.run_id = c.run_id
  LEFT JOIN dups d ON d.request_id = c.request_id
  UNION ALL
  SELECT r.run_id, r.request_id, r.server_id, 0, 1, NULL, NULL, r.status,
    CAST(lower(r.status) = 'ok' AND cr.run_id IS NULL AS INTEGER),
    NULL, r.received_ns, r.done_ns, r.batch_id, r.n_prompts, r.output_tokens, NULL,
    NULL, NULL, NULL, NULL, NULL, NULL, r.energy_j, r.energy_j / nullif(r.output_tokens, 0), 0,
    coalesce(CAST(r.done_ns > w.end_ns AS INTEGER), 0)
  FROM r
  LEFT JOIN s.runs w ON w.server_id = r.server_id AND w.run_id = r.run_id
  LEFT JOIN client_runs cr ON cr.run_id = r.run_id
  LEFT JOIN c ON c.request_id = r.request_id  -- at most one: request_id is client_requests' study key
  WHERE r.run_id IS NOT NULL AND NOT coalesce(c.run_id = r.run_id, false)
)
SELECT j.*, coalesce(CAST(j.ok = 1 AND (o.ttft_ms IS NULL OR j.ttft_ms <= o.ttft_ms)
    AND (o.tpot_ms IS NULL OR j.tpot_ms <= o.tpot_ms) AND (o.e2e_ms IS NULL OR j.e2e_ms <= o.e2e_ms) AS INTEGER), 0)
  AS good
FROM rows j LEFT JOIN s.run_slo o ON o.run_id = j.run_id
"""

# Per-run totals and reconciliation counts over a relation {j} with the request_join view's columns (flags
# 0/1), and the batch joules of the run's batches ({src}: the schema holding ``batches``). Same text in both
# engines. done_after_window: how many requests (reconciliation); done_after_window_any: whether any (flag).
# client_sent: distinct client requests; a client row is one row of {j} unless several servers answered it
# (server_rows > 1), so only those are counted DISTINCT (over a million request ids: 0.38 -> 0.18 s in DuckDB).
TOTALS = """
SELECT run_id,
  sum(has_server) AS server_rows, sum(ok) AS requests_ok,
  sum(has_client AND NOT has_server) AS requests_refused,
  sum(CASE WHEN ok THEN n_prompts ELSE 0 END) AS responses,
  sum(CASE WHEN ok THEN output_tokens ELSE 0 END) AS output_tokens,
  sum(CASE WHEN ok THEN output_words ELSE 0 END) AS output_words,
  sum(has_client) AS client_rows, sum(good) AS good_requests,
  sum(CASE WHEN good THEN output_tokens ELSE 0 END) AS good_output_tokens,
  coalesce(sum(CASE WHEN has_server THEN energy_j END), 0.0) AS attributed_j,
  max(done_after_window) AS done_after_window_any,
  sum(has_client AND server_rows <= 1 AND request_id IS NOT NULL)
    + count(DISTINCT CASE WHEN has_client AND server_rows > 1 THEN request_id END) AS client_sent,
  sum(has_client AND server_rows = 1 AND lower(server_status) = 'ok') AS server_ok,
  sum(has_client AND server_rows = 1 AND lower(server_status) <> 'ok') AS server_error,
  sum(has_client AND server_rows = 0) AS missing,
  count(DISTINCT CASE WHEN has_client AND server_rows > 1 THEN request_id END) AS duplicated,
  sum(NOT has_client) AS server_only,
  coalesce(sum(CASE WHEN has_client AND server_rows = 1 THEN outside_window END), 0) AS outside_window,
  sum(has_server AND ok = 0 AND lower(server_status) = 'ok') AS status_mismatch,
  coalesce(sum(done_after_window), 0) AS done_after_window
FROM {j} GROUP BY run_id
"""
BUSY = """
SELECT k.run_id, sum(b.energy_j) AS batch_j, max(b.simulated) AS batch_simulated
FROM (SELECT DISTINCT run_id, server_id, batch_id FROM {j} WHERE has_server AND batch_id IS NOT NULL) k
JOIN {src}batches b ON b.server_id = k.server_id AND b.batch_id = k.batch_id
GROUP BY k.run_id
"""
TOTAL_COLUMNS = ("server_rows", "requests_ok", "requests_refused", "responses", "output_tokens", "output_words",
                 "client_rows", "good_requests", "good_output_tokens", "attributed_j", "done_after_window_any",
                 "client_sent", "server_ok", "server_error", "missing", "duplicated", "server_only",
                 "outside_window", "status_mismatch", "done_after_window", "batch_j", "batch_simulated")
# Request ids the reconciliation names (few): client rows found on no server or on several, server rows no
# client row claims, and client rows sent outside their server's window.
FLAGS = """
SELECT run_id, request_id, CASE WHEN NOT has_client THEN 'server_only'
  WHEN server_rows = 0 THEN 'missing' WHEN server_rows > 1 THEN 'duplicated' ELSE 'outside' END AS kind
FROM {j}
WHERE NOT has_client OR server_rows <> 1 OR (server_rows = 1 AND outside_window)
ORDER BY coalesce(send_server_ns, received_ns), request_id
"""
# The per-request scatter (report_plots.request_energy): each run's counted requests with a latency and
# joules, in client send order, every k-th where a run has more than MAX_POINTS (k = ceil(n / MAX_POINTS)).
MAX_POINTS = 20_000
POINTS = """
SELECT run_id, e2e_ms, energy_j FROM (
  SELECT run_id, e2e_ms, energy_j,
    row_number() OVER (PARTITION BY run_id ORDER BY send_server_ns, request_id) - 1 AS i,
    count(*) OVER (PARTITION BY run_id) AS n
  FROM {j} WHERE ok AND e2e_ms IS NOT NULL AND energy_j IS NOT NULL)
WHERE i % ((n + {max_points} - 1) {div} {max_points}) = 0
ORDER BY run_id, i
"""
# Per-request numbers the numpy summaries read: every request that is counted or reached a server.
METRIC_EXPRS = {"e2e_ms": "e2e_ms", "ttft_ms": "ttft_ms", "tpot_ms": "tpot_ms", "lag_ms": "lag_ms",
                "j_per_request": "energy_j", "j_per_output_token": "j_per_output_token"}
COLUMNS = {**METRIC_EXPRS, "itl_mean_ms": "itl_mean_ms", "itl_count": "itl_count", "ok": "ok",
           "has_server": "has_server", "output_tokens": "output_tokens",
           "received_ns": "received_ns - {base}", "done_ns": "done_ns - {base}"}
# Every inter-chunk gap of the counted streamed requests (exact ITL percentiles).
CHUNK_GAPS = """
SELECT k.code AS code, ch.elapsed_ms - lag(ch.elapsed_ms) OVER (PARTITION BY ch.request_id ORDER BY ch.chunk_index)
  AS gap_ms
FROM {src}client_chunks ch JOIN {j} j ON j.request_id = ch.request_id AND j.has_client AND j.ok
JOIN {codes} k ON k.run_id {same} j.run_id
"""


def _totals(rows: list[tuple], names: list[str], busy: list[tuple]) -> dict[str, dict]:
    out = {r[0]: {**dict(zip(names[1:], r[1:])), "batch_j": None, "batch_simulated": None} for r in rows}
    for run_id, batch_j, simulated in busy:
        out.setdefault(run_id, {c: None for c in TOTAL_COLUMNS}).update(batch_j=batch_j, batch_simulated=simulated)
    return {run_id: {c: (int(v) if isinstance(v, bool) else v) for c, v in row.items()}
            for run_id, row in out.items() if run_id is not None}


def _masked(values) -> np.ndarray:
    """A DuckDB column as float64, NULL as NaN."""
    return np.ma.filled(np.ma.asarray(values).astype(np.float64), np.nan)


# DuckDB's memory in the pass (MiB), beyond which its join and sorts spill to a temp folder of their own (removed
# after); ``LLMWATTS_DUCKDB_MEMORY_MIB`` (a positive whole number) sets another. 1M requests, 2-core box
# (2026-12-06): the child's peak 1,170 -> 794-873 MiB at 700, 2.8-3.0 s either way; it keeps a 1M x 10M study's
# ingest (this child, the telemetry child and the parent side by side) within issue 21's 2 GiB. At 150 the same
# numbers in 4.2 s (spilling): a larger study slows rather than grows. (Below ~64 DuckDB cannot pin its buffers:
# the child fails and the caller passes in SQLite.)
MEMORY_MIB = 700


def memory_mib() -> int:
    text = os.environ.get("LLMWATTS_DUCKDB_MEMORY_MIB", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else MEMORY_MIB


def duckdb_pass(study_db: str | os.PathLike) -> dict:
    """The pass in DuckDB over ``study_db`` (call it in a process that has no SQLite connection to that file:
    ``run_child``). Returns ``summarise``'s dict."""
    with tempfile.TemporaryDirectory(prefix="llmwatts-pass-") as scratch:
        return _duckdb_pass(study_db, scratch)


def _duckdb_pass(study_db: str | os.PathLike, scratch: str) -> dict:
    conn = duck.connect()
    if conn is None:
        raise RuntimeError("duckdb or duckdb-extension-sqlite is not installed")
    try:
        conn.execute(f"ATTACH {duck.literal(str(Path(study_db).resolve()))} AS s (TYPE sqlite, READ_ONLY)")
        conn.execute("SET preserve_insertion_order = false")  # no order is read back unasked: less memory
        conn.execute(f"SET memory_limit = '{memory_mib()}MiB'")
        conn.execute(f"SET temp_directory = {duck.literal(scratch)}")
        for sql in READ_DUCKDB:
            conn.execute(sql)
        one_server = conn.execute(ONE_SERVER).fetchone()[0]
        conn.execute(f"CREATE TEMP TABLE j AS {JOIN_DUCKDB.format(dups=NO_DUPS if one_server else DUPS)}")
        conn.execute("DROP TABLE c")  # read only by the join: their memory back before the numpy arrays
        conn.execute("DROP TABLE r")
        conn.execute("CREATE TEMP TABLE codes AS SELECT run_id, CAST(row_number() OVER (ORDER BY run_id) - 1 AS INTEGER)"
                     " AS code FROM (SELECT DISTINCT run_id FROM j)")
        runs = [r[0] for r in conn.execute("SELECT run_id FROM codes ORDER BY code").fetchall()]
        cursor = conn.execute(TOTALS.format(j="j"))
        names = [d[0] for d in cursor.description]
        totals = _totals(cursor.fetchall(), names, conn.execute(BUSY.format(j="j", src="s.")).fetchall())
        flags = conn.execute(FLAGS.format(j="j")).fetchall()
        points = conn.execute(POINTS.format(j="j", max_points=MAX_POINTS, div="//")).fetchall()
        base_ns = conn.execute("SELECT coalesce(min(begin_ns), 0) FROM s.runs").fetchone()[0]
        select = ", ".join(f"{expr.format(base=int(base_ns))} AS {name}" for name, expr in COLUMNS.items())
        fetched = conn.execute(f"SELECT k.code AS _code, {select} FROM j JOIN codes k "
                               "ON k.run_id IS NOT DISTINCT FROM j.run_id WHERE j.ok OR j.has_server").fetchnumpy()
        arrays = {name: _masked(fetched[name]) for name in COLUMNS}
        arrays["_code"] = np.asarray(fetched["_code"], dtype=np.int32)
        gaps = None
        if conn.execute("SELECT 1 FROM s.client_chunks LIMIT 1").fetchone() is not None:
            g = conn.execute(CHUNK_GAPS.format(src="s.", j="j", codes="codes", same="IS NOT DISTINCT FROM")).fetchnumpy()
            gaps = (np.asarray(g["code"], dtype=np.int32), _masked(g["gap_ms"]))
        targets = dict(conn.execute("SELECT run_id, sum(users) FROM s.client_runs GROUP BY run_id").fetchall())
    finally:
        conn.close()
    return summarise(runs, arrays, int(base_ns), gaps, totals, flags, points, targets)


def sqlite_pass(db) -> dict:
    """The same pass in SQLite over the ``request_join`` view (no DuckDB, or checking one engine against the
    other). ``db``: a sqlite_utils Database."""
    from llmwatts.analysis import aggregates

    view = "request_join"
    cursor = db.execute(TOTALS.format(j=view))
    names = [d[0] for d in cursor.description]
    totals = _totals(cursor.fetchall(), names, db.execute(BUSY.format(j=view, src="")).fetchall())
    flags = db.execute(FLAGS.format(j=view)).fetchall()
    points = db.execute(POINTS.format(j=view, max_points=MAX_POINTS, div="/")).fetchall()
    base_ns = db.execute("SELECT coalesce(min(begin_ns), 0) FROM runs").fetchone()[0]
    select = ", ".join(expr.format(base="?") for expr in COLUMNS.values())
    runs, arrays = aggregates.fetch(db, f"SELECT {aggregates.run_code('j.run_id')}, {select} FROM {view} j "
                                        "WHERE ok OR has_server", list(COLUMNS), [base_ns, base_ns])
    gaps = None
    if db.execute("SELECT 1 FROM client_chunks LIMIT 1").fetchone() is not None:
        _, g = aggregates.fetch(db, CHUNK_GAPS.format(src="", j=view, codes="temp.run_codes", same="IS"),
                                ["gap_ms"])
        gaps = (g["_code"], g["gap_ms"])
    targets = dict(db.execute("SELECT run_id, sum(users) FROM client_runs GROUP BY run_id").fetchall())
    return summarise(runs, arrays, int(base_ns), gaps, totals, flags, points, targets)


def summarise(runs, arrays, base_ns, gaps, totals, flags, points, targets) -> dict:
    """What the pass hands back, JSON-ready: per run its totals, percentiles (aggregates.percentile_rows) and
    steady span without its energy (aggregates.steady_spans); the reconciliation's request ids; the scatter."""
    from llmwatts.analysis import aggregates

    by_run: dict[str, list] = {}
    for run_id, e2e_ms, energy_j in points:
        pair = by_run.setdefault(run_id, [[], []])
        pair[0].append(e2e_ms)
        pair[1].append(energy_j)
    return {"totals": totals, "percentiles": aggregates.percentile_rows(runs, arrays, gaps),
            "spans": aggregates.steady_spans(runs, arrays, base_ns, targets),
            "flags": [list(f) for f in flags], "points": by_run}


class PassChild(duck.Child):
    """``duckdb_pass`` running in a child process (see the module docstring); ``result`` waits for it. Its JSON
    (megabytes: the scatter's points) comes back through a temp file (``duck.Child``)."""

    def __init__(self, study_db: str | os.PathLike, niceness: int = 0):
        super().__init__("llmwatts.analysis.request_pass", str(study_db), str(int(niceness)))

    def result(self, timeout_s: float = 600) -> dict | None:
        """The child's ``summarise`` dict; None when it failed or ran past ``timeout_s`` (the caller then runs
        ``sqlite_pass``)."""
        result = self.output(json.load, timeout_s, (OSError, ValueError))
        if result is not None:
            CHILD_PEAKS_MIB.append(result.get("peak_mib", 0.0))
        return result


CHILD_PEAKS_MIB: list[float] = []  # peak memory (VmHWM) of each PassChild, for bench/analysis.py


def start_child(study_db: str | os.PathLike, niceness: int = 0) -> PassChild | None:
    """``duckdb_pass`` over ``study_db`` started in a child process; None when DuckDB is not installed or the
    child could not start. The child reads what is committed in ``study_db`` (in WAL mode, a snapshot per
    query: commit every table the pass reads first, and write none of them while it runs). ``niceness``: the
    child's, added to this process's."""
    if not duck.available():
        return None
    try:
        return PassChild(study_db, niceness)
    except OSError:
        return None


def run_child(study_db: str | os.PathLike, timeout_s: float = 600) -> dict | None:
    """``duckdb_pass`` in a child process, waited for; None when DuckDB is not installed or the child failed
    (the caller then runs ``sqlite_pass``)."""
    child = start_child(study_db)
    return None if child is None else child.result(timeout_s)


def main(argv=None) -> int:
    """The child of ``PassChild``: argv = study DB path, niceness to add."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 and int(args[1]):
        os.nice(int(args[1]))
    result = duckdb_pass(args[0])
    sys.stdout.write(json.dumps({**result, "peak_mib": duck.peak_mib()}, allow_nan=True))  # one write, one-shot encoder
    return 0


if __name__ == "__main__":
    sys.exit(main())
