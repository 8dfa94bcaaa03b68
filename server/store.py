"""The server's SQLite store: schema in one place, WAL, batched writes, safe from many threads.

Tables are described in docs/architecture.md ("Server DB"). Writers from the telemetry sampler, the
batcher and gRPC threads share one connection behind a lock; telemetry rows are buffered and written
in batches so the sampler never waits on disk per sample.
"""

import json
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

from llmwatts.schema import as_row, columns_of
from llmwatts.server.records import BatchRow, GpuEnergyRow, RequestRow

# name -> (columns, primary key). STRICT tables: SQLite refuses a value of the wrong type. The batchers'
# tables come from their records (server/records.py).
SCHEMA: dict[str, tuple[dict, str | tuple | None]] = {
    "servers": (
        {"server_id": str, "started_ns": int, "node": str, "model": str, "dtype": str, "engine": str,
         "power_source": str, "shard_count": int, "layout": str, "simulated": int, "versions": str},
        "server_id",
    ),
    "gpus": (
        {"server_id": str, "gpu_uuid": str, "node": str, "rank": int, "gpu_index": int, "name": str,
         "memory_total_bytes": int, "simulated": int},
        ("server_id", "gpu_uuid"),
    ),
    "telemetry": (
        {"server_id": str, "ts_ns": int, "gpu_uuid": str, "node": str, "rank": int, "power_mw": int,
         "power_instant_mw": int, "energy_mj": int, "sm_pct": float, "mem_pct": float,
         "mem_used_bytes": int, "sm_clock_mhz": int, "temp_c": int, "cap_mw": int, "simulated": int,
         "mem_clock_mhz": int, "clock_event_reasons": int},  # reasons: NVML's bits (gpu.CLOCK_EVENT_REASONS)
        None,
    ),
    "batches": (columns_of(BatchRow), "batch_id"),
    "batch_gpu_energy": (columns_of(GpuEnergyRow), ("batch_id", "gpu_uuid")),
    "requests": (columns_of(RequestRow), "request_id"),
    "runs": (
        {"run_id": str, "server_id": str, "begin_ns": int, "end_ns": int, "begin_energy_j": float,
         "end_energy_j": float, "labels": str, "simulated": int,
         # runs.py: the owner's secret (its sha256 only), the client (peer host) that began it, when EndRun
         # arrived (end_ns is after the run's requests ended) and how many were still running at end_ns.
         "secret_sha256": str, "client": str, "end_requested_ns": int, "pending_at_end": int},
        "run_id",
    ),
    # Refusals before a request row exists (invalid requests, calls over a concurrency limit), counted.
    "refusals": (
        {"server_id": str, "code": str, "count": int},
        ("server_id", "code"),
    ),
    "cap_events": (
        {"id": int, "server_id": str, "ts_ns": int, "gpu_uuid": str, "node": str, "rank": int,
         "kind": str, "old_cap_w": float, "new_cap_w": float, "who": str, "reason": str, "simulated": int},
        "id",
    ),
    # Locked-clock changes (server/clocks.py); NULL clocks: unlocked (memory: left alone).
    "clock_events": (
        {"id": int, "server_id": str, "ts_ns": int, "gpu_uuid": str, "node": str, "rank": int, "kind": str,
         "old_sm_min_mhz": int, "old_sm_max_mhz": int, "old_mem_min_mhz": int, "old_mem_max_mhz": int,
         "new_sm_min_mhz": int, "new_sm_max_mhz": int, "new_mem_min_mhz": int, "new_mem_max_mhz": int,
         "who": str, "reason": str, "simulated": int},
        "id",
    ),
}



def _upsert_sql(table: str, record_class, replace: bool) -> tuple[str, tuple[str, ...]]:
    """A prepared write of ``record_class`` rows into ``table`` -> (SQL, its columns in order). ``replace``:
    INSERT OR REPLACE (sqlite-utils' ``insert_all(replace=True)``); else an upsert that keeps the row
    (and its rowid), as sqlite-utils' ``upsert``."""
    columns = tuple(columns_of(record_class))
    names, marks = ", ".join(f"[{c}]" for c in columns), ", ".join("?" * len(columns))
    if replace:
        return f"INSERT OR REPLACE INTO [{table}] ({names}) VALUES ({marks})", columns
    pk = SCHEMA[table][1]
    pk = (pk,) if isinstance(pk, str) else pk
    sets = ", ".join(f"[{c}] = excluded.[{c}]" for c in columns if c not in pk)
    return (f"INSERT INTO [{table}] ({names}) VALUES ({marks}) "
            f"ON CONFLICT ({', '.join(f'[{c}]' for c in pk)}) DO UPDATE SET {sets}"), columns


# The continuous segment's writes (``ServerStore.record_segment``), one statement per table.
SEGMENT_SQL = {"batches": _upsert_sql("batches", BatchRow, replace=False),
               "batch_gpu_energy": _upsert_sql("batch_gpu_energy", GpuEnergyRow, replace=False),
               "requests": _upsert_sql("requests", RequestRow, replace=True)}

# A request id whose row has one of these statuses was refused before any work: it may be used again.
RETRYABLE_STATUSES = frozenset({"RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "UNAVAILABLE", "UNAUTHENTICATED",
                                "PERMISSION_DENIED", "FAILED_PRECONDITION"})
Record = RequestRow | BatchRow | GpuEnergyRow | dict  # (tests may write partial rows as dicts)
RUNNING = "running"  # accepted, not finished; a server that dies leaves it, the next start makes it ABORTED

NOT_NULL = {
    "telemetry": {"server_id", "ts_ns", "gpu_uuid"},
    "requests": {"request_id", "status"},
}


# Per run: is every counted token's energy inside its window? (#17 defect 1; the report flags a run where
# ``window_ok`` is 0.) ``batch_energy_j`` is the energy of the batches holding the run's requests (whole
# batches: with merged batches it may hold other runs' shares), ``window_energy_j`` the counters' delta.
RUN_WINDOWS_VIEW = """
select r.run_id, r.begin_ns, r.end_ns, r.end_requested_ns, r.pending_at_end,
       r.end_energy_j - r.begin_energy_j as window_energy_j,
       (select max(b.end_ns) from batches b where b.batch_id in
           (select q.batch_id from requests q where q.run_id = r.run_id)) as last_batch_end_ns,
       (select sum(b.energy_j) from batches b where b.batch_id in
           (select q.batch_id from requests q where q.run_id = r.run_id)) as batch_energy_j,
       (select count(*) from requests q where q.run_id = r.run_id and q.status = 'running') as running,
       (select count(*) from requests q where q.run_id = r.run_id and q.received_ns > r.end_ns) as after_end,
       case when r.end_ns is null then null
            when coalesce(r.pending_at_end, 0) > 0 then 0
            when (select max(b.end_ns) from batches b where b.batch_id in
                     (select q.batch_id from requests q where q.run_id = r.run_id)) > r.end_ns then 0
            when (select count(*) from requests q where q.run_id = r.run_id and q.received_ns > r.end_ns) > 0 then 0
            else 1 end as window_ok
from runs r
"""


def create_schema(db: sqlite_utils.Database) -> None:
    """Create every server table (and indexes, views) if missing, and add columns an older DB lacks.
    Idempotent."""
    for name, (columns, pk) in SCHEMA.items():
        if not db[name].exists():
            db.create_table(name, columns, pk=pk, not_null=NOT_NULL.get(name), strict=True)
        else:  # a DB from an older server: add the columns it lacks (NULL in its old rows)
            have = set(db[name].columns_dict)
            for column, kind in columns.items():
                if column not in have:
                    db[name].add_column(column, kind)
    db.create_view("run_windows", RUN_WINDOWS_VIEW, replace=True)
    db["telemetry"].create_index(["ts_ns"], if_not_exists=True)
    db["requests"].create_index(["run_id"], if_not_exists=True)
    db["requests"].create_index(["batch_id"], if_not_exists=True)


def open_db(path: str | Path) -> sqlite_utils.Database:
    """Open (creating) a server DB in WAL mode with the schema in place."""
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db = sqlite_utils.Database(conn)
    db.enable_wal()
    conn.execute("PRAGMA synchronous=NORMAL")
    create_schema(db)
    return db


class ServerStore:
    """Thread-safe writer for one server's DB. Telemetry is buffered; everything else is written at once."""

    def __init__(self, path: str | Path, server_id: str, telemetry_flush_rows: int = 256):
        self.path = Path(path)
        self.server_id = server_id
        self.db = open_db(self.path)
        self._lock = threading.Lock()
        self._telemetry: list[dict] = []
        self._flush_rows = telemetry_flush_rows
        self._refusals: dict[str, int] = {}  # code -> refusals not yet written (``count_refusal``)
        self._refusals_lock = threading.Lock()  # (not ``_lock``: grpc's polling thread counts, never waits on disk)

    def _insert(self, table: str, rows: list[dict], **kw) -> None:
        if not rows:
            return
        with self._lock:
            self.db[table].insert_all(rows, batch_size=500, **kw)

    def record_server(self, row: dict) -> None:
        row = dict(row, server_id=self.server_id)
        for key in ("layout", "versions"):
            if not isinstance(row.get(key), str):
                row[key] = json.dumps(row.get(key) or {}, sort_keys=True)
        self._insert("servers", [row], replace=True)

    def record_gpus(self, rows: list[dict]) -> None:
        self._insert("gpus", [dict(r, server_id=self.server_id) for r in rows], replace=True)

    def add_telemetry(self, rows: list[dict]) -> None:
        """Buffer telemetry samples; written once the buffer holds ``telemetry_flush_rows`` rows."""
        with self._lock:
            self._telemetry.extend(dict(r, server_id=self.server_id) for r in rows)
            full = len(self._telemetry) >= self._flush_rows
        if full:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            rows, self._telemetry = self._telemetry, []
        self._insert("telemetry", rows)
        self._flush_refusals()

    @contextmanager
    def _transaction(self):
        """Everything written inside lands together or not at all. The connection is in autocommit mode
        (isolation_level=None): open the transaction ourselves, or a failed request insert would leave a
        batch's energy without its requests."""
        with self._lock:
            self.db.conn.execute("BEGIN")
            try:
                yield self.db
            except BaseException:
                self.db.conn.execute("ROLLBACK")
                raise
            self.db.conn.execute("COMMIT")

    def _own(self, record: Record) -> dict:
        """A record as a row of this server (``server_id`` filled in)."""
        return dict(as_row(record), server_id=self.server_id)

    def record_batch(self, batch: BatchRow, gpu_energy: list[GpuEnergyRow], requests: list[RequestRow]) -> None:
        """Write one finished batch, its per-GPU energy and its requests in one transaction."""
        with self._transaction() as db:
            db["batches"].insert(self._own(batch))
            db["batch_gpu_energy"].insert_all([as_row(r) for r in gpu_energy])
            db["requests"].insert_all([self._own(r) for r in requests], replace=True)

    def record_segment(self, batch: BatchRow, gpu_energy: list[GpuEnergyRow], requests: list[RequestRow]) -> None:
        """Write a continuous batch's segment so far (upserted: it grows until it ends), its per-GPU energy
        and every request it holds, in one transaction. The meter thread calls it at every energy read (up to
        50 a second, each with every running request's row), beside the decode loop: prepared statements
        (``SEGMENT_SQL``), not sqlite-utils' per-call schema lookups and value checks (~7 ms a write at 64
        rows on the CPU box, docs/performance.md)."""
        with self._transaction() as db:
            for table, records, own in (("batches", [batch], True), ("batch_gpu_energy", gpu_energy, False),
                                        ("requests", requests, True)):
                sql, columns = SEGMENT_SQL[table]
                db.conn.executemany(sql, [self._values(r, columns, own) for r in records])

    def _values(self, record, columns: tuple[str, ...], own: bool) -> tuple:
        row = vars(record)
        return tuple(self.server_id if own and c == "server_id" else row[c] for c in columns)

    def record_requests(self, requests: list[RequestRow]) -> None:
        """Requests that never reached a batch (refused, cancelled) still get their row."""
        self._insert("requests", [self._own(r) for r in requests], replace=True)

    def claim_request(self, row: RequestRow) -> bool:
        """Write ``row`` (status "running") unless its request id was used before: the DB is the truth
        across restarts. An id whose earlier row was refused before any work (``RETRYABLE_STATUSES``) may
        be claimed again. Check and write are one step under the lock (two concurrent calls, one id)."""
        with self._lock:
            row = self._own(row)
            old = self.db.execute("select status from requests where request_id = ?", [row["request_id"]]).fetchone()
            if old is not None and old[0] not in RETRYABLE_STATUSES:
                return False
            self.db["requests"].insert(row, replace=True)
            return True

    def abort_unfinished(self) -> int:
        """Mark every "running" request left by an earlier server on this DB as ABORTED -> how many."""
        with self._lock:
            return self.db.execute(
                "update requests set status = 'ABORTED', error = 'the server stopped before it finished' "
                "where status = ? and server_id != ?", [RUNNING, self.server_id]).rowcount

    def count_refusal(self, code: str) -> None:
        """One more request refused with ``code`` before it had a row: counted in memory, written with the
        telemetry (``flush``), so a flood of refusals costs no write each. Never waits on a DB write: grpc's
        polling thread calls it (``guard.GuardInterceptor``)."""
        with self._refusals_lock:
            self._refusals[code] = self._refusals.get(code, 0) + 1

    def _flush_refusals(self) -> None:
        with self._refusals_lock:
            counts, self._refusals = self._refusals, {}
        with self._lock:
            for code, n in counts.items():
                self.db.execute("insert into refusals (server_id, code, count) values (?, ?, ?) on conflict "
                                "(server_id, code) do update set count = count + excluded.count",
                                [self.server_id, code, n])

    def begin_run(self, run_id: str, ts_ns: int, energy_j: float, labels: dict, simulated: bool, *,
                  secret_sha256: str | None = None, client: str | None = None) -> bool:
        """Open a run; False (nothing written) when ``run_id`` was already begun: moving its start marker
        would push its earlier requests out of its window."""
        with self._lock:
            if self.db.execute("select 1 from runs where run_id = ?", [run_id]).fetchone():
                return False
            self.db["runs"].insert(
                {"run_id": run_id, "server_id": self.server_id, "begin_ns": ts_ns, "begin_energy_j": energy_j,
                 "labels": json.dumps(labels, sort_keys=True), "simulated": int(simulated),
                 "end_ns": None, "end_energy_j": None, "secret_sha256": secret_sha256, "client": client})
            return True

    def end_run(self, run_id: str, ts_ns: int, energy_j: float, *, requested_ns: int | None = None,
                pending: int = 0) -> str:
        """Close a run: "ended", or "unknown" (never begun) or "already-ended" (nothing written)."""
        with self._lock:
            row = self.db.execute("select end_ns from runs where run_id = ?", [run_id]).fetchone()
            if row is None:
                return "unknown"
            if row[0] is not None:
                return "already-ended"
            self.db["runs"].update(run_id, {"end_ns": ts_ns, "end_energy_j": energy_j,
                                            "end_requested_ns": requested_ns or ts_ns, "pending_at_end": pending})
            return "ended"

    def run(self, run_id: str) -> dict | None:
        with self._lock:
            rows = list(self.db.query("select * from runs where run_id = ?", [run_id]))
        return rows[0] if rows else None

    def open_runs(self, client: str) -> int:
        with self._lock:
            return self.db.execute("select count(*) from runs where client = ? and end_ns is null and "
                                   "server_id = ?", [client, self.server_id]).fetchone()[0]

    def record_cap_event(self, event: dict) -> None:
        self._insert("cap_events", [dict(event, server_id=self.server_id)])

    def record_clock_event(self, event: dict) -> None:
        self._insert("clock_events", [dict(event, server_id=self.server_id)])

    def close(self) -> None:
        self.flush()
        with self._lock:
            self.db.conn.close()
