"""Pull a running server's records over ``Control.ExportRecords`` into a local mirror of its DB.

The mirror is a SQLite file in the server DB's exact schema (``server/store.py``), so the normal ingest
(``analysis/ingest.py``) reads it as it reads a server DB copied by hand. Pulls are incremental: the mirror
keeps the server's last cursor in ``export_cursor``, written in the same transaction as the page's rows,
so a pull stopped anywhere (Ctrl-C, a dropped connection) resumes where it stopped and adds nothing twice.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from llmwatts.errors import FailedPrecondition, NotFound, Unauthenticated, Unavailable
from llmwatts.client import client_channel, parse_target
from llmwatts.credentials import CONTROL_TOKEN_ENV
from llmwatts.server.export import cell_value
from llmwatts.server.store import SCHEMA, open_db
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

PULL_TIMEOUT_S = 600.0
CURSOR_TABLE = "export_cursor"
# Tables without a primary key are appended to (the cursor guarantees each row comes once); the rest are
# replaced on their key (a run's end marker, a continuous batch's growing segment).
APPEND_ONLY = {name for name, (_, pk) in SCHEMA.items() if pk is None}


@dataclass
class PullResult:
    """What one pull added to ``mirror``: rows received per table."""

    target: str
    mirror: str
    rows: dict[str, int] = field(default_factory=dict)


def mirror_path(study_db: str | Path, target: str) -> Path:
    """The mirror file of ``target`` (HOST:PORT) next to the study DB."""
    safe = re.sub(r"[^A-Za-z0-9.-]+", "_", target)[:100]
    return Path(f"{study_db}.server-{safe}.db")


def _open_mirror(path: Path) -> sqlite3.Connection:
    open_db(path).conn.close()  # the server's schema, WAL
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute(f"create table if not exists {CURSOR_TABLE} (target TEXT PRIMARY KEY, cursor TEXT NOT NULL)")
    return conn


def _rpc_error(e: grpc.RpcError, target: str) -> Exception:
    code = e.code()
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return Unauthenticated(f"{target} refused ExportRecords ({e.details()}); set ${CONTROL_TOKEN_ENV} to the "
                               "server's control token")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"cannot reach {target} ({code.name}): is `llmwatts serve` running there?")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return FailedPrecondition(f"{target} does not serve ExportRecords (an older llmwatts): copy its DB file "
                                  "and pass --server-db")
    return FailedPrecondition(f"{target}: ExportRecords failed: {code.name}: {e.details()}")


def pull_records(target: str, mirror: str | Path, *, token: str | None = None, ca: str | None = None,
                 cert: str | None = None, key: str | None = None, page_rows: int = 0,
                 channel: grpc.Channel | None = None) -> PullResult:
    """Pull ``target``'s records since the mirror's cursor into ``mirror`` (created if missing)."""
    target = parse_target(target, flag="--server")
    mirror = Path(mirror)
    if mirror.parent and not mirror.parent.exists():
        raise NotFound(f"no folder {mirror.parent} for the mirror DB")
    conn = _open_mirror(mirror)
    own_channel = channel is None
    channel = channel or client_channel(target, ca=ca, cert=cert, key=key, token=token)
    result = PullResult(target=target, mirror=str(mirror))
    try:
        row = conn.execute(f"select cursor from {CURSOR_TABLE} where target = ?", [target]).fetchone()
        request = pb.ExportRecordsRequest(cursor=row[0] if row else "", page_rows=page_rows)
        try:
            for page in pb_grpc.ControlStub(channel).ExportRecords(request, timeout=PULL_TIMEOUT_S):
                _write_page(conn, target, page)
                if page.table:
                    result.rows[page.table] = result.rows.get(page.table, 0) + len(page.rows)
        except grpc.RpcError as e:
            raise _rpc_error(e, target) from None
    finally:
        conn.close()
        if own_channel:
            channel.close()
    return result


def _write_page(conn: sqlite3.Connection, target: str, page: pb.RecordPage) -> None:
    """The page's rows and its cursor, in one transaction."""
    conn.execute("BEGIN")
    try:
        if page.table:
            if page.table not in SCHEMA:
                raise FailedPrecondition(f"the server sent rows of an unknown table {page.table!r}: "
                                         "upgrade this llmwatts to the server's version")
            known = set(SCHEMA[page.table][0])
            keep = [i for i, c in enumerate(page.columns) if c in known]  # a newer server's extra columns
            columns = ", ".join(page.columns[i] for i in keep)
            verb = "insert" if page.table in APPEND_ONLY else "insert or replace"
            sql = f"{verb} into {page.table} ({columns}) values ({', '.join('?' * len(keep))})"
            conn.executemany(sql, ([cell_value(r.cells[i]) for i in keep] for r in page.rows))
        conn.execute(f"insert or replace into {CURSOR_TABLE} (target, cursor) values (?, ?)", [target, page.cursor])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
