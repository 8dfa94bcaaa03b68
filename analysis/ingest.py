"""Ingest server DBs and client DBs into one study DB, in SQL: ``ATTACH`` the source read-only and copy
each table with one ``INSERT … SELECT … ON CONFLICT DO UPDATE`` (no row passes through Python).

Why SQLite and not DuckDB (docs/analysis.md, "Ingest"): the study DB is SQLite so that ``sqlite-utils
query`` and Datasette read the report's own views; copying SQLite into SQLite needs no extension (DuckDB
reads SQLite only through its ``sqlite`` extension, a second download, and would keep a second copy), and
the copy is a B-tree append that runs at SQLite's own speed.

Keys in the study DB are content keys, not file keys, so ingesting the same file twice (or a copy of it,
or a later snapshot of a growing file) adds nothing twice: rows are upserted on the keys below, and a
column the source lacks is never written (no NULL over a value). A source file already ingested with the
same SHA-256 is skipped whole.

The keys and the base columns are study_db.py's. Added columns:

- ``batch_gpu_energy.server_id`` (looked up from the same file's ``batches``) when the source lacks it;
- ``client_requests.client_clock_offset_ns`` and ``client_requests.client_started_ns``: the row's own
  ``clock_offset_ns`` (server − client, measured by the worker that sent it) or, in client DBs that lack it,
  the same file's ``client_runs`` offset for that run; and that run's ``started_ns``.

Telemetry is not copied sample by sample: it is aggregated at ingest into 5 s buckets and exact
per-run-window aggregates (samples.py), incrementally by the source's telemetry rowid.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import sqlite_utils

from llmwatts.analysis import bucket_prefetch, bulk_copy, samples, study_file, timeline
from llmwatts.analysis import study_db as schema
from llmwatts.errors import InvalidArgument, NotFound


@dataclass
class SourceResult:
    """What one ingested file contributed: ``rows`` per table (rows read from the file); ``skipped`` when
    the same file (path and SHA-256) was ingested before."""

    path: str
    kind: str
    sha256: str
    size_bytes: int
    rows: dict[str, int] = field(default_factory=dict)
    skipped: bool = False


@dataclass
class IngestResult:
    study_db: str
    sources: list[SourceResult]


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
    return conn


def _tables(conn: sqlite3.Connection, schema: str = "main") -> set[str]:
    return {r[0] for r in conn.execute(f"SELECT name FROM [{schema}].sqlite_master WHERE type = 'table'")}


def _kind_of(path: Path, tables: set[str]) -> str:
    for kind, required in schema.REQUIRED.items():
        if all(t in tables for t in required):
            return kind
    found = ", ".join(sorted(t for t in tables if not t.startswith("sqlite_"))) or "no tables"
    raise InvalidArgument(
        f"{path} is neither an llmwatts server DB (needs {', '.join(schema.REQUIRED['server'])}) "
        f"nor a client DB (needs {', '.join(schema.REQUIRED['client'])}); it has {found}"
    )


def _check_keys(conn, path: Path, table: str, pk: tuple[str, ...]) -> None:
    names = [c for c, _ in schema.columns(conn, table)]
    derive_server_id = table == "batch_gpu_energy" and "server_id" not in names
    missing = [c for c in pk if c not in names and not (derive_server_id and c == "server_id")]
    if missing:
        raise InvalidArgument(
            f"{path}: table {table} lacks column(s) {', '.join(missing)}; "
            "is it from a different llmwatts version?"
        )


def _check_sources(conn, path: Path, tables: set[str]) -> None:
    """What the old row-by-row ingest refused, refused here before anything is written."""
    if "batch_gpu_energy" in tables and "server_id" not in {c for c, _ in schema.columns(conn, "batch_gpu_energy")}:
        n_servers = conn.execute("SELECT count(*) FROM servers").fetchone()[0]
        orphan = None if n_servers == 1 else conn.execute(  # one server: an orphan's server is that one
            "SELECT e.batch_id FROM batch_gpu_energy e LEFT JOIN batches b ON b.batch_id = e.batch_id "
            "WHERE b.batch_id IS NULL LIMIT 1").fetchone()
        if orphan is not None:
            raise InvalidArgument(
                f"{path}: batch_gpu_energy row for batch {orphan[0]!r} has no batch row "
                "and the file holds several servers; cannot tell which server it belongs to"
            )
    if "client_runs" in tables:
        twice = conn.execute(
            "SELECT run_id FROM client_runs GROUP BY run_id HAVING count(DISTINCT clock_offset_ns) > 1 "
            "LIMIT 1").fetchone()
        if twice is not None:
            raise InvalidArgument(
                f"{path}: run {twice[0]!r} has two client_runs rows with different clock offsets; "
                "write one client DB per worker"
            )


def _select_expressions(table: str, names: list[str], one_server: bool = False) -> dict[str, str]:
    """Study column -> SQL expression over the source row ``s`` (schema ``src``). ``one_server``: every batch
    of the source is its one server's (``_one_server``), so a batch's server needs no lookup per row."""
    exprs = {name: f"s.[{name}]" for name in names}
    if table == "batch_gpu_energy" and "server_id" not in names:
        exprs["server_id"] = "(SELECT min(server_id) FROM src.servers)" if one_server else (
            "coalesce((SELECT b.server_id FROM src.batches b WHERE b.batch_id = s.batch_id), "
            "(SELECT min(server_id) FROM src.servers))"
        )
    if table == "client_requests":
        run_offset = "(SELECT r.clock_offset_ns FROM src.client_runs r WHERE r.run_id = s.run_id)"
        # The row's own offset (its worker's machine) wins over the run's (the master's).
        exprs["client_clock_offset_ns"] = (
            f"coalesce(s.clock_offset_ns, {run_offset})" if "clock_offset_ns" in names else run_offset
        )
        exprs["client_started_ns"] = "(SELECT r.started_ns FROM src.client_runs r WHERE r.run_id = s.run_id)"
    return exprs


def _one_server(db: sqlite_utils.Database) -> bool:
    """Whether every batch of the attached source names no server or the file's first (min) server: then the
    per-row lookup of ``batch_gpu_energy.server_id`` (its batch's server, else the first) is that one value
    for every row (a million index lookups saved at a million batch-GPU rows)."""
    return db.execute("SELECT NOT EXISTS (SELECT 1 FROM src.batches WHERE server_id IS NOT NULL AND "
                      "server_id IS NOT (SELECT min(server_id) FROM src.servers))").fetchone()[0] == 1


def _copy_table(db: sqlite_utils.Database, path: Path, table: str, pk: tuple[str, ...], after_rows=None) -> int:
    """``INSERT … SELECT`` the attached source's ``table`` into the study DB, upserting on ``pk``. Returns the rows
    written. ``after_rows(db)``: called once, when the rows are in (before the table's indexes are built where
    building them cannot fail, ``bulk_copy.copy``)."""
    if table == "telemetry":  # the buckets are in (ingest_file); the run windows need the runs just copied
        prefetched = bucket_prefetch.copy_prefetched(db, path)  # or now, from the child started beforehand
        if prefetched is not None:
            db._telemetry_new_samples, db._telemetry_since_ns = prefetched
        samples.windows(db, "src", db._telemetry_since_ns)
        timeline.fill(db, "src", db._telemetry_since_ns)  # short runs' own finer timelines
        return db._telemetry_new_samples
    columns = schema.columns(db.conn, table, "src")
    schema.ensure_table(db, table, columns, pk)
    exprs = _select_expressions(table, [c for c, _ in columns], table == "batch_gpu_energy" and _one_server(db))
    where = "WHERE true"  # SQLite needs a WHERE before ON CONFLICT in INSERT … SELECT
    updates = [c for c in exprs if c not in pk]
    conflict = (
        f"ON CONFLICT ({', '.join(f'[{c}]' for c in pk)}) DO UPDATE SET "
        + ", ".join(f"[{c}] = excluded.[{c}]" for c in updates)
        if updates else "ON CONFLICT DO NOTHING"
    )
    insert = (f"INSERT INTO main.[{table}] ({', '.join(f'[{c}]' for c in exprs)}) "
              f"SELECT {', '.join(exprs.values())} FROM src.[{table}] s")
    if table in schema.BULK_TABLES:
        early = after_rows if after_rows is not None and bulk_copy.source_key_unique(db, table, pk) else None
        copied = bulk_copy.copy(db, table, insert, columns, exprs, early)
        if copied is not None:
            if after_rows is not None and not copied.after_rows_done:
                after_rows(db)
            return copied.rows
    before = db.conn.total_changes  # a bulk copy rolled back counts its rows in total_changes
    db.execute(f"{insert} {where} {conflict}")
    rows = db.conn.total_changes - before
    if after_rows is not None:
        after_rows(db)
    return rows


def _path_known(db: sqlite_utils.Database, path: Path) -> bool:
    if not db["sources"].exists():
        return False
    return db.execute("SELECT 1 FROM sources WHERE path = ?", [str(path.resolve())]).fetchone() is not None


def _already_ingested(db: sqlite_utils.Database, path: Path, sha256: str) -> bool:
    if not db["sources"].exists():
        return False
    return db.execute("SELECT 1 FROM sources WHERE path = ? AND sha256 = ?",
                      [str(path.resolve()), sha256]).fetchone() is not None


def validate_file(path: str | os.PathLike, kind: str) -> set[str]:
    """Check one source before anything is written: it exists, is SQLite, is a ``kind`` DB, and its tables
    have their key columns. Returns its tables."""
    path = Path(path)
    conn = _open_source(path)
    try:
        tables = _tables(conn)
        actual = _kind_of(path, tables)
        if actual != kind:
            flag = "--server-db" if actual == "server" else "--client-db"
            raise InvalidArgument(f"{path} is a {actual} DB, not a {kind} DB; pass it with {flag}")
        spec = schema.SERVER_TABLES if kind == "server" else schema.CLIENT_TABLES
        for table, pk in spec.items():
            if table in tables:
                _check_keys(conn, path, table, pk)
        _check_sources(conn, path, tables)
        return tables
    except sqlite3.DatabaseError as e:
        raise InvalidArgument(f"{path}: cannot read ({e})") from e
    finally:
        conn.close()


def ingest_file(db: sqlite_utils.Database, path: str | os.PathLike, kind: str, *,
                after_requests=None) -> SourceResult:
    """Copy one server or client DB into ``db``. ``kind`` is what the caller expects it to be. Leaves the
    study marked stale: ``views.refresh`` (``ingest`` calls it) rebuilds the derived tables.
    ``after_requests(db)``: called inside the copy once a server DB's ``requests`` are in (``_ingest_all``)."""
    path = Path(path)
    tables = validate_file(path, kind)
    hashing = None
    if _path_known(db, path):  # a file seen at this path before: skipped whole when its content is the same
        sha256, size_bytes = file_sha256(path)
        if _already_ingested(db, path, sha256):
            return SourceResult(str(path), kind, sha256, size_bytes, skipped=True)
    else:  # a new path is never skipped: hash it beside the copy (hashlib lets go of the GIL; ~1 s per GB)
        pool = ThreadPoolExecutor(1, thread_name_prefix="llmwatts-sha256")
        hashing = pool.submit(file_sha256, path)
        pool.shutdown(wait=False)
    try:
        return _ingest_new(db, path, kind, tables, hashing.result if hashing else lambda: (sha256, size_bytes),
                           after_requests)
    finally:
        if hashing is not None:
            hashing.result()  # never leave the thread reading the file (an error above still waits for it)


def _ingest_new(db: sqlite_utils.Database, path: Path, kind: str, tables: set[str], digest,
                after_requests=None) -> SourceResult:
    """The copy of a file not skipped; ``digest()`` gives its (SHA-256, size) once the copy is done."""
    from llmwatts.analysis import views

    spec = schema.SERVER_TABLES if kind == "server" else schema.CLIENT_TABLES
    result = SourceResult(str(path), kind, "", 0)
    views.drop_triggers(db)
    db.conn.commit()
    db.execute(f"PRAGMA cache_size = -{schema.CACHE_MIB * 1024}")
    if db.execute("PRAGMA journal_mode").fetchone()[0] == "wal":  # not a new file being built (study_file.py)
        db.execute("PRAGMA synchronous = NORMAL")  # WAL: safe from corruption; the sources stay the truth
    if "telemetry" in tables and not bucket_prefetch.prefetched(db, path):  # before the attach (samples.py)
        db._telemetry_new_samples, db._telemetry_since_ns = samples.copy(db, path)
    _attach(db, path)
    try:
        with db.conn:
            for table, pk in spec.items():
                if table in tables:
                    result.rows[table] = _copy_table(db, path, table, pk,
                                                     after_requests if table == "requests" else None)
            result.sha256, result.size_bytes = digest()
            db["sources"].upsert(
                {
                    "path": str(path.resolve()),
                    "sha256": result.sha256,
                    "kind": kind,
                    "size_bytes": result.size_bytes,
                    "ingested_ns": time.time_ns(),
                    "rows": json.dumps(result.rows),
                },
                pk=("path", "sha256"),
            )
        return result
    except sqlite3.DatabaseError as e:
        raise InvalidArgument(f"{path}: cannot read ({e})") from e
    finally:
        db.execute("DETACH DATABASE src")


def _attach(db: sqlite_utils.Database, path: Path) -> None:
    # Read-only by URI where the connection allows URIs; else a plain attach (only ever read).
    try:
        db.execute("ATTACH DATABASE ? AS src", [f"file:{path.resolve()}?mode=ro"])
        db.execute("SELECT count(*) FROM src.sqlite_master").fetchone()
    except sqlite3.OperationalError:
        try:
            db.execute("DETACH DATABASE src")
        except sqlite3.OperationalError:
            pass
        db.execute("ATTACH DATABASE ? AS src", [str(path.resolve())])


def ingest(
    study_db: str | os.PathLike | sqlite_utils.Database,
    server_dbs: list[str | os.PathLike] = (),
    client_dbs: list[str | os.PathLike] = (),
) -> IngestResult:
    """Ingest server and client DBs into ``study_db`` (created if needed). Idempotent and incremental.

    All inputs are checked (exist, are SQLite, are the right kind) before anything is written. Afterwards
    the per-run tables the views read (percentiles, steady-state spans) are refreshed (views.refresh).
    """
    for path in server_dbs:
        validate_file(path, "server")
    for path in client_dbs:
        validate_file(path, "client")
    if study_file.is_new(study_db):  # built beside its path and renamed into place (study_file.py)
        try:
            with study_file.building(study_db) as db:
                sources = _ingest_all(db, server_dbs, client_dbs, building=True)
            return IngestResult(os.path.abspath(study_db), sources)
        except study_file.Appeared:
            pass  # another process made the study DB meanwhile: ingest into it, as into any existing one
    db = schema.open_study_db(study_db)
    sources = _ingest_all(db, server_dbs, client_dbs)
    return IngestResult(str(db.conn.execute("PRAGMA database_list").fetchone()[2]), sources)


def _ingest_all(db: sqlite_utils.Database, server_dbs, client_dbs, building: bool = False) -> list[SourceResult]:
    """``building``: ``db`` is a new study DB being built (study_file.py); its request pass then starts once the
    last server DB's ``requests`` are in, beside that file's telemetry (``_start_request_pass``)."""
    from llmwatts.analysis import views

    try:  # the server DBs' telemetry is aggregated in child processes while the client DBs are copied
        for path in server_dbs:
            bucket_prefetch.prefetch(db, path)
        clients = [ingest_file(db, p, "client") for p in client_dbs]
        last = len(server_dbs) - 1
        sources = [ingest_file(db, p, "server", after_requests=_start_request_pass if building and i == last else None)
                   for i, p in enumerate(server_dbs)] + clients
        views.ensure_fresh(db)
    finally:
        bucket_prefetch.discard_prefetched(db)
        child = getattr(db, "_request_pass_child", None)
        if child is not None:  # an ingest that failed after starting it
            del db._request_pass_child
            child.discard()
    return sources


# The early request pass's niceness, as the telemetry child's (bucket_prefetch.CHILD_NICENESS, where the
# measurements are): 0. Niced above the telemetry child (15 against 10, before), both yielded to every other
# process on a busy machine (21 s against 16-17.6 s beside other load); on a quiet box the same wall. (Earlier,
# this pass at 0 beside a telemetry child at 10 starved that child: this process waited 5.2 s for its buckets.)
EARLY_PASS_NICENESS = 0


def _start_request_pass(db: sqlite_utils.Database) -> None:
    """Start the request pass (request_pass.py) in its child process now, beside the last server DB's
    telemetry, instead of after it: every table it reads (client DBs' tables, ``servers`` … ``requests``,
    ``run_slo``) is final here, and what the ingest writes afterwards (the ``requests`` indexes, which the
    child's table scans do not use, ``batch_gpu_energy``, telemetry aggregates, ``cap_events``, ``idle_power``,
    ``sources``) it never reads. Only in a new study DB being built: the copy so far is
    committed (a failed build is removed whole, study_file.py), and the file switches to WAL so that the child
    reads committed pages while this connection goes on writing (a rollback journal would block this
    process's commit on the child's read locks). ``views.refresh`` then waits for the child."""
    from llmwatts.analysis import duck, request_pass, views

    if not duck.available():
        return
    db.conn.commit()
    db.execute("PRAGMA main.journal_mode = WAL")
    views.set_slo(db, None)  # as views.refresh sets it for the ingest (the same rows again there)
    path = db.execute("PRAGMA database_list").fetchone()[2]
    child = request_pass.start_child(path, EARLY_PASS_NICENESS)
    if child is not None:
        db._request_pass_child = child
