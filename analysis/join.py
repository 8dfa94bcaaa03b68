"""Join rules for the study DB: client rows to server rows, and telemetry to run windows.

- Client and server rows join on ``request_id`` (made by the client, carried end to end). A client row
  should match exactly one server row; ``join_requests`` reports those with none (refused at the door,
  lost) and those with several (a bug, or one file ingested under two server ids), and server rows of the
  run that no client row claims.
- Run windows are on the server clock: ``runs.begin_ns .. runs.end_ns`` of each server that saw the run.
  Telemetry belongs to a run when its ``ts_ns`` lies in the window of the same server.
- A client timestamp is put on the server clock by adding that client's ``clock_offset_ns`` (server −
  client, measured by the client at GetServerInfo). Two machines' wall clocks are never subtracted raw.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import sqlite_utils

from llmwatts.errors import NotFound


@dataclass
class RunWindow:
    """One server's view of a run: the BeginRun/EndRun markers (server clock, ns; counter J)."""

    run_id: str
    server_id: str
    begin_ns: int
    end_ns: int | None
    begin_energy_j: float | None
    end_energy_j: float | None
    simulated: bool

    @property
    def duration_s(self) -> float | None:
        if self.end_ns is None:
            return None
        return (self.end_ns - self.begin_ns) / 1e9


@dataclass
class RequestJoin:
    """Result of joining one run's client rows to server rows by ``request_id``.

    ``matched`` holds one dict per client row found exactly once on a server: client columns prefixed
    ``client_``, server columns prefixed ``server_``, and ``uplink_ms`` (server received − client send,
    on the server clock; NaN-free: None when either stamp or the clock offset is missing).
    """

    run_id: str
    client_rows: list[dict] = field(default_factory=list)
    matched: list[dict] = field(default_factory=list)
    client_only: list[dict] = field(default_factory=list)
    duplicated: dict[str, list[dict]] = field(default_factory=dict)
    server_only: list[dict] = field(default_factory=list)
    server_rows: list[dict] = field(default_factory=list)


def client_to_server_ns(client_ns: int | None, clock_offset_ns: int | None) -> int | None:
    """A client wall-clock stamp on the server clock: ``client_ns + (server − client offset)``."""
    if client_ns is None or clock_offset_ns is None:
        return None
    return client_ns + clock_offset_ns


def has_table(db: sqlite_utils.Database, table: str) -> bool:
    return db[table].exists()


def run_ids(db: sqlite_utils.Database) -> list[str]:
    """Every run id seen by a server, in order of first BeginRun (server clock)."""
    if not has_table(db, "runs"):
        return []
    rows = db.execute(
        "SELECT run_id, MIN(begin_ns) AS b FROM runs GROUP BY run_id ORDER BY b, run_id"
    ).fetchall()
    return [r[0] for r in rows]


def require_run(db: sqlite_utils.Database, run_id: str) -> None:
    """``NotFound`` naming the known runs unless a server or a client saw ``run_id``."""
    in_runs = db.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone()
    in_client = db.execute("SELECT 1 FROM client_runs WHERE run_id = ?", [run_id]).fetchone()
    if not (in_runs or in_client):
        raise NotFound(f"no run {run_id!r} in the study DB (runs: {', '.join(run_ids(db)) or 'none'})")


def run_windows(db: sqlite_utils.Database, run_id: str) -> list[RunWindow]:
    """The run's window on each server that saw it (one row per server)."""
    if not has_table(db, "runs"):
        return []
    rows = db.execute(
        "SELECT run_id, server_id, begin_ns, end_ns, begin_energy_j, end_energy_j, simulated "
        "FROM runs WHERE run_id = ? ORDER BY server_id",
        [run_id],
    ).fetchall()
    return [RunWindow(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6])) for r in rows]


def _rows(db: sqlite_utils.Database, sql: str, params=()) -> list[dict]:
    cursor = db.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def join_requests(db: sqlite_utils.Database, run_id: str) -> RequestJoin:
    """Join the run's client rows to server rows by ``request_id`` (see module docstring)."""
    join = RequestJoin(run_id)
    if has_table(db, "client_requests"):
        join.client_rows = _rows(
            db, "SELECT * FROM client_requests WHERE run_id = ? ORDER BY client_send_ns, request_id",
            [run_id],
        )
    if has_table(db, "requests"):
        # Server rows of this run, plus any server row a client row of this run claims (its run_id may
        # be unset when the request arrived outside the BeginRun/EndRun markers).
        join.server_rows = _rows(
            db,
            "SELECT * FROM requests WHERE run_id = ? OR request_id IN "
            "(SELECT request_id FROM client_requests WHERE run_id = ?) ORDER BY received_ns, server_id"
            if has_table(db, "client_requests")
            else "SELECT * FROM requests WHERE run_id = ? ORDER BY received_ns, server_id",
            [run_id, run_id] if has_table(db, "client_requests") else [run_id],
        )
    by_id: dict[str, list[dict]] = defaultdict(list)
    for row in join.server_rows:
        by_id[row["request_id"]].append(row)
    claimed = set()
    for client in join.client_rows:
        request_id = client["request_id"]
        servers = by_id.get(request_id, [])
        claimed.add(request_id)
        if not servers:
            join.client_only.append(client)
        elif len(servers) > 1:
            join.duplicated[request_id] = servers
        else:
            join.matched.append(_merge(client, servers[0]))
    join.server_only = [r for r in join.server_rows if r["request_id"] not in claimed]
    return join


def _merge(client: dict, server: dict) -> dict:
    merged = {f"client_{k}": v for k, v in client.items()}
    merged.update({f"server_{k}": v for k, v in server.items()})
    merged["request_id"] = client["request_id"]
    send_ns = client_to_server_ns(client.get("client_send_ns"), client.get("client_clock_offset_ns"))
    received_ns = server.get("received_ns")
    merged["uplink_ms"] = None if send_ns is None or received_ns is None else (received_ns - send_ns) / 1e6
    return merged
