"""Numbers that need single telemetry samples at times known only after ingest (the steady-state span's
energy, idle power before a server's first run): read from the ingested server DB files still on disk,
attached read-only one at a time; without them, from the buckets wholly inside the span (samples.py).
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from llmwatts.analysis.samples import BUCKET_NS, has_table

if TYPE_CHECKING:  # annotations only: the request pass's child (request_pass.py) need not import it (nor the
    import sqlite_utils  # pandas it imports where installed)


@contextmanager
def raw_sources(db: sqlite_utils.Database):
    """The ingested server DB files still on disk, attached read-only one at a time: yields a function
    ``each()`` that iterates (schema, server ids) with that file attached as ``raw``."""
    paths = [r[0] for r in db.execute("SELECT DISTINCT path FROM sources WHERE kind = 'server' ORDER BY path")] \
        if db["sources"].exists() else []

    def each():
        for path in paths:
            if not Path(path).is_file():
                continue
            db.conn.commit()
            try:
                db.execute("ATTACH DATABASE ? AS raw", [f"file:{path}?mode=ro"])
            except sqlite3.OperationalError:
                continue
            try:
                if has_table(db, "raw", "telemetry"):
                    yield "raw", {r[0] for r in db.execute("SELECT DISTINCT server_id FROM raw.runs")}
            finally:
                db.conn.commit()
                db.execute("DETACH DATABASE raw")
    yield each


def span_energies(db: sqlite_utils.Database, spans: dict[str, tuple[str, int, int]]) -> dict:
    """{key: J} for ``spans`` {key: (server_id, begin_ns, end_ns)}: Σ over the server's GPUs of the energy
    counter's rise between the first and last sample inside the span. From the server DB's samples where its
    file is on disk, else from the buckets wholly inside the span (their least and greatest reading)."""
    out: dict = {}
    with raw_sources(db) as each:
        for schema, servers in each():
            for key, (server_id, begin_ns, end_ns) in spans.items():
                if key in out or server_id not in servers:
                    continue
                total, seen = 0.0, False
                for (gpu_uuid,) in db.execute("SELECT gpu_uuid FROM telemetry_gpus WHERE server_id = ?",
                                              [server_id]).fetchall():
                    ends = [db.execute(
                        f"SELECT energy_mj FROM [{schema}].telemetry WHERE ts_ns BETWEEN ? AND ? AND +server_id = ? "
                        f"AND +gpu_uuid = ? AND energy_mj IS NOT NULL ORDER BY ts_ns {order} LIMIT 1",
                        [begin_ns, end_ns, server_id, gpu_uuid]).fetchone() for order in ("ASC", "DESC")]
                    if None not in ends:
                        total, seen = total + (ends[1][0] - ends[0][0]) / 1000, True
                if seen:
                    out[key] = total
    for key, (server_id, begin_ns, end_ns) in spans.items():
        if key not in out:
            row = db.execute(
                "SELECT sum(e) FROM (SELECT (max(b.energy_max_mj) - min(b.energy_min_mj)) / 1000.0 AS e "
                "FROM telemetry_gpus g JOIN telemetry_buckets b ON b.gpu_key = g.gpu_key "
                "AND b.bucket >= ? AND b.bucket < ? WHERE g.server_id = ? GROUP BY g.gpu_key)",
                [-(-begin_ns // BUCKET_NS), end_ns // BUCKET_NS, server_id]).fetchone()
            out[key] = row[0] if row else None
    return out


def mean_powers(db: sqlite_utils.Database, ranges: dict[tuple[str, str], tuple[int, int]]) -> dict:
    """{(server_id, gpu_uuid): (mean power_mw, samples)} over [begin_ns, end_ns) per GPU; from the server
    DB's samples where on disk, else from the buckets wholly inside the range."""
    out: dict = {}
    with raw_sources(db) as each:
        for schema, servers in each():
            for key, (begin_ns, end_ns) in ranges.items():
                if key in out or key[0] not in servers:
                    continue
                mean, n = db.execute(
                    f"SELECT avg(power_mw), count(power_mw) FROM [{schema}].telemetry WHERE ts_ns >= ? AND ts_ns < ? "
                    "AND +server_id = ? AND +gpu_uuid = ?", [begin_ns, end_ns, *key]).fetchone()
                if n:
                    out[key] = (mean, n)
    for key, (begin_ns, end_ns) in ranges.items():
        if key not in out:
            total, n = db.execute(
                "SELECT sum(b.power_sum), sum(b.power_n) FROM telemetry_gpus g JOIN telemetry_buckets b "
                "ON b.gpu_key = g.gpu_key AND b.bucket >= ? AND b.bucket < ? WHERE g.server_id = ? AND g.gpu_uuid = ?",
                [-(-begin_ns // BUCKET_NS), end_ns // BUCKET_NS, *key]).fetchone()
            if n:
                out[key] = (total / n, n)
    return out
