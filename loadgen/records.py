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
from dataclasses import asdict, dataclass
from pathlib import Path

import sqlite_utils

from llmwatts.schema import columns_of

CLIENT_REQUESTS = "client_requests"
CLIENT_RUNS = "client_runs"
CLIENT_CHUNKS = "client_chunks"
CHUNKS_KEY = "chunks"  # a wire row's optional list of ClientChunk dicts (--record-chunks)


@dataclass
class ClientRequest:
    """One request as the load generator saw it: one row of ``client_requests`` (its schema comes from here).

    Built once per request by ``loadgen.users`` (``client_request``), whatever happened to the call.
    Times: ``*_ns`` are this machine's wall clock (joinable with the server after ``clock_offset_ns``);
    ``*_ms`` durations come from ``time.perf_counter_ns`` (immune to clock steps).
    """

    request_id: str
    run_id: str
    worker: str                              # host name, or the Locust worker id
    dataset: str
    batch_size: int
    stream: int                              # 0/1
    client_send_ns: int | None = None        # wall clock when the call was sent
    first_token_ns: int | None = None        # wall clock at the first chunk with tokens (streams only)
    done_ns: int | None = None               # wall clock when the last byte arrived (or the call failed)
    latency_ms: float | None = None          # E2E: send to last byte
    ttft_ms: float | None = None             # send to the first chunk with tokens (streams only)
    prompt_tokens: int | None = None         # sums over the request's prompts (the server's count)
    output_tokens: int | None = None
    output_words: int | None = None          # whitespace-split words of every completion (as the paper counts)
    status: str = "CANCELLED"                # "ok" or the gRPC status code name
    error: str | None = None
    batch_id: str | None = None              # the server's
    clock_offset_ns: int | None = None       # server − client clock of the machine that sent it
    scheduled_send_ns: int | None = None     # open loop (--rate): when the arrival process said to send
    longest_output_tokens: int | None = None  # the longest completion's output tokens (decode steps)
    tpot_ms: float | None = None             # (latency_ms − ttft_ms) / (longest_output_tokens − 1)
    itl_count: int | None = None             # inter-chunk gaps between chunks carrying tokens
    itl_mean_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    itl_max_ms: float | None = None
    itl_source: str | None = None            # "server_steps" (token_server_ns diffs) or "client_chunks"


@dataclass
class ClientChunk:
    """One token-carrying chunk of a streamed call (``client_chunks``, only with ``--record-chunks``)."""

    request_id: str
    chunk_index: int                         # 0 = the first chunk with tokens
    arrival_ns: int                          # wall clock
    elapsed_ms: float                        # perf_counter time since the call was sent
    tokens: int                              # the most tokens any one sequence got in this chunk
    step_server_ns: str | None = None        # JSON list: server clock of each decode step in this chunk


@dataclass
class ClientRun:
    """One load run (``client_runs``)."""

    run_id: str
    target: str | None = None
    started_ns: int | None = None
    ended_ns: int | None = None
    labels: str | None = None                # JSON object
    clock_offset_ns: int | None = None       # server − client, from GetServerInfo's midpoint
    users: int | None = None
    batch_size: int | None = None
    dataset: str | None = None
    stream: int | None = None


CLIENT_REQUESTS_COLUMNS: dict[str, type] = columns_of(ClientRequest)
CLIENT_CHUNKS_COLUMNS: dict[str, type] = columns_of(ClientChunk)
CLIENT_RUNS_COLUMNS: dict[str, type] = columns_of(ClientRun)


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
    if not db[CLIENT_CHUNKS].exists():
        db[CLIENT_CHUNKS].create(CLIENT_CHUNKS_COLUMNS, pk=("request_id", "chunk_index"), strict=True)
    for table, columns in ((CLIENT_REQUESTS, CLIENT_REQUESTS_COLUMNS), (CLIENT_RUNS, CLIENT_RUNS_COLUMNS)):
        for name, kind in columns.items():  # a DB from an older llmwatts gains the newer columns
            if name not in db[table].columns_dict:
                db[table].add_column(name, kind)
    return db


def write_run_start(db: sqlite_utils.Database, run: dict) -> None:
    """Insert (or replace) a run's row at test start; ``ended_ns`` stays NULL until ``write_run_end``."""
    run = dict(run)
    if isinstance(run.get("labels"), dict):
        run["labels"] = json.dumps(run["labels"], sort_keys=True)
    # Every column (from the record), so a replace leaves no stale value.
    db[CLIENT_RUNS].insert(asdict(ClientRun(**run)), replace=True)


def write_run_end(db: sqlite_utils.Database, run_id: str, ended_ns: int) -> None:
    db[CLIENT_RUNS].update(run_id, {"ended_ns": ended_ns})


def db_sink(db: sqlite_utils.Database) -> Callable[[list[dict]], None]:
    """A sink that inserts rows; a duplicate ``request_id`` raises (exactly-once is enforced, not hoped)."""

    def write(rows: list[dict]) -> None:
        chunks = [c for row in rows for c in row.get(CHUNKS_KEY) or ()]
        db[CLIENT_REQUESTS].insert_all(_complete(rows, CLIENT_REQUESTS_COLUMNS), batch_size=len(rows) or 1)
        if chunks:
            db[CLIENT_CHUNKS].insert_all(_complete(chunks, CLIENT_CHUNKS_COLUMNS), batch_size=len(chunks))

    return write


def wire_row(request: ClientRequest, chunks: Iterable[ClientChunk] = ()) -> dict:
    """A request (and its chunks, when recorded) as the plain dict the recorder buffers and workers ship."""
    # vars(), not asdict(): the fields are scalars, and asdict's deep copy cost ~60 µs per request.
    row = dict(vars(request))
    chunk_rows = [dict(vars(c)) for c in chunks]
    if chunk_rows:
        row[CHUNKS_KEY] = chunk_rows
    return row


def _complete(rows: Iterable[dict], columns: dict[str, type]) -> Iterable[dict]:
    # Every row carries every column so insert_all never infers a narrower column set from the first row.
    for row in rows:
        yield {name: row.get(name) for name in columns}


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
