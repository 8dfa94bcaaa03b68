"""Telemetry buckets of a server DB computed beside its other tables' copy (issue 21).

A server DB new to the study is aggregated whole by DuckDB (samples.py). ``prefetch`` starts that in a child
process (``python -m llmwatts.analysis.bucket_prefetch PATH COLUMNS``) before the ingest copies the file's
``requests``, ``batches`` … and the client DBs, so the two run on both cores; ``copy_prefetched`` stores the
child's rows, inside the ingest's transaction, where ``samples.copy`` would have. A child, not a thread:
DuckDB links its own SQLite, and two SQLite libraries must not have one file open in one process
(request_pass.py). Same rows either way; when the child fails, SQLite aggregates the file in this process.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the child process (bucket_prefetch) need not import it
    import sqlite_utils

from llmwatts.analysis import duck, samples


class _BucketsChild(duck.Child):
    """``_buckets_duckdb`` of one server DB in a child process (``python -m llmwatts.analysis.bucket_prefetch``), so
    that it runs on the other core while this process copies the file's other tables (two SQLite libraries
    must not have one file open in one process: request_pass.py). Rows come back pickled in a temp file, in chunks."""

    def __init__(self, path: Path, names: set[str], server_id: str | None = None):
        super().__init__("llmwatts.analysis.bucket_prefetch", str(path), json.dumps(sorted(names)),
                         json.dumps(server_id))

    def rows(self, timeout_s: float = 3600) -> list[tuple] | None:
        """The child's rows; None when it failed (the caller then aggregates in SQLite)."""
        got = self.output(_unpickle_chunks, timeout_s, (OSError, pickle.UnpicklingError, EOFError))
        if got is None:
            return None
        rows, peak = got
        CHILD_PEAKS_MIB.append(peak)
        return rows


def _unpickle_chunks(out) -> tuple[list[tuple], float]:
    """The child's chunks of rows, then its ("peak", MiB) -> (rows, peak)."""
    rows = []
    while (record := pickle.load(out))[0] == "rows":  # chunks, then ("peak", MiB)
        rows.extend(record[1])
    return rows, record[1]


# The child's niceness (added to this process's): 0. A niced child yields its core to every other process on the
# machine, not only to this ingest's copies. 1M x 10M study, 2-core box, whole bench/analysis.py runs in farm-bench
# pairs (2026-12-06, 22:48-22:57 UTC), niceness of (this child, the early request pass): on a quiet box (0, 5)
# 13.3 s against (10, 15) 13.1 s; beside a busy loop on one core (0, 5) 17.6 s against (10, 15) 21.0 s, and
# (0, 0) 16.7 s against (0, 5) 18.1 s; at load ~3 from other sessions (0, 0) 16.1 s against (10, 15) 21.2 s.
# DuckDB's threads: every core (two threads spent 5.5 s CPU on the buckets' query at 10M samples, one 6.9 s).
CHILD_NICENESS = 0
CHILD_PEAKS_MIB: list[float] = []  # peak memory (VmHWM) of each _BucketsChild, for bench/analysis.py


def _children(db: sqlite_utils.Database) -> dict:
    if not hasattr(db, "_bucket_children"):
        db._bucket_children = {}
    return db._bucket_children


def prefetch(db: sqlite_utils.Database, path) -> None:
    """Start DuckDB's buckets of a server DB new at this path (aggregated whole) in a child process, before
    its ingest copies the other tables; ``copy_prefetched`` stores them. Nothing when DuckDB is missing, the
    file was ingested before (incremental: ``copy``) or holds no samples. Call with no transaction open."""
    path = Path(path).resolve()
    if path in _children(db) or not duck.available():
        return
    db.execute("ATTACH DATABASE ? AS tsrc", [f"file:{path}?mode=ro"])
    try:
        if not samples.has_table(db, "tsrc", "telemetry") or samples._cursor(db, "tsrc", path) != 0:
            return
        if db.execute("SELECT 1 FROM tsrc.telemetry LIMIT 1").fetchone() is None:
            return
        names = set(samples._columns(db, "tsrc", "telemetry"))
        server_id = samples.one_server(db, "tsrc")
    finally:
        db.execute("DETACH DATABASE tsrc")
    _children(db)[path] = _BucketsChild(path, names, server_id)


def prefetched(db: sqlite_utils.Database, path) -> bool:
    return Path(path).resolve() in _children(db)


def discard_prefetched(db: sqlite_utils.Database) -> None:
    """Stop every child not used (an ingest that failed before reaching its telemetry)."""
    while _children(db):
        _children(db).popitem()[1].discard()


def copy_prefetched(db: sqlite_utils.Database, path) -> tuple[int, int | None] | None:
    """``copy`` of a whole file whose buckets ``prefetch`` started, inside the caller's transaction with the
    file attached as ``src``: the same rows (the child's, or SQLite's when it failed). None when no child
    was started for ``path``."""
    path = Path(path).resolve()
    child = _children(db).pop(path, None)
    if child is None:
        return None
    try:
        names = set(samples._columns(db, "src", "telemetry"))
        samples._register_gpus(db, "src", names)
        last = db.execute("SELECT rowid, server_id, gpu_uuid, ts_ns FROM src.telemetry "
                          "ORDER BY rowid DESC LIMIT 1").fetchone()
        rows = child.rows()
    finally:
        child.discard()
    return samples.store_whole(db, path, names, samples._gpu_keys(db, "src"), last, rows, schema="src")


def main(argv=None) -> int:
    """The child of ``_BucketsChild``: argv = server DB path, JSON list of its telemetry columns, JSON of the
    file's one server id or null (``samples.one_server``)."""
    from llmwatts.analysis.duck import peak_mib

    path, names, server_id = sys.argv[1:] if argv is None else argv
    os.nice(CHILD_NICENESS)
    chunks = samples.bucket_chunks_duckdb(Path(path), set(json.loads(names)), server_id=json.loads(server_id))
    if chunks is None:
        return 1
    for chunk in chunks:  # pickled a chunk at a time: never every row at once in this process
        pickle.dump(("rows", chunk), sys.stdout.buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickle.dump(("peak", peak_mib()), sys.stdout.buffer, protocol=pickle.HIGHEST_PROTOCOL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
