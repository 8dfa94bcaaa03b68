"""The study DB's tables: each copied table's key (content keys, so a file ingested twice adds nothing
twice), the base columns every study DB has (so the views are valid before, between and after ingests of
older and newer writers), and opening one (WAL, page cache, tables, views).

Keys differ from the per-file keys where one file's key is not unique across files: two server processes on
one machine (a power-cap sweep) share GPU uuids and may both number batches from 1, so server-side tables
are keyed with ``server_id``; ``requests`` is keyed (request_id, server_id), so its key also serves the
client-to-server join by request_id.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import sqlite_utils

from llmwatts.analysis import samples
from llmwatts.errors import InvalidArgument, NotFound

# table -> primary key in the study DB, in the order the tables are copied.
SERVER_TABLES: dict[str, tuple[str, ...]] = {
    "servers": ("server_id",),
    "gpus": ("server_id", "gpu_uuid"),
    "runs": ("server_id", "run_id"),
    "batches": ("server_id", "batch_id"),
    "requests": ("request_id", "server_id"),  # request_id first: the key serves the join by request_id
    # After requests: the request pass reads servers … requests (no later table) and may start here (ingest.py).
    "batch_gpu_energy": ("server_id", "batch_id", "gpu_uuid"),
    "telemetry": ("server_id", "gpu_uuid", "ts_ns"),
    "cap_events": ("server_id", "id"),
    "idle_power": ("server_id", "gpu_uuid"),  # as llmwatts study writes it into the study DB
}
CLIENT_TABLES: dict[str, tuple[str, ...]] = {
    "client_runs": ("run_id", "started_ns"),
    "client_requests": ("request_id",),
    "client_chunks": ("request_id", "chunk_index"),
}
# Tables a file must have to be taken as that kind of DB; the others may be absent (older writers).
REQUIRED = {
    "server": ("servers", "runs", "requests", "batches"),
    "client": ("client_requests", "client_runs"),
}
# Columns the study DB's views read: every study DB has them (NULL where no source wrote them), so the
# views in views.py are valid before, between and after ingests of older and newer writers.
BASE_COLUMNS: dict[str, dict[str, str]] = {
    "servers": {"server_id": "TEXT", "model": "TEXT", "engine": "TEXT", "dtype": "TEXT", "shard_count": "INTEGER",
                "power_source": "TEXT", "simulated": "INTEGER"},
    "gpus": {"server_id": "TEXT", "gpu_uuid": "TEXT", "rank": "INTEGER", "memory_total_bytes": "INTEGER",
             "simulated": "INTEGER"},
    "runs": {"run_id": "TEXT", "server_id": "TEXT", "begin_ns": "INTEGER", "end_ns": "INTEGER",
             "begin_energy_j": "REAL", "end_energy_j": "REAL", "labels": "TEXT", "simulated": "INTEGER"},
    "batches": {"batch_id": "TEXT", "server_id": "TEXT", "start_ns": "INTEGER", "end_ns": "INTEGER",
                "energy_j": "REAL", "simulated": "INTEGER"},
    "batch_gpu_energy": {"batch_id": "TEXT", "gpu_uuid": "TEXT", "energy_j": "REAL", "server_id": "TEXT"},
    "requests": {"request_id": "TEXT", "run_id": "TEXT", "batch_id": "TEXT", "server_id": "TEXT",
                 "received_ns": "INTEGER", "done_ns": "INTEGER", "n_prompts": "INTEGER",
                 "output_tokens": "INTEGER", "energy_j": "REAL", "status": "TEXT"},
    "cap_events": {"id": "INTEGER", "server_id": "TEXT", "ts_ns": "INTEGER", "gpu_uuid": "TEXT"},
    "idle_power": {"server_id": "TEXT", "gpu_uuid": "TEXT", "begin_ns": "INTEGER", "end_ns": "INTEGER",
                   "power_mw": "INTEGER", "energy_j": "REAL", "simulated": "INTEGER"},
    "client_runs": {"run_id": "TEXT", "started_ns": "INTEGER", "clock_offset_ns": "INTEGER", "labels": "TEXT",
                    "users": "INTEGER"},
    "client_requests": {"request_id": "TEXT", "run_id": "TEXT", "client_send_ns": "INTEGER",
                        "latency_ms": "REAL", "ttft_ms": "REAL", "tpot_ms": "REAL", "itl_count": "INTEGER",
                        "itl_mean_ms": "REAL", "scheduled_send_ns": "INTEGER", "output_words": "INTEGER",
                        "status": "TEXT", "clock_offset_ns": "INTEGER",
                        "client_clock_offset_ns": "INTEGER", "client_started_ns": "INTEGER"},
    "client_chunks": {"request_id": "TEXT", "chunk_index": "INTEGER", "arrival_ns": "INTEGER",
                      "elapsed_ms": "REAL", "tokens": "INTEGER"},
}
ADDED_COLUMNS = {
    "batch_gpu_energy": {"server_id": "TEXT"},
    "client_requests": {"client_clock_offset_ns": "INTEGER", "client_started_ns": "INTEGER"},
}
# Indexes for the views' joins besides each table's key (telemetry's key already serves its range joins).
INDEXES = {
    "requests": [("run_id",)],
    "client_requests": [("run_id",)],
}
# Tables copied into an empty study table in bulk: without indexes, which are built afterwards by one sort
# each (ingest.py); a source of these tables holds each study key once (its own primary key).
BULK_TABLES = ("batches", "batch_gpu_energy", "requests", "client_requests", "client_chunks")
CACHE_MIB = 256  # SQLite page cache while ingesting: the key B-trees of 1M requests stay in memory



def open_study_db(study_db: str | os.PathLike | sqlite_utils.Database, create: bool = True,
                  build: bool = False) -> sqlite_utils.Database:
    """Open a study DB in WAL mode, creating it when ``create``. Passes a ``Database`` through unchanged.
    Every table the views read exists afterwards, and the views are in place (views.py). ``build``: a new
    file being built whole (study_file.py): in-memory rollback journal, no syncs."""
    from llmwatts.analysis import views

    if isinstance(study_db, sqlite_utils.Database):
        return study_db
    path = Path(study_db)
    if not create and not path.exists():
        raise NotFound(f"no study DB at {path}; build one with --server-db/--client-db first")
    if not path.parent.exists():
        raise NotFound(f"folder for study DB {path} does not exist; create it or choose another path")
    try:
        db = sqlite_utils.Database(path)
        if build:
            db.execute("PRAGMA journal_mode = MEMORY")
            db.execute("PRAGMA synchronous = OFF")
        else:
            db.enable_wal()
        db.execute(f"PRAGMA cache_size = -{CACHE_MIB * 1024}")
        _ensure_base(db)
        views.create_views(db)
    except sqlite3.DatabaseError as e:
        raise InvalidArgument(f"{path} is not a SQLite database; choose a new study DB path") from e
    return db


def _ensure_base(db: sqlite_utils.Database) -> None:
    """Create every table the views read (empty) and add base columns an older study DB lacks."""
    keys = {**SERVER_TABLES, **CLIENT_TABLES}
    with db.conn:
        for table, columns in BASE_COLUMNS.items():
            ensure_table(db, table, list(columns.items()), keys[table])
        samples.ensure_tables(db)


def indexes(db: sqlite_utils.Database, table: str) -> list[tuple[str, str]]:
    """(name, CREATE statement) of the indexes made on ``table`` (a PRIMARY KEY's own index is not one)."""
    return db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL",
                      [table]).fetchall()


def columns(conn, table: str, schema: str = "main") -> list[tuple[str, str]]:
    return [(r[1], (r[2] or "").upper()) for r in conn.execute(f"PRAGMA [{schema}].table_info([{table}])")]


def ensure_table(db: sqlite_utils.Database, table: str, columns: list[tuple[str, str]], pk) -> None:
    """Create ``table`` like the source (declared types kept) with the study key; add new columns."""
    wanted = list(columns) + [
        (name, decl) for name, decl in ADDED_COLUMNS.get(table, {}).items()
        if name not in {c for c, _ in columns}
    ]
    if not db[table].exists():
        cols_sql = ", ".join(f"[{name}] {decl}".rstrip() for name, decl in wanted)
        db.execute(f"CREATE TABLE [{table}] ({cols_sql})")
        # The key as a unique index rather than a PRIMARY KEY: a bulk copy can drop it and build it after.
        db.execute(f"CREATE UNIQUE INDEX [key_{table}] ON [{table}] ({', '.join(f'[{c}]' for c in pk)})")
        for columns_ in INDEXES.get(table, []):
            db[table].create_index(list(columns_), if_not_exists=True)
        return
    have = set(db[table].columns_dict)
    for name, decl in wanted:
        if name not in have:  # a newer writer added a column: keep it, older rows read NULL
            db.execute(f"ALTER TABLE [{table}] ADD COLUMN [{name}] {decl}".rstrip())


