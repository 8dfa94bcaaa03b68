"""The client DB: schema in one place, and the recorder that keeps one exact row per request.

One SQLite file per load run (the local runner or the distributed master writes it; workers ship their
rows to the master). ``request_id`` is the primary key, so a row written twice fails loudly instead of
double-counting.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import sqlite_utils

CLIENT_REQUESTS = "client_requests"
CLIENT_RUNS = "client_runs"

# Column order and types of docs/architecture.md "Client DB". STRICT tables: the types are enforced.
CLIENT_REQUESTS_COLUMNS: dict[str, type] = {
    "request_id": str,
    "run_id": str,
    "worker": str,
    "dataset": str,
    "batch_size": int,
    "stream": int,            # 0/1
    "client_send_ns": int,    # client wall clock when the call was sent
    "first_token_ns": int,    # client wall clock at the first chunk with tokens (streaming only)
    "done_ns": int,           # client wall clock when the last byte arrived (or the call failed)
    "latency_ms": float,      # perf_counter duration of the call
    "ttft_ms": float,         # perf_counter time to the first chunk with tokens (streaming only)
    "prompt_tokens": int,     # sums over the request's prompts (server's count)
    "output_tokens": int,
    "output_words": int,      # whitespace-split words of every completion (as the paper counts)
    "status": str,            # "ok" or the gRPC status code name
    "error": str,
    "batch_id": str,
    "clock_offset_ns": int,   # server − client clock of the machine that sent it (each worker measures its own)
}
CLIENT_RUNS_COLUMNS: dict[str, type] = {
    "run_id": str,
    "target": str,
    "started_ns": int,
    "ended_ns": int,
    "labels": str,            # JSON object
    "clock_offset_ns": int,   # server − client, from GetServerInfo's midpoint
    "users": int,
    "batch_size": int,
    "dataset": str,
    "stream": int,
}


def open_client_db(path: str | os.PathLike) -> sqlite_utils.Database:
    """Open (creating if needed) a client DB in WAL mode with both tables."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite_utils.Database(path)
    db.enable_wal()
    if not db[CLIENT_REQUESTS].exists():
        db[CLIENT_REQUESTS].create(CLIENT_REQUESTS_COLUMNS, pk="request_id", strict=True)
        db[CLIENT_REQUESTS].create_index(["run_id"], if_not_exists=True)
    if not db[CLIENT_RUNS].exists():
        db[CLIENT_RUNS].create(CLIENT_RUNS_COLUMNS, pk="run_id", strict=True)
    for table, columns in ((CLIENT_REQUESTS, CLIENT_REQUESTS_COLUMNS), (CLIENT_RUNS, CLIENT_RUNS_COLUMNS)):
        for name, kind in columns.items():  # a DB from an older llmwatts gains the newer columns
            if name not in db[table].columns_dict:
                db[table].add_column(name, kind)
    return db


def write_run_start(db: sqlite_utils.Database, run: dict) -> None:
    """Insert (or replace) a run's row at test start; ``ended_ns`` stays NULL until ``write_run_end``."""
    row = {name: None for name in CLIENT_RUNS_COLUMNS}  # every column, so a replace leaves no stale value
    row.update(run)
    if isinstance(row.get("labels"), dict):
        row["labels"] = json.dumps(row["labels"], sort_keys=True)
    db[CLIENT_RUNS].insert(row, replace=True)


def write_run_end(db: sqlite_utils.Database, run_id: str, ended_ns: int) -> None:
    db[CLIENT_RUNS].update(run_id, {"ended_ns": ended_ns})


def db_sink(db: sqlite_utils.Database) -> Callable[[list[dict]], None]:
    """A sink that inserts rows; a duplicate ``request_id`` raises (exactly-once is enforced, not hoped)."""

    def write(rows: list[dict]) -> None:
        db[CLIENT_REQUESTS].insert_all(_complete(rows), batch_size=len(rows) or 1)

    return write


def _complete(rows: Iterable[dict]) -> Iterable[dict]:
    # Every row carries every column so insert_all never infers a narrower column set from the first row.
    for row in rows:
        yield {name: row.get(name) for name in CLIENT_REQUESTS_COLUMNS}


class RequestRecorder:
    """Collects per-request rows and hands them to ``sink`` in batches of ``flush_rows``.

    ``flush()`` hands over whatever is buffered (call it on a timer and at test stop). ``count`` is how
    many rows were added; ``flushed`` how many reached the sink.
    """

    def __init__(self, sink: Callable[[list[dict]], None], flush_rows: int = 256):
        self._sink = sink
        self._flush_rows = flush_rows
        self._rows: list[dict] = []
        self._lock = threading.Lock()  # a gevent-patched lock under Locust; a real one elsewhere
        self.count = 0
        self.flushed = 0

    def add(self, row: dict) -> None:
        self.add_many([row])

    def add_many(self, rows: list[dict]) -> None:
        with self._lock:
            self._rows.extend(rows)
            self.count += len(rows)
            full = len(self._rows) >= self._flush_rows
        if full:
            self.flush()

    def flush(self) -> int:
        """Hand buffered rows to the sink; returns how many. On a sink error the rows stay buffered."""
        with self._lock:
            rows, self._rows = self._rows, []
            if not rows:
                return 0
            try:
                self._sink(rows)
            except BaseException:
                self._rows[:0] = rows
                raise
            self.flushed += len(rows)
            return len(rows)

    @property
    def pending(self) -> int:
        return len(self._rows)
