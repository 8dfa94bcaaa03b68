"""Telemetry in the study DB, stored compactly: a study's millions of samples are most of its bytes.

- ``telemetry_gpus``: one row per (server_id, gpu_uuid) with a small integer ``gpu_key`` (and node, rank);
- ``telemetry_samples``: the samples, keyed (gpu_key, ts_ns) in a ``WITHOUT ROWID`` table, so the key is
  the table (no second B-tree) and a run window of one GPU is one range of it;
- ``telemetry`` (a view): the server DB's shape again (server_id, ts_ns, gpu_uuid, node, rank, …) for
  ``sqlite-utils query`` and Datasette.

A sample row then carries no repeated text (server id, GPU uuid, node), about half the bytes of the
server DB's row; copying 10M of them is the largest single cost of an ingest (docs/performance.md).
"""

from __future__ import annotations

import sqlite3

import sqlite_utils

from llmwatts.errors import InvalidArgument

KEY_COLUMNS = ("server_id", "gpu_uuid", "node", "rank")
BASE_SAMPLE_COLUMNS = {"power_mw": "INTEGER", "energy_mj": "INTEGER", "sm_pct": "REAL", "mem_pct": "REAL",
                       "mem_used_bytes": "INTEGER", "cap_mw": "INTEGER", "simulated": "INTEGER"}
TELEMETRY_VIEW = """
CREATE VIEW telemetry AS
SELECT g.server_id AS server_id, g.gpu_uuid AS gpu_uuid, g.node AS node, g.rank AS rank, s.*
FROM telemetry_samples s JOIN telemetry_gpus g ON g.gpu_key = s.gpu_key
"""


def ensure_tables(db: sqlite_utils.Database) -> None:
    """Create the two tables and the view; move an older study DB's ``telemetry`` table into them."""
    db.execute("CREATE TABLE IF NOT EXISTS telemetry_gpus (gpu_key INTEGER PRIMARY KEY, server_id TEXT NOT NULL, "
               "gpu_uuid TEXT NOT NULL, node TEXT, rank INTEGER, UNIQUE (server_id, gpu_uuid))")
    columns = ", ".join(f"[{c}] {d}" for c, d in BASE_SAMPLE_COLUMNS.items())
    db.execute(f"CREATE TABLE IF NOT EXISTS telemetry_samples (gpu_key INTEGER NOT NULL, ts_ns INTEGER NOT NULL, "
               f"{columns}, PRIMARY KEY (gpu_key, ts_ns)) WITHOUT ROWID")
    kind = db.execute("SELECT type FROM sqlite_master WHERE name = 'telemetry'").fetchone()
    if kind and kind[0] == "table":  # a study DB from before the compact layout
        db.execute("ALTER TABLE telemetry RENAME TO telemetry_rows_v1")
        copy(db, "main", "telemetry_rows_v1")
        db.execute("DROP TABLE telemetry_rows_v1")
    if not kind or kind[0] == "table":
        db.execute(TELEMETRY_VIEW.strip())


def _columns(db: sqlite_utils.Database, schema: str, table: str) -> list[tuple[str, str]]:
    return [(r[1], (r[2] or "").upper()) for r in db.execute(f"PRAGMA [{schema}].table_info([{table}])")]


def _newest_bound_ns(db: sqlite_utils.Database, schema: str) -> int | None:
    """The oldest of the study's newest samples over the source's GPUs: only later samples can be new.
    None (no bound) when a source GPU has no sample in the study yet."""
    newest = []
    for (key,) in db.execute(
            f"SELECT g.gpu_key FROM [{schema}].gpus s LEFT JOIN telemetry_gpus g "
            "ON g.server_id = s.server_id AND g.gpu_uuid = s.gpu_uuid").fetchall():
        if key is None:
            return None
        newest.append(db.execute("SELECT max(ts_ns) FROM telemetry_samples WHERE gpu_key = ?", [key]).fetchone()[0])
    if not newest or any(ts is None for ts in newest):
        return None
    return int(min(newest))


def copy(db: sqlite_utils.Database, schema: str = "src", table: str = "telemetry") -> int:
    """Copy ``schema.table`` (the server DB's telemetry layout) into the compact tables; returns rows added.

    Incremental: samples at or before the study's newest sample of every source GPU are not read (the
    source's ``ts_ns`` index bounds the scan); any older one met anyway is skipped by the key (samples
    never change once written)."""
    source = _columns(db, schema, table)
    names = [c for c, _ in source]
    have = {c for c, _ in _columns(db, "main", "telemetry_samples")}
    for name, decl in source:
        if name not in have and name not in KEY_COLUMNS:
            db.execute(f"ALTER TABLE telemetry_samples ADD COLUMN [{name}] {decl}".rstrip())
    gpu_source = f"[{schema}].gpus" if schema != "main" and _has(db, schema, "gpus") else None
    node = "node" if "node" in names else "NULL"
    rank = "rank" if "rank" in names else "NULL"
    if gpu_source:
        gpu_names = {c for c, _ in _columns(db, schema, "gpus")}
        db.execute(f"INSERT OR IGNORE INTO telemetry_gpus (server_id, gpu_uuid, node, rank) "
                   f"SELECT server_id, gpu_uuid, {'node' if 'node' in gpu_names else 'NULL'}, "
                   f"{'rank' if 'rank' in gpu_names else 'NULL'} FROM {gpu_source}")
    else:  # an old study DB's table, or a server DB without gpus: the distinct GPUs of the samples
        db.execute(f"INSERT OR IGNORE INTO telemetry_gpus (server_id, gpu_uuid, node, rank) "
                   f"SELECT server_id, gpu_uuid, min({node}), min({rank}) FROM [{schema}].[{table}] "
                   "GROUP BY server_id, gpu_uuid")
    bound = _newest_bound_ns(db, schema) if gpu_source else None
    values = [c for c in names if c not in KEY_COLUMNS]
    before = db.conn.total_changes
    try:
        db.execute(
            f"INSERT INTO telemetry_samples (gpu_key, {', '.join(f'[{c}]' for c in values)}) "
            f"SELECT g.gpu_key, {', '.join(f's.[{c}]' for c in values)} FROM [{schema}].[{table}] s "
            "LEFT JOIN telemetry_gpus g ON g.server_id = s.server_id AND g.gpu_uuid = s.gpu_uuid "
            f"WHERE {'s.ts_ns > ' + str(bound) if bound is not None else 'true'} ON CONFLICT DO NOTHING"
        )
    except sqlite3.IntegrityError as e:  # a sample of a GPU its server never registered in gpus
        missing = db.execute(
            f"SELECT DISTINCT s.server_id, s.gpu_uuid FROM [{schema}].[{table}] s LEFT JOIN telemetry_gpus g "
            "ON g.server_id = s.server_id AND g.gpu_uuid = s.gpu_uuid WHERE g.gpu_key IS NULL LIMIT 3").fetchall()
        raise InvalidArgument(f"telemetry of GPU(s) {missing} that the server DB's gpus table lacks; "
                              "is the server DB from a different llmwatts version?") from e
    return db.conn.total_changes - before


def _has(db: sqlite_utils.Database, schema: str, table: str) -> bool:
    return db.execute(f"SELECT 1 FROM [{schema}].sqlite_master WHERE type = 'table' AND name = ?",
                      [table]).fetchone() is not None
