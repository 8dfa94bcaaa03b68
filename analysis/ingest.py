"""Ingest server DBs and client DBs into one study DB (sqlite-utils, WAL).

Each source table is copied under its own name. Keys in the study DB are content keys, not file keys,
so ingesting the same file twice (or a copy of it, or a later snapshot of a growing file) adds nothing
twice: rows are upserted on the keys below. Every batch of rows handed to ``upsert_all`` comes from one
``SELECT *`` and so has one key set; sqlite-utils fills missing keys of a mixed batch with NULL and would
overwrite good values, which this avoids by construction.

Study-DB keys differ from the per-file keys where one file's key is not unique across files: two server
processes on one machine (a power-cap sweep) share GPU uuids and may both number batches from 1, so
server-side tables are keyed with ``server_id``. Added columns:

- ``batch_gpu_energy.server_id`` (looked up from the same file's ``batches``) when the source lacks it;
- ``client_requests.client_clock_offset_ns`` and ``client_requests.client_started_ns``: the row's own
  ``clock_offset_ns`` (server − client, measured by the worker that sent it) or, in client DBs that lack it,
  the same file's ``client_runs`` offset for that run; and that run's ``started_ns``. So a client timestamp is
  put on the server clock with its own machine's offset even when workers ran on several machines.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlite_utils

from llmwatts.errors import InvalidArgument, NotFound

# table -> primary key in the study DB, in the order the tables are copied.
SERVER_TABLES: dict[str, tuple[str, ...]] = {
    "servers": ("server_id",),
    "gpus": ("server_id", "gpu_uuid"),
    "runs": ("server_id", "run_id"),
    "batches": ("server_id", "batch_id"),
    "batch_gpu_energy": ("server_id", "batch_id", "gpu_uuid"),
    "requests": ("server_id", "request_id"),
    "telemetry": ("server_id", "gpu_uuid", "ts_ns"),
    "cap_events": ("server_id", "id"),
}
CLIENT_TABLES: dict[str, tuple[str, ...]] = {
    "client_runs": ("run_id", "started_ns"),
    "client_requests": ("request_id",),
}
# Tables a file must have to be taken as that kind of DB; the others may be absent (older writers).
REQUIRED = {
    "server": ("servers", "runs", "requests", "batches"),
    "client": ("client_requests", "client_runs"),
}
ADDED_COLUMNS = {
    "batch_gpu_energy": {"server_id": "TEXT"},
    "client_requests": {"client_clock_offset_ns": "INTEGER", "client_started_ns": "INTEGER"},
}
# Indexes for the joins in join.py / metrics.py (telemetry by server and time, rows by run).
INDEXES = {
    "telemetry": [("server_id", "ts_ns")],
    "requests": [("run_id",), ("request_id",)],
    "client_requests": [("run_id",)],
}
BATCH_ROWS = 2000


@dataclass
class SourceResult:
    """What one ingested file contributed: ``rows`` per table (rows read from the file)."""

    path: str
    kind: str
    sha256: str
    size_bytes: int
    rows: dict[str, int] = field(default_factory=dict)


@dataclass
class IngestResult:
    study_db: str
    sources: list[SourceResult]


def open_study_db(study_db: str | os.PathLike | sqlite_utils.Database, create: bool = True) -> sqlite_utils.Database:
    """Open a study DB in WAL mode, creating it when ``create``. Passes a ``Database`` through unchanged."""
    if isinstance(study_db, sqlite_utils.Database):
        return study_db
    path = Path(study_db)
    if not create and not path.exists():
        raise NotFound(f"no study DB at {path}; build one with --server-db/--client-db first")
    if not path.parent.exists():
        raise NotFound(f"folder for study DB {path} does not exist; create it or choose another path")
    try:
        db = sqlite_utils.Database(path)
        db.enable_wal()
    except sqlite3.DatabaseError as e:
        raise InvalidArgument(f"{path} is not a SQLite database; choose a new study DB path") from e
    return db


def file_sha256(path: Path) -> tuple[str, int]:
    """SHA-256 and size (bytes) of a DB file and its ``-wal`` file, if any (WAL rows live there)."""
    digest = hashlib.sha256()
    size = 0
    for part in (path, Path(f"{path}-wal")):
        if not part.exists():
            continue
        with open(part, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
    return digest.hexdigest(), size


def _open_source(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise NotFound(f"no such DB file: {path}")
    if not path.is_file():
        raise InvalidArgument(f"{path} is not a file")
    try:
        # Read-only: a server still running keeps writing its own file; we never touch it.
        conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
        conn.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.DatabaseError as e:
        raise InvalidArgument(f"{path} is not a SQLite database ({e})") from e
    conn.row_factory = sqlite3.Row
    return conn


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def detect_kind(path: str | os.PathLike) -> str:
    """``"server"`` or ``"client"`` from the tables a DB holds; ``InvalidArgument`` if neither."""
    conn = _open_source(Path(path))
    try:
        return _kind_of(Path(path), _tables(conn))
    finally:
        conn.close()


def _kind_of(path: Path, tables: set[str]) -> str:
    for kind, required in REQUIRED.items():
        if all(t in tables for t in required):
            return kind
    found = ", ".join(sorted(t for t in tables if not t.startswith("sqlite_"))) or "no tables"
    raise InvalidArgument(
        f"{path} is neither an llmwatts server DB (needs {', '.join(REQUIRED['server'])}) "
        f"nor a client DB (needs {', '.join(REQUIRED['client'])}); it has {found}"
    )


def _columns(conn: sqlite3.Connection, table: str) -> list[tuple[str, str]]:
    return [(r[1], (r[2] or "").upper()) for r in conn.execute(f"PRAGMA table_info([{table}])")]


def _ensure_table(db: sqlite_utils.Database, table: str, columns: list[tuple[str, str]], pk) -> None:
    """Create ``table`` like the source (declared types kept) with the study key; add new columns."""
    wanted = list(columns) + [
        (name, decl) for name, decl in ADDED_COLUMNS.get(table, {}).items()
        if name not in {c for c, _ in columns}
    ]
    if not db[table].exists():
        cols_sql = ", ".join(f"[{name}] {decl}".rstrip() for name, decl in wanted)
        pk_sql = ", ".join(f"[{c}]" for c in pk)
        db.execute(f"CREATE TABLE [{table}] ({cols_sql}, PRIMARY KEY ({pk_sql}))")
        for columns_ in INDEXES.get(table, []):
            db[table].create_index(list(columns_), if_not_exists=True)
        return
    have = set(db[table].columns_dict)
    for name, decl in wanted:
        if name not in have:  # a newer writer added a column: keep it, older rows read NULL
            db.execute(f"ALTER TABLE [{table}] ADD COLUMN [{name}] {decl}".rstrip())


def _server_id_lookup(conn: sqlite3.Connection, path: Path, tables: set[str]):
    """Map batch_id -> server_id for files whose batch_gpu_energy has no server_id column."""
    by_batch = {r[0]: r[1] for r in conn.execute("SELECT batch_id, server_id FROM batches")}
    servers = [r[0] for r in conn.execute("SELECT server_id FROM servers")]

    def lookup(row: dict) -> str:
        server_id = by_batch.get(row.get("batch_id"))
        if server_id is None:
            if len(servers) != 1:
                raise InvalidArgument(
                    f"{path}: batch_gpu_energy row for batch {row.get('batch_id')!r} has no batch row "
                    "and the file holds several servers; cannot tell which server it belongs to"
                )
            server_id = servers[0]
        return server_id

    return lookup


def _client_run_lookup(conn: sqlite3.Connection, path: Path):
    rows = list(conn.execute("SELECT run_id, clock_offset_ns, started_ns FROM client_runs"))
    by_run: dict[str, tuple[int | None, int | None]] = {}
    for run_id, offset_ns, started_ns in rows:
        if run_id in by_run and by_run[run_id][0] != offset_ns:
            raise InvalidArgument(
                f"{path}: run {run_id!r} has two client_runs rows with different clock offsets; "
                "write one client DB per worker"
            )
        by_run[run_id] = (offset_ns, started_ns)
    return by_run


def _check_keys(conn, path: Path, table: str, pk: tuple[str, ...]) -> None:
    names = [c for c, _ in _columns(conn, table)]
    derive_server_id = table == "batch_gpu_energy" and "server_id" not in names
    missing = [c for c in pk if c not in names and not (derive_server_id and c == "server_id")]
    if missing:
        raise InvalidArgument(
            f"{path}: table {table} lacks column(s) {', '.join(missing)}; "
            "is it from a different llmwatts version?"
        )


def _copy_table(db, conn, path: Path, table: str, pk: tuple[str, ...], tables: set[str]) -> int:
    columns = _columns(conn, table)
    names = [c for c, _ in columns]
    derive_server_id = table == "batch_gpu_energy" and "server_id" not in names
    _ensure_table(db, table, columns, pk)
    lookup = _server_id_lookup(conn, path, tables) if derive_server_id else None
    client_runs = _client_run_lookup(conn, path) if table == "client_requests" else None
    n = 0
    cursor = conn.execute(f"SELECT * FROM [{table}]")
    while True:
        chunk = cursor.fetchmany(BATCH_ROWS)
        if not chunk:
            break
        records = []
        for row in chunk:
            record = dict(row)
            if lookup is not None:
                record["server_id"] = lookup(record)
            if client_runs is not None:
                offset_ns, started_ns = client_runs.get(record.get("run_id"), (None, None))
                # The row's own offset (its worker's machine) wins over the run's (the master's).
                own_ns = record.get("clock_offset_ns")
                record["client_clock_offset_ns"] = own_ns if own_ns is not None else offset_ns
                record["client_started_ns"] = started_ns
            records.append(record)
        # Every record here has the same keys (one SELECT *), so upsert never writes NULL over a value.
        db[table].upsert_all(records, pk=pk, batch_size=BATCH_ROWS)
        n += len(records)
    return n


def ingest_file(db: sqlite_utils.Database, path: str | os.PathLike, kind: str) -> SourceResult:
    """Copy one server or client DB into ``db``. ``kind`` is what the caller expects it to be."""
    path = Path(path)
    conn = _open_source(path)
    try:
        tables = _tables(conn)
        actual = _kind_of(path, tables)
        if actual != kind:
            flag = "--server-db" if actual == "server" else "--client-db"
            raise InvalidArgument(f"{path} is a {actual} DB, not a {kind} DB; pass it with {flag}")
        sha256, size_bytes = file_sha256(path)
        result = SourceResult(str(path), kind, sha256, size_bytes)
        spec = SERVER_TABLES if kind == "server" else CLIENT_TABLES
        for table, pk in spec.items():  # every table checked before any row is written
            if table in tables:
                _check_keys(conn, path, table, pk)
        with db.conn:
            for table, pk in spec.items():
                if table in tables:
                    result.rows[table] = _copy_table(db, conn, path, table, pk, tables)
            db["sources"].upsert(
                {
                    "path": str(path.resolve()),
                    "sha256": sha256,
                    "kind": kind,
                    "size_bytes": size_bytes,
                    "ingested_ns": time.time_ns(),
                    "rows": result.rows,
                },
                pk=("path", "sha256"),
            )
        return result
    except sqlite3.DatabaseError as e:
        raise InvalidArgument(f"{path}: cannot read ({e})") from e
    finally:
        conn.close()


def ingest(
    study_db: str | os.PathLike | sqlite_utils.Database,
    server_dbs: list[str | os.PathLike] = (),
    client_dbs: list[str | os.PathLike] = (),
) -> IngestResult:
    """Ingest server and client DBs into ``study_db`` (created if needed). Idempotent.

    All inputs are checked (exist, are SQLite, are the right kind) before anything is written.
    """
    for path in server_dbs:
        _expect(path, "server")
    for path in client_dbs:
        _expect(path, "client")
    db = open_study_db(study_db)
    sources = [ingest_file(db, p, "server") for p in server_dbs]
    sources += [ingest_file(db, p, "client") for p in client_dbs]
    return IngestResult(str(db.conn.execute("PRAGMA database_list").fetchone()[2]), sources)


def _expect(path, kind: str) -> None:
    actual = detect_kind(path)
    if actual != kind:
        flag = "--server-db" if actual == "server" else "--client-db"
        raise InvalidArgument(f"{path} is a {actual} DB, not a {kind} DB; pass it with {flag}")
