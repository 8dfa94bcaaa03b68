"""Telemetry in the study DB: aggregated at ingest, never copied sample by sample (issue 21).

A study's millions of samples were most of an ingest's time and of the study DB's bytes. The study DB keeps:

- ``telemetry_gpus``: one row per (server_id, gpu_uuid) with a small integer ``gpu_key`` (and node, rank);
- ``telemetry_buckets``: per GPU and 5 s (``bucket = ts_ns // BUCKET_NS``), the count, sum, min and max
  of every sample column (power, energy counter, SM %, memory %, memory used, cap). This is the power
  timeline the report plots (downsampling method: every sample of the 5 s, mean with min–max band) and
  the interior of every run window's aggregates;
- ``run_gpu_windows``: per (server, run, GPU) the window aggregates the ``run_gpu_telemetry`` view shows,
  computed at ingest **exactly** by a range join: the window's whole buckets from ``telemetry_buckets``,
  its two partial buckets from the server DB's own samples (``ts_ns`` index), the first and last energy
  counter reading by index lookups. ``run_cap_counts`` holds per-cap sample counts for windows whose cap
  changed (the report's most common cap);
- ``telemetry_timeline`` (a view): the buckets with server id, GPU uuid and mean power in W.

Numbers that need single samples at times known only later (the steady-state span's energy, idle power
before a server's first run) are read from the server DB files themselves (sample_reads.py: the ingested
files still on disk, attached read-only); without them, from the buckets wholly inside the span.

Incremental by the source's rowid (``telemetry_cursor``, per file path): a re-ingest recomputes, from all
of their samples, only the buckets that hold a sample written since the last ingest of that file, however
late in time it arrived, and the run windows ending after the earliest of them.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the child process (bucket_prefetch) need not import it
    import sqlite_utils

from llmwatts.analysis import duck
from llmwatts.errors import InvalidArgument

BUCKET_NS = 5_000_000_000
SAMPLE_COLUMNS = ("power_mw", "energy_mj", "sm_pct", "mem_pct", "mem_used_bytes", "cap_mw", "simulated")
# bucket column -> aggregate over source samples; and how buckets (or partial sets) combine again.
AGGREGATES = {
    "samples": ("count(*)", "sum"), "ts_min": ("min(ts_ns)", "min"), "ts_max": ("max(ts_ns)", "max"),
    "power_n": ("count(power_mw)", "sum"), "power_sum": ("sum(power_mw)", "sum"),
    "power_min": ("min(power_mw)", "min"), "power_max": ("max(power_mw)", "max"),
    "energy_min_mj": ("min(energy_mj)", "min"), "energy_max_mj": ("max(energy_mj)", "max"),
    "sm_n": ("count(sm_pct)", "sum"), "sm_sum": ("sum(sm_pct)", "sum"),
    "mem_n": ("count(mem_pct)", "sum"), "mem_sum": ("sum(mem_pct)", "sum"),
    "mem_used_max": ("max(mem_used_bytes)", "max"), "cap_min": ("min(cap_mw)", "min"),
    "cap_max": ("max(cap_mw)", "max"), "simulated": ("max(simulated)", "max"),
}
TIMELINE_VIEW = """
CREATE VIEW telemetry_timeline AS
SELECT g.server_id AS server_id, g.gpu_uuid AS gpu_uuid, b.bucket * 5000000000 AS bucket_ns, b.samples AS samples,
  b.power_sum / 1000.0 / nullif(b.power_n, 0) AS power_mean_w, b.power_min / 1000.0 AS power_min_w,
  b.power_max / 1000.0 AS power_max_w, b.sm_sum / nullif(b.sm_n, 0) AS sm_pct_mean,
  b.mem_sum / nullif(b.mem_n, 0) AS mem_pct_mean, b.cap_min / 1000.0 AS cap_min_w, b.simulated AS simulated
FROM telemetry_buckets b JOIN telemetry_gpus g ON g.gpu_key = b.gpu_key
"""
WINDOW_COLUMNS = ("samples", "first_energy_mj", "last_energy_mj", "sm_pct_sum", "sm_pct_n", "mem_pct_sum",
                  "mem_pct_n", "mem_used_max", "cap_mw_min", "cap_mw_max", "simulated")


def ensure_tables(db: sqlite_utils.Database) -> None:
    """Create the tables and the view; drop an older study DB's raw-sample tables (re-ingest its sources)."""
    db.execute("CREATE TABLE IF NOT EXISTS telemetry_gpus (gpu_key INTEGER PRIMARY KEY, server_id TEXT NOT NULL, "
               "gpu_uuid TEXT NOT NULL, node TEXT, rank INTEGER, UNIQUE (server_id, gpu_uuid))")
    columns = ", ".join(f"[{c}] {'REAL' if c in ('sm_sum', 'mem_sum') else 'INTEGER'}" for c in AGGREGATES)
    db.execute(f"CREATE TABLE IF NOT EXISTS telemetry_buckets (gpu_key INTEGER NOT NULL, bucket INTEGER NOT NULL, "
               f"{columns}, PRIMARY KEY (gpu_key, bucket)) WITHOUT ROWID")
    window = ", ".join(f"[{c}] {'REAL' if c.endswith('_sum') else 'INTEGER'}" for c in WINDOW_COLUMNS)
    db.execute(f"CREATE TABLE IF NOT EXISTS run_gpu_windows (server_id TEXT NOT NULL, run_id TEXT NOT NULL, "
               f"gpu_uuid TEXT NOT NULL, begin_ns INTEGER, end_ns INTEGER, {window}, "
               "PRIMARY KEY (server_id, run_id, gpu_uuid))")
    db.execute("CREATE TABLE IF NOT EXISTS run_cap_counts (server_id TEXT NOT NULL, run_id TEXT NOT NULL, "
               "cap_mw INTEGER NOT NULL, samples INTEGER, first_ts_ns INTEGER, PRIMARY KEY (server_id, run_id, cap_mw))")
    kind = dict(db.execute("SELECT name, type FROM sqlite_master WHERE name IN ('telemetry', 'telemetry_samples')"))
    if kind.get("telemetry") == "view":
        db.execute("DROP VIEW telemetry")
    if kind.get("telemetry_samples") == "table" or kind.get("telemetry") == "table":
        raise InvalidArgument("this study DB holds raw telemetry from an older llmwatts; build a new study DB "
                              "from the same server and client DBs")
    db.execute("CREATE TABLE IF NOT EXISTS telemetry_cursor (path TEXT PRIMARY KEY, max_rowid INTEGER, server_id TEXT, "
               "gpu_uuid TEXT, ts_ns INTEGER)")
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'telemetry_timeline'").fetchone():
        db.execute(TIMELINE_VIEW.strip())


def _columns(db: sqlite_utils.Database, schema: str, table: str) -> list[str]:
    return [r[1] for r in db.execute(f"PRAGMA [{schema}].table_info([{table}])")]


def has_table(db: sqlite_utils.Database, schema: str, table: str) -> bool:
    return db.execute(f"SELECT 1 FROM [{schema}].sqlite_master WHERE type = 'table' AND name = ?",
                      [table]).fetchone() is not None


def _aggregates(names: set[str]) -> str:
    """The bucket aggregates over source rows, NULL for a column the source lacks."""
    def expr(sql: str) -> str:
        column = sql[sql.index("(") + 1:-1]
        return sql if column in names | {"*", "ts_ns"} else "NULL"
    return ", ".join(f"{expr(sql)} AS {c}" for c, (sql, _) in AGGREGATES.items())


def _register_gpus(db: sqlite_utils.Database, schema: str, names: set[str]) -> None:
    if has_table(db, schema, "gpus"):
        gpu_names = set(_columns(db, schema, "gpus"))
        db.execute(f"INSERT OR IGNORE INTO telemetry_gpus (server_id, gpu_uuid, node, rank) "
                   f"SELECT server_id, gpu_uuid, {'node' if 'node' in gpu_names else 'NULL'}, "
                   f"{'rank' if 'rank' in gpu_names else 'NULL'} FROM [{schema}].gpus")
        return
    db.execute(f"INSERT OR IGNORE INTO telemetry_gpus (server_id, gpu_uuid, node, rank) "
               f"SELECT server_id, gpu_uuid, {'min(node)' if 'node' in names else 'NULL'}, "
               f"{'min(rank)' if 'rank' in names else 'NULL'} FROM [{schema}].telemetry GROUP BY server_id, gpu_uuid")


def _cursor(db: sqlite_utils.Database, schema: str, path: Path) -> int:
    """The source's telemetry rowid up to which the study holds its samples; 0 (none) for a file not seen
    at this path before, or whose row at the cursor is no longer the one recorded (another file now)."""
    row = db.execute("SELECT max_rowid, server_id, gpu_uuid, ts_ns FROM telemetry_cursor WHERE path = ?",
                     [str(path)]).fetchone()
    if row is None:
        return 0
    same = db.execute(f"SELECT 1 FROM [{schema}].telemetry WHERE rowid = ? AND server_id = ? AND gpu_uuid = ? "
                      "AND ts_ns = ?", list(row)).fetchone()
    return row[0] if same else 0


def _touch(db: sqlite_utils.Database, schema: str, cursor: int) -> None:
    """``temp.touched``: every (GPU, bucket) with a sample after ``cursor`` (rowid) in the source: the buckets
    to recompute, wherever in time those samples fall (a late batch of samples included)."""
    db.execute("DROP TABLE IF EXISTS temp.touched")
    db.execute(
        f"CREATE TEMP TABLE touched AS SELECT g.gpu_key AS gpu_key, g.server_id AS server_id, g.gpu_uuid AS gpu_uuid, "
        f"t.bucket AS bucket FROM (SELECT DISTINCT server_id, gpu_uuid, ts_ns / {BUCKET_NS} AS bucket "
        f"FROM [{schema}].telemetry WHERE rowid > {int(cursor)}) t "
        "JOIN telemetry_gpus g ON g.server_id = t.server_id AND g.gpu_uuid = t.gpu_uuid")


def copy(db: sqlite_utils.Database, path: Path) -> tuple[int, int | None]:
    """Aggregate the server DB's telemetry into buckets (no transaction open, the file not attached while
    DuckDB reads it: DuckDB links its own SQLite, and must never share an open file with this process's).
    Incremental by the source's rowid (``telemetry_cursor``): only buckets holding a sample written after the
    last ingest of this file are recomputed, from all of their samples. A file new at this path is
    aggregated whole. Returns the samples new to the study and the earliest recomputed time (run windows
    ending after it are recomputed), None when nothing changed."""
    path = Path(path).resolve()
    db.execute("ATTACH DATABASE ? AS tsrc", [f"file:{path}?mode=ro"])
    try:
        names = set(_columns(db, "tsrc", "telemetry"))
        _register_gpus(db, "tsrc", names)
        cursor = _cursor(db, "tsrc", path)
        last = db.execute("SELECT rowid, server_id, gpu_uuid, ts_ns FROM tsrc.telemetry "
                          "ORDER BY rowid DESC LIMIT 1").fetchone()
        whole = cursor == 0
        if not whole:
            _touch(db, "tsrc", cursor)
        keys = _gpu_keys(db, "tsrc")
        server_id = one_server(db, "tsrc")
        db.conn.commit()
    finally:
        db.execute("DETACH DATABASE tsrc")
    if last is None or (not whole and last[0] <= cursor):
        return 0, None
    if whole:
        rows = _buckets_duckdb(path, names, server_id)  # before attaching: DuckDB and this process never share it
        if rows is not None:
            with db.conn:
                return store_whole(db, path, names, keys, last, rows, schema=None)
        _attach_ro(db, path, "tsrc")
        try:
            with db.conn:
                return store_whole(db, path, names, keys, last, None, schema="tsrc")
        finally:
            db.execute("DETACH DATABASE tsrc")
    marks = "(gpu_key, bucket) IN (SELECT gpu_key, bucket FROM temp.touched)"
    old = _samples_in(db, marks)
    with db.conn:
        db.execute(f"DELETE FROM telemetry_buckets WHERE {marks}")
        _attach_ro(db, path, "tsrc")
        try:
            _buckets_sqlite(db, "tsrc", names, False)
        finally:
            db.conn.commit()
            db.execute("DETACH DATABASE tsrc")
        _set_cursor(db, path, last)
    new = _samples_in(db, marks)
    low = db.execute("SELECT min(bucket) FROM temp.touched").fetchone()[0]
    db.execute("DROP TABLE temp.touched")
    return new - old, None if low is None else int(low) * BUCKET_NS


def store_whole(db: sqlite_utils.Database, path: Path, names: set[str], keys: list[int], last: tuple,
                rows: list[tuple] | None, schema: str | None) -> tuple[int, int]:
    """A server DB new to the study, aggregated whole, stored in place of its GPUs' (``keys``) older buckets,
    with its ``telemetry_cursor`` set to its ``last`` sample (rowid, server_id, gpu_uuid, ts_ns), inside the
    caller's transaction: ``rows`` are DuckDB's buckets (``_buckets_duckdb``); None aggregates in SQLite from
    the file attached as ``schema``. Returns ``copy``'s pair: the samples new to the study, and
    -(1 << 62) (every run window of the file recomputed). ``copy`` and bucket_prefetch.copy_prefetched."""
    marks = f"gpu_key IN ({', '.join(map(str, keys)) or 'NULL'})"
    old = _samples_in(db, marks)
    db.execute(f"DELETE FROM telemetry_buckets WHERE {marks}")
    if rows is None:
        _buckets_sqlite(db, schema, names, True)
    else:
        _insert_buckets(db, rows)
    _set_cursor(db, path, last)
    return _samples_in(db, marks) - old, -(1 << 62)


def _samples_in(db: sqlite_utils.Database, marks: str) -> int:
    return db.execute(f"SELECT coalesce(sum(samples), 0) FROM telemetry_buckets WHERE {marks}").fetchone()[0]


def _set_cursor(db: sqlite_utils.Database, path: Path, last: tuple) -> None:
    db.execute("INSERT OR REPLACE INTO telemetry_cursor VALUES (?, ?, ?, ?, ?)", [str(path), *last])


def _gpu_keys(db: sqlite_utils.Database, schema: str) -> list[int]:
    table = "gpus" if has_table(db, schema, "gpus") else "telemetry"
    return [r[0] for r in db.execute(
        f"SELECT DISTINCT g.gpu_key FROM telemetry_gpus g JOIN [{schema}].[{table}] s "
        "ON g.server_id = s.server_id AND g.gpu_uuid = s.gpu_uuid")]


def _attach_ro(db: sqlite_utils.Database, path: Path, schema: str) -> None:
    db.conn.commit()
    db.execute(f"ATTACH DATABASE ? AS {schema}", [f"file:{Path(path).resolve()}?mode=ro"])


def _insert_buckets(db: sqlite_utils.Database, rows: list[tuple]) -> None:
    """Rows (server_id, gpu_uuid, bucket, *AGGREGATES) from DuckDB into ``telemetry_buckets``."""
    keys = {(r[1], r[2]): r[0] for r in db.execute("SELECT gpu_key, server_id, gpu_uuid FROM telemetry_gpus")}
    missing = {(r[0], r[1]) for r in rows if (r[0], r[1]) not in keys}
    if missing:
        raise InvalidArgument(f"telemetry of GPU(s) {sorted(missing)[:3]} that the server DB's gpus table lacks; "
                              "is the server DB from a different llmwatts version?")
    db.conn.executemany(
        f"INSERT INTO telemetry_buckets (gpu_key, bucket, {', '.join(AGGREGATES)}) "
        f"VALUES ({', '.join('?' * (len(AGGREGATES) + 2))})",
        ((keys[(r[0], r[1])], *r[2:]) for r in rows))


def _bucket_select(names: set[str], table: str, div: str, server_id: str | None = None) -> str:
    """The buckets' GROUP BY over ``table``. ``server_id``: the file's one server (``one_server``), written as a
    constant instead of read from every sample (DuckDB's sqlite scan: ~0.8 s less CPU at 10M samples)."""
    if server_id is None:
        return (f"SELECT server_id, gpu_uuid, ts_ns {div} {BUCKET_NS} AS bucket, {_aggregates(names)} FROM {table} "
                "GROUP BY server_id, gpu_uuid, bucket")
    return (f"SELECT {duck.literal(server_id)} AS server_id, gpu_uuid, ts_ns {div} {BUCKET_NS} AS bucket, "
            f"{_aggregates(names)} FROM {table} GROUP BY gpu_uuid, bucket")


def one_server(db: sqlite_utils.Database, schema: str) -> str | None:
    """The server DB's one server, when ``servers`` holds one row and every ``gpus`` row names it; else None.
    A server writes every sample with its own id (server/store.py: ``add_telemetry``), so such a file's samples
    are that server's and DuckDB's pass need not read the column; a file several servers wrote is grouped by
    each sample's ``server_id``."""
    if not has_table(db, schema, "gpus") or not has_table(db, schema, "servers"):
        return None
    ids = db.execute(f"SELECT server_id FROM [{schema}].servers LIMIT 2").fetchall()
    if len(ids) != 1 or not isinstance(ids[0][0], str):
        return None
    other = db.execute(f"SELECT 1 FROM [{schema}].gpus WHERE server_id IS NOT ? LIMIT 1", [ids[0][0]]).fetchone()
    return None if other is not None else ids[0][0]


def _buckets_sqlite(db: sqlite_utils.Database, schema: str, names: set[str], whole: bool) -> None:
    """The buckets in SQLite: all of the source's (``whole``), else those in ``temp.touched``, each from all of
    its samples (found through the source's ``ts_ns`` index)."""
    columns = ", ".join(AGGREGATES)
    if not whole:
        db.execute(
            f"INSERT INTO telemetry_buckets (gpu_key, bucket, {columns}) SELECT t.gpu_key, t.bucket, "
            f"{_aggregates(names)} FROM temp.touched t JOIN [{schema}].telemetry s ON s.ts_ns BETWEEN "
            f"t.bucket * {BUCKET_NS} AND t.bucket * {BUCKET_NS} + {BUCKET_NS - 1} AND +s.server_id = t.server_id "
            "AND +s.gpu_uuid = t.gpu_uuid GROUP BY t.gpu_key, t.bucket")
        return
    try:
        db.execute(
            f"INSERT INTO telemetry_buckets (gpu_key, bucket, {columns}) "
            f"SELECT (SELECT g.gpu_key FROM telemetry_gpus g WHERE g.server_id = a.server_id "
            f"AND g.gpu_uuid = a.gpu_uuid), a.bucket, {', '.join(f'a.[{c}]' for c in AGGREGATES)} "
            f"FROM ({_bucket_select(names, f'[{schema}].telemetry', '/')}) a")
    except sqlite3.IntegrityError as e:  # a sample of a GPU its server never registered in gpus
        raise InvalidArgument("telemetry of a GPU that the server DB's gpus table lacks; "
                              "is the server DB from a different llmwatts version?") from e


def _buckets_duckdb(path: Path, names: set[str], server_id: str | None = None) -> list[tuple] | None:
    """The same buckets computed by DuckDB (duck.py) reading the server DB; None without DuckDB. ``server_id``:
    the file's one server (``one_server``), or None (read from each sample)."""
    chunks = bucket_chunks_duckdb(path, names, server_id=server_id)
    return None if chunks is None else [row for chunk in chunks for row in chunk]


def bucket_chunks_duckdb(path: Path, names: set[str], chunk_rows: int = 20_000, server_id: str | None = None):
    """``_buckets_duckdb``'s rows in lists of at most ``chunk_rows`` (an iterator; None without DuckDB): a
    caller that passes them on never holds them all (bucket_prefetch.py: ~150 MB of Python tuples at 10M
    samples)."""
    conn = duck.connect()
    if conn is None:
        return None
    quote = duck.literal(str(Path(path).resolve()))
    cast = {c: ("DOUBLE" if c in ("sm_sum", "mem_sum") else "BIGINT") for c in AGGREGATES}

    def chunks():
        try:
            conn.execute(f"ATTACH {quote} AS s (TYPE sqlite, READ_ONLY)")
            result = conn.execute(
                f"SELECT a.server_id, a.gpu_uuid, a.bucket, "
                f"{', '.join(f'CAST(a.{c} AS {cast[c]})' for c in AGGREGATES)} "
                f"FROM ({_bucket_select(names, 's.telemetry', '//', server_id)}) a")
            while chunk := result.fetchmany(chunk_rows):
                yield chunk
        finally:
            conn.close()
    return chunks()


def windows(db: sqlite_utils.Database, schema: str, since_ns: int | None) -> None:
    _windows(db, schema, set(_columns(db, schema, "telemetry")), since_ns)


def _windows(db: sqlite_utils.Database, schema: str, names: set[str], since_ns: int | None) -> None:
    """``run_gpu_windows`` (and ``run_cap_counts``) for the finished runs of the source's servers that are new
    or end after ``since_ns``: whole buckets from ``telemetry_buckets``, the partial first and last from the
    source's samples, first and last energy counter reading by index lookups."""
    db.execute("DROP TABLE IF EXISTS temp.todo")
    db.execute(
        f"CREATE TEMP TABLE todo AS SELECT w.server_id, w.run_id, w.begin_ns, w.end_ns, "
        f"w.begin_ns / {BUCKET_NS} AS b0, w.end_ns / {BUCKET_NS} AS b1 FROM main.runs w "
        f"WHERE w.end_ns IS NOT NULL AND w.server_id IN (SELECT server_id FROM [{schema}].runs) AND "
        "(NOT EXISTS (SELECT 1 FROM run_gpu_windows x WHERE x.server_id = w.server_id AND x.run_id = w.run_id "
        " AND x.begin_ns = w.begin_ns AND x.end_ns = w.end_ns)"
        f"{'' if since_ns is None else f' OR w.end_ns >= {int(since_ns)}'})")
    combine = ", ".join(f"{how}([{c}]) AS [{c}]" for c, (_, how) in AGGREGATES.items())
    raw = _aggregates(names)
    edge_first = f"s.ts_ns BETWEEN w.begin_ns AND min(w.end_ns, (w.b0 + 1) * {BUCKET_NS} - 1)"
    edge_last = f"w.b1 > w.b0 AND s.ts_ns BETWEEN w.b1 * {BUCKET_NS} AND w.end_ns"
    parts = " UNION ALL ".join([
        f"SELECT w.server_id, w.run_id, g.gpu_uuid, {', '.join(f'b.[{c}]' for c in AGGREGATES)} FROM todo w "
        "CROSS JOIN telemetry_gpus g ON g.server_id = w.server_id CROSS JOIN telemetry_buckets b ON b.gpu_key = g.gpu_key "
        "AND b.bucket > w.b0 AND b.bucket < w.b1",
        *(f"SELECT w.server_id, w.run_id, s.gpu_uuid, {raw} FROM todo w CROSS JOIN [{schema}].telemetry s "
          f"ON {edge} AND +s.server_id = w.server_id GROUP BY w.server_id, w.run_id, s.gpu_uuid"
          for edge in (edge_first, edge_last)),
    ])
    db.execute("DELETE FROM run_gpu_windows WHERE (server_id, run_id) IN (SELECT server_id, run_id FROM todo)")
    db.execute("DELETE FROM run_cap_counts WHERE (server_id, run_id) IN (SELECT server_id, run_id FROM todo)")
    db.execute(
        f"INSERT INTO run_gpu_windows (server_id, run_id, gpu_uuid, begin_ns, end_ns, {', '.join(WINDOW_COLUMNS)}) "
        "SELECT a.server_id, a.run_id, a.gpu_uuid, w.begin_ns, w.end_ns, a.samples, NULL, NULL, a.sm_sum, a.sm_n, "
        "a.mem_sum, a.mem_n, a.mem_used_max, a.cap_min, a.cap_max, a.simulated "
        f"FROM (SELECT server_id, run_id, gpu_uuid, {combine} FROM ({parts}) GROUP BY server_id, run_id, gpu_uuid) a "
        "JOIN todo w ON w.server_id = a.server_id AND w.run_id = a.run_id WHERE a.samples > 0")
    if "energy_mj" in names:
        for column, order in (("first_energy_mj", "ASC"), ("last_energy_mj", "DESC")):
            db.execute(
                f"UPDATE run_gpu_windows AS x SET [{column}] = (SELECT s.energy_mj FROM [{schema}].telemetry s "
                "WHERE s.ts_ns BETWEEN x.begin_ns AND x.end_ns AND +s.server_id = x.server_id "
                f"AND +s.gpu_uuid = x.gpu_uuid AND s.energy_mj IS NOT NULL ORDER BY s.ts_ns {order} LIMIT 1) "
                "WHERE (x.server_id, x.run_id) IN (SELECT server_id, run_id FROM todo)")
    if "cap_mw" in names:  # the most common cap, where a window saw more than one
        db.execute(
            f"INSERT INTO run_cap_counts SELECT w.server_id, w.run_id, s.cap_mw, count(*), min(s.ts_ns) "
            f"FROM todo w CROSS JOIN [{schema}].telemetry s ON s.ts_ns BETWEEN w.begin_ns AND w.end_ns "
            "AND +s.server_id = w.server_id WHERE s.cap_mw IS NOT NULL AND EXISTS (SELECT 1 FROM run_gpu_windows x "
            "WHERE x.server_id = w.server_id AND x.run_id = w.run_id AND x.cap_mw_min <> x.cap_mw_max) "
            "GROUP BY w.server_id, w.run_id, s.cap_mw")
    db.execute("DROP TABLE temp.todo")


def power_series(db, gpu_key: int, t0_ns: int, t1_ns: int, points: int):
    """One GPU's power timeline over [t0_ns, t1_ns] from its buckets (every sample
    counted), merged into at most ``points`` equal time buckets: per bucket its midpoint (s since t0_ns)
    and the mean (weighted by samples), min and max of ``power_mw`` (W)."""
    width = max(1, -(-(t1_ns - t0_ns + 1) // points // BUCKET_NS))  # buckets per plotted point
    rows = db.execute(
        "SELECT (bucket - ?) / ? AS b, sum(power_sum) * 1.0 / sum(power_n), min(power_min), max(power_max) "
        "FROM telemetry_buckets WHERE gpu_key = ? AND power_n > 0 AND bucket BETWEEN ? AND ? GROUP BY b ORDER BY b",
        [t0_ns // BUCKET_NS, width, gpu_key, t0_ns // BUCKET_NS, t1_ns // BUCKET_NS]
    ).fetchall()
    start_s = (t0_ns // BUCKET_NS * BUCKET_NS - t0_ns) / 1e9
    return ([start_s + (r[0] + 0.5) * width * BUCKET_NS / 1e9 for r in rows], [r[1] / 1000 for r in rows],
            [r[2] / 1000 for r in rows], [r[3] / 1000 for r in rows])

