"""The study DB as the study's state: its tables (``studies``, ``study_cells``, ``idle_power``), ingesting
the pulled records, and keeping only done cells' runs."""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path

from llmwatts.analysis.pull import mirror_path, pull_records
from llmwatts.errors import Unavailable
from llmwatts.study.plan import Plan

STATE_SQL = """
create table if not exists studies (study TEXT PRIMARY KEY, instance TEXT NOT NULL, created_ns INTEGER) STRICT;
create table if not exists study_cells (
  study TEXT NOT NULL, cell_key TEXT NOT NULL, attempt INTEGER NOT NULL, run_id TEXT NOT NULL,
  target TEXT NOT NULL, status TEXT NOT NULL, labels TEXT NOT NULL, started_ns INTEGER, ended_ns INTEGER,
  requests_ok INTEGER, PRIMARY KEY (study, cell_key, attempt)) STRICT;
create table if not exists idle_power (
  server_id TEXT NOT NULL, gpu_uuid TEXT NOT NULL, begin_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL,
  power_mw INTEGER, energy_j REAL, simulated INTEGER, PRIMARY KEY (server_id, gpu_uuid)) STRICT;
"""


def open_state(study_db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(study_db), isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(STATE_SQL)
    return conn


def instance(state, plan: Plan) -> str:
    """This study DB's id for the plan: part of every run id, so a new study DB never reuses a run id a
    server has already seen (BeginRun refuses them)."""
    state.execute("insert or ignore into studies values (?, ?, ?)", [plan.name, uuid.uuid4().hex[:6], time.time_ns()])
    return state.execute("select instance from studies where study = ?", [plan.name]).fetchone()[0]


def mark_abandoned(state, plan: Plan) -> list[str]:
    """Attempts a crash left ``running`` become ``abandoned`` -> their run ids (their runs, if begun, are
    ended by ``servers.end_open_runs``)."""
    rows = state.execute("select cell_key, attempt, run_id from study_cells where study = ? and status = 'running'",
                         [plan.name]).fetchall()
    for key, attempt, _ in rows:
        state.execute("update study_cells set status = 'abandoned', ended_ns = ? where study = ? and cell_key = ? "
                      "and attempt = ?", [time.time_ns(), plan.name, key, attempt])
    return [r[2] for r in rows]


def ingest(study_db: Path, mirrors: list[Path], client_dbs: list[str]) -> None:
    from llmwatts.analysis.ingest import ingest as ingest_dbs

    ingest_dbs(study_db, [str(m) for m in mirrors if m.exists()], [c for c in client_dbs if Path(c).exists()])


def drop_stray_runs(state, plan: Plan) -> None:
    """Keep only done cells' runs of this study in the study DB (warm-ups, idle windows and abandoned
    attempts go, on the server's side and the client's)."""
    pattern = plan.name.replace("_", "\\_") + "-%"
    for table in ("runs", "client_runs", "client_requests"):
        if state.execute("select 1 from sqlite_master where type = 'table' and name = ?", [table]).fetchone():
            state.execute(f"delete from {table} where run_id like ? escape '\\' and run_id not in (select run_id "
                          "from study_cells where study = ? and status = 'done')", [pattern, plan.name])


def sync(state, plan: Plan, servers: dict, study_db: Path, client_db: str) -> None:
    """A last pull and ingest of every server, so the study DB holds every record to the end."""
    mirrors = []
    for target, server in servers.items():
        try:
            pull_records(target, mirror_path(study_db, target), channel=server.channel)
        except Unavailable:
            pass  # keep what was pulled; the report says what it has
        mirrors.append(mirror_path(study_db, target))
    if any(m.exists() for m in mirrors):
        ingest(study_db, mirrors, [client_db])
        drop_stray_runs(state, plan)
