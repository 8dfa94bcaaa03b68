"""``Control.ExportRecords``: the server DB's rows over gRPC, in pages, since a resumable cursor.

So a study machine pulls the GPU node's records (``llmwatts report --server``, ``llmwatts study``) and no
file is copied between machines. The pages carry the server DB's own tables and columns
(``store.SCHEMA``); the puller (``analysis/pull.py``) writes them into a local mirror in that same schema.

What "since the cursor" means per table (the cursor is per table, and names the DB file it belongs to):

- ``servers``, ``gpus``, ``runs``: sent whole every call (a few rows; a run's end marker is an update).
- ``requests``, ``telemetry``, ``cap_events``, ``clock_events``: rows with a larger rowid (they are written once; a
  replaced request row gets a new rowid).
- ``batches``, ``batch_gpu_energy``: a larger rowid, or a batch whose ``end_ns`` is past the newest end
  sent: a continuous batch's open segment is upserted in place as it grows, and it is always the newest.

A page's cursor covers every earlier page, so a puller that stores the cursor with the page's rows in one
transaction resumes exactly where it stopped.
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from llmwatts.errors import InvalidArgument
from llmwatts.server.grpc_errors import mapped
from llmwatts.server.store import SCHEMA
from llmwatts.v1 import llmwatts_pb2 as pb

DEFAULT_PAGE_ROWS = 2000
MAX_PAGE_ROWS = 10000       # ~15 cells a telemetry row: a page stays well under gRPC's 4 MB message limit
MAX_CURSOR_CHARS = 4096
WHOLE_TABLES = ("servers", "gpus", "runs")
ROWID_TABLES = ("requests", "telemetry", "cap_events", "clock_events")
# Export order: a batch's requests and per-GPU energy never arrive in a page before their batch.
TABLES = WHOLE_TABLES + ("batches", "batch_gpu_energy") + ROWID_TABLES


@dataclass
class TableCursor:
    """Where one table's export stands: the largest rowid sent and (batches) the newest ``end_ns`` sent."""

    rowid: int = 0
    end_ns: int = 0


def encode_cursor(db_id: str, cursors: dict[str, TableCursor]) -> str:
    body = {"db": db_id, "t": {name: [c.rowid, c.end_ns] for name, c in cursors.items()}}
    return base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode()).decode()


def decode_cursor(text: str) -> tuple[str, dict[str, TableCursor]]:
    """``(db_id, per-table cursors)``; an empty cursor starts from the beginning."""
    if not text:
        return "", {}
    if len(text) > MAX_CURSOR_CHARS:
        raise InvalidArgument(f"cursor is longer than {MAX_CURSOR_CHARS} characters: pass a cursor this server sent")
    try:
        body = json.loads(base64.urlsafe_b64decode(text.encode()))
        cursors = {name: TableCursor(int(v[0]), int(v[1])) for name, v in body["t"].items() if name in TABLES}
        return str(body["db"]), cursors
    except (ValueError, KeyError, TypeError, IndexError, binascii.Error):
        raise InvalidArgument("cursor is not one this server sent: pass a RecordPage.cursor, or empty to "
                              "start from the beginning") from None


def cell(value) -> pb.Cell:
    if value is None:
        return pb.Cell(null=True)
    if isinstance(value, int):
        return pb.Cell(integer=value)
    if isinstance(value, float):
        return pb.Cell(real=value)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return pb.Cell(text=str(value))


def cell_value(c: pb.Cell):
    """The Python value of a cell (the puller's side of ``cell``)."""
    kind = c.WhichOneof("value")
    return None if kind in (None, "null") else getattr(c, kind)


class RecordExporter:
    """Reads a server DB file through its own read-only connection (WAL: readers never block writers)."""

    def __init__(self, db_path: str | Path, flush=None):
        self.db_path = Path(db_path)
        self.flush = flush  # the store's telemetry buffer, written before a read so the newest samples go too

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        conn.execute("PRAGMA query_only=1")
        return conn

    @staticmethod
    def db_id(conn: sqlite3.Connection) -> str:
        """The file's identity: the first server that wrote to it. A cursor from another file starts over
        (rowids are per file)."""
        row = conn.execute("select server_id from servers order by rowid limit 1").fetchone()
        return row[0] if row else ""

    def pages(self, cursor_text: str, page_rows: int) -> Iterator[pb.RecordPage]:
        """Every table's rows since ``cursor_text``, ``page_rows`` (0: default) at a time."""
        if page_rows > MAX_PAGE_ROWS:
            raise InvalidArgument(f"page_rows must be at most {MAX_PAGE_ROWS}, got {page_rows}")
        page_rows = page_rows or DEFAULT_PAGE_ROWS
        db_id, cursors = decode_cursor(cursor_text)
        if self.flush is not None:
            self.flush()
        conn = self._connect()
        try:
            current = self.db_id(conn)
            if db_id != current:  # another DB file (or the first call): everything
                cursors = {}
            cursors = {name: cursors.get(name, TableCursor()) for name in TABLES}
            last_page = None
            for table in TABLES:
                columns = list(SCHEMA[table][0])
                for rows, advance in self._table_pages(conn, table, columns, cursors[table], page_rows):
                    cursors[table] = advance
                    if last_page is not None:
                        yield last_page
                    last_page = pb.RecordPage(table=table, columns=columns, cursor=encode_cursor(current, cursors),
                                              rows=[pb.Row(cells=[cell(v) for v in r]) for r in rows])
            if last_page is None:  # nothing new: one empty page carries the cursor
                last_page = pb.RecordPage(cursor=encode_cursor(current, cursors))
            last_page.last = True
            yield last_page
        finally:
            conn.close()

    @staticmethod
    def _table_pages(conn, table: str, columns: list[str], since: TableCursor, page_rows: int):
        """``(rows, cursor after them)`` pages of ``table`` since ``since``, in rowid order."""
        names = ", ".join(f"t.{c}" for c in columns)
        end, join = "0", ""
        if table in WHOLE_TABLES:
            since = TableCursor()
            where = "1"
        elif table == "batches":
            where, end = "(t.rowid > :rowid or t.end_ns > :end_ns)", "t.end_ns"
        elif table == "batch_gpu_energy":
            where, end = "(t.rowid > :rowid or b.end_ns > :end_ns)", "b.end_ns"
            join = " left join batches b on b.batch_id = t.batch_id"
        else:
            where = "t.rowid > :rowid"
        # `where` is the cursor's condition; `after` pages through its rows within this call.
        sql = (f"select t.rowid, coalesce({end}, 0), {names} from {table} t{join} "
               f"where t.rowid > :after and {where} order by t.rowid limit :limit")
        after, rowid, end_ns = 0, since.rowid, since.end_ns
        while True:
            rows = conn.execute(sql, {"after": after, "rowid": since.rowid, "end_ns": since.end_ns,
                                      "limit": page_rows}).fetchall()
            if not rows:
                return
            after = rows[-1][0]
            rowid = max(rowid, after)
            end_ns = max([end_ns] + [r[1] for r in rows])
            yield [r[2:] for r in rows], TableCursor(0 if table in WHOLE_TABLES else rowid, end_ns)
            if len(rows) < page_rows:
                return


class ExportServicerMixin:
    """``Control.ExportRecords`` for the Control servicer (needs ``self.host``: its DB path and store)."""

    @mapped
    def ExportRecords(self, request, context):
        exporter = RecordExporter(self.host.config.db_path, self.host.sampler.flush)
        yield from exporter.pages(request.cursor, request.page_rows)
