"""The study DB's joins and per-run aggregates as SQL views, created with the study DB, so the numbers a
user reads with ``sqlite-utils query study.db "select * from run_metrics"`` or Datasette are the report's.

Views (definitions and formulas: docs/analysis.md):

- ``request_join``: one row per (run, request), with ``simulated`` from its server (docs/energy.md: every
  number labelled): each client row joined to its server row(s) by
  ``request_id``, plus the run's server rows no client row of the run claims. Flags ``ok`` (counted:
  ok on the server and, where the run has client rows, ok on the client too) and ``good`` (ok and every
  SLO of ``run_slo`` met).
- ``run_gpu_telemetry``: per (run, server, GPU) window aggregates, computed at ingest by a range join on
  the server DB's telemetry (samples.py: ``run_gpu_windows``) for the run's current window.
- ``run_metrics``: the report's per-run numbers; ``run_reconciliation``: its reconciliation table.

Tables refreshed at ingest (``refresh``) from one pass over the requests (request_pass.py: the
``request_join`` rows, computed by DuckDB where installed, else by SQLite from this very view), because
aggregating a million joined rows on every read of a view costs SQLite seconds and SQLite has no
percentile aggregate (the one definition is ``llmwatts.stats``): ``run_request_totals`` (per-run sums and
reconciliation counts of ``request_join``; ``run_metrics`` and ``run_reconciliation`` read it),
``run_percentiles``, ``run_steady`` (the steady-state span of each run), ``run_request_flags`` and
``run_request_points`` (the reconciliation's request ids; the report's scatter) and ``run_slo``.
``tests/analysis/test_request_pass.py`` recomputes them from the views.
"""

from __future__ import annotations

import json

import sqlite_utils

from llmwatts.analysis import aggregates
from llmwatts.analysis.request_pass import REQUEST_VALUES

OK = "lower({0}) = 'ok'"

# The join itself (request_pass.JOIN_DUCKDB is the same in DuckDB's dialect: keep them together).
REQUEST_JOIN_ROWS = f"""
SELECT c.run_id AS run_id, c.request_id AS request_id, r.server_id AS server_id,
  1 AS has_client, r.request_id IS NOT NULL AS has_server,
  (SELECT count(*) FROM requests d WHERE d.request_id = c.request_id) AS server_rows,
  c.status AS client_status, r.status AS server_status,
  coalesce(lower(r.status) = 'ok' AND lower(c.status) = 'ok', 0) AS ok,
  c.client_send_ns + c.client_clock_offset_ns AS send_server_ns,
  c.scheduled_send_ns + c.client_clock_offset_ns AS scheduled_server_ns,
  {REQUEST_VALUES},
  (r.received_ns - (c.client_send_ns + c.client_clock_offset_ns)) / 1e6 AS uplink_ms,
  w.begin_ns IS NOT NULL AND (c.client_send_ns + c.client_clock_offset_ns < w.begin_ns
    OR (w.end_ns IS NOT NULL AND c.client_send_ns + c.client_clock_offset_ns > w.end_ns)) AS outside_window,
  coalesce(r.done_ns > w.end_ns, 0) AS done_after_window,
  (SELECT sv.simulated FROM servers sv WHERE sv.server_id = r.server_id) AS simulated
FROM client_requests c
LEFT JOIN requests r ON r.request_id = c.request_id
LEFT JOIN runs w ON w.server_id = r.server_id AND w.run_id = c.run_id
UNION ALL
SELECT r.run_id, r.request_id, r.server_id, 0, 1, NULL, NULL, r.status,
  lower(r.status) = 'ok' AND NOT EXISTS (SELECT 1 FROM client_runs cr WHERE cr.run_id = r.run_id),
  NULL, NULL, r.received_ns, r.done_ns, r.batch_id, r.n_prompts, r.output_tokens, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, r.energy_j, r.energy_j / nullif(r.output_tokens, 0), NULL, 0,
  coalesce(r.done_ns > w.end_ns, 0),
  (SELECT sv.simulated FROM servers sv WHERE sv.server_id = r.server_id)
FROM requests r
LEFT JOIN runs w ON w.server_id = r.server_id AND w.run_id = r.run_id
WHERE r.run_id IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM client_requests c WHERE c.request_id = r.request_id AND c.run_id = r.run_id)
"""

# good: ok and every objective set is met by a measured value (a missing one fails), as Slo.met decides.
REQUEST_JOIN = f"""
CREATE VIEW request_join AS
SELECT j.*,
  coalesce(j.ok AND (s.ttft_ms IS NULL OR j.ttft_ms <= s.ttft_ms) AND (s.tpot_ms IS NULL OR j.tpot_ms <= s.tpot_ms)
    AND (s.e2e_ms IS NULL OR j.e2e_ms <= s.e2e_ms), 0) AS good
FROM ({REQUEST_JOIN_ROWS}) j LEFT JOIN run_slo s ON s.run_id = j.run_id
"""

RUN_GPU_TELEMETRY = """
CREATE VIEW run_gpu_telemetry AS
SELECT w.run_id AS run_id, w.server_id AS server_id, a.gpu_uuid AS gpu_uuid, a.samples AS samples,
  a.first_energy_mj AS first_energy_mj, a.last_energy_mj AS last_energy_mj,
  a.sm_pct_sum AS sm_pct_sum, a.sm_pct_n AS sm_pct_n, a.mem_pct_sum AS mem_pct_sum, a.mem_pct_n AS mem_pct_n,
  100.0 * a.mem_used_max / nullif((SELECT x.memory_total_bytes FROM gpus x
                                   WHERE x.server_id = a.server_id AND x.gpu_uuid = a.gpu_uuid), 0)
    AS mem_used_pct_max,
  a.cap_mw_min AS cap_mw_min, a.cap_mw_max AS cap_mw_max, a.simulated AS simulated
FROM runs w
JOIN run_gpu_windows a ON a.server_id = w.server_id AND a.run_id = w.run_id
  AND a.begin_ns = w.begin_ns AND a.end_ns = w.end_ns
"""

# Per-run numbers. Every quotient is NULL when its denominator is missing or zero.
RUN_METRICS = """
CREATE VIEW run_metrics AS
WITH win AS (
  SELECT run_id, max((end_ns - begin_ns) / 1e9) AS duration_s, count(*) AS n_servers,
    sum(CASE WHEN begin_energy_j IS NOT NULL AND end_energy_j IS NOT NULL THEN 1 ELSE 0 END) AS n_counter,
    sum(end_energy_j - begin_energy_j) AS counter_j, max(simulated) AS simulated, min(begin_ns) AS begin_ns
  FROM runs GROUP BY run_id
), tel AS (
  SELECT run_id, count(*) AS n_gpus, sum((last_energy_mj - first_energy_mj) / 1000.0) AS telemetry_j,
    min((last_energy_mj - first_energy_mj) / 1000.0) AS gpu_energy_min_j,
    max((last_energy_mj - first_energy_mj) / 1000.0) AS gpu_energy_max_j,
    sum(sm_pct_sum) / nullif(sum(sm_pct_n), 0) AS sm_pct_mean,
    sum(mem_pct_sum) / nullif(sum(mem_pct_n), 0) AS mem_pct_mean,
    max(mem_used_pct_max) AS mem_used_pct_max, min(cap_mw_min) AS cap_mw_min, max(cap_mw_max) AS cap_mw_max,
    max(simulated) AS simulated
  FROM run_gpu_telemetry GROUP BY run_id
), req AS (
  SELECT run_id, server_rows, requests_ok, requests_refused, responses, output_tokens, output_words, client_rows,
    good_requests, good_output_tokens, attributed_j, done_after_window_any AS done_after_window
  FROM run_request_totals
), busy AS (
  SELECT run_id, batch_j, batch_simulated AS simulated FROM run_request_totals
), srv AS (
  SELECT w.run_id, max(s.simulated) AS simulated, group_concat(DISTINCT s.power_source) AS power_sources
  FROM runs w JOIN servers s ON s.server_id = w.server_id GROUP BY w.run_id
), idle AS (
  SELECT w.run_id, sum(i.power_mw) / 1000.0 AS idle_power_w, count(*) AS idle_gpus
  FROM runs w JOIN study_idle_power i ON i.server_id = w.server_id GROUP BY w.run_id
), m AS (
  SELECT win.run_id AS run_id, win.begin_ns AS begin_ns, tel.n_gpus AS n_gpus, win.duration_s AS duration_s,
    coalesce(req.requests_ok, 0) AS requests_ok,
    coalesce(req.server_rows, 0) - coalesce(req.requests_ok, 0) AS requests_failed,
    coalesce(req.requests_refused, 0) AS requests_refused,
    coalesce(req.responses, 0) AS responses, coalesce(req.output_tokens, 0) AS output_tokens,
    CASE WHEN req.client_rows > 0 THEN req.output_words END AS output_words,
    CASE WHEN win.n_counter = win.n_servers THEN win.counter_j ELSE tel.telemetry_j END AS energy_total_j,
    CASE WHEN req.server_rows > 0 THEN coalesce(busy.batch_j, 0.0) END AS energy_busy_j,
    CASE WHEN win.n_counter = win.n_servers THEN 'counter'
         WHEN tel.telemetry_j IS NOT NULL THEN 'telemetry' END AS energy_source,
    tel.sm_pct_mean, tel.mem_pct_mean, tel.mem_used_pct_max,
    tel.gpu_energy_min_j, tel.gpu_energy_max_j, tel.cap_mw_min, tel.cap_mw_max,
    req.attributed_j AS attributed_j, coalesce(busy.batch_j, 0.0) AS batch_j,
    coalesce(req.good_requests, 0) AS good_requests, coalesce(req.good_output_tokens, 0) AS good_output_tokens,
    coalesce(req.done_after_window, 0) AS done_after_window,
    idle.idle_power_w AS idle_power_w,
    max(coalesce(win.simulated, 0), coalesce(tel.simulated, 0), coalesce(busy.simulated, 0),
        coalesce(srv.simulated, 0)) AS simulated,
    srv.power_sources AS power_sources
  FROM win
  LEFT JOIN tel ON tel.run_id = win.run_id
  LEFT JOIN req ON req.run_id = win.run_id
  LEFT JOIN busy ON busy.run_id = win.run_id
  LEFT JOIN srv ON srv.run_id = win.run_id
  LEFT JOIN idle ON idle.run_id = win.run_id
)
SELECT m.run_id, m.n_gpus,
  CASE WHEN m.simulated THEN 'simulated' ELSE coalesce(replace(m.power_sources, ',', '/'), 'nvml') END AS power,
  m.duration_s, m.requests_ok, m.requests_failed, m.requests_refused, m.responses, m.output_tokens,
  m.output_words,
  m.output_words / nullif(m.duration_s, 0) AS words_per_s,
  m.output_tokens / nullif(m.duration_s, 0) AS tokens_per_s,
  m.responses / nullif(m.duration_s, 0) AS responses_per_s,
  m.energy_total_j, m.energy_busy_j, m.energy_source,
  m.energy_total_j / nullif(m.duration_s, 0) AS avg_power_w,
  m.energy_total_j / nullif(m.output_tokens, 0) AS j_per_token,
  m.energy_total_j / nullif(m.responses, 0) AS j_per_response,
  m.sm_pct_mean, m.mem_pct_mean, m.mem_used_pct_max,
  p.e2e_ms_p50 AS latency_p50_ms, p.e2e_ms_p90 AS latency_p90_ms, p.e2e_ms_p95 AS latency_p95_ms,
  p.e2e_ms_p99 AS latency_p99_ms, p.e2e_ms_mean AS latency_mean_ms,
  p.ttft_ms_p50 AS ttft_p50_ms, p.ttft_ms_p90 AS ttft_p90_ms, p.ttft_ms_p95 AS ttft_p95_ms,
  p.ttft_ms_p99 AS ttft_p99_ms, p.ttft_ms_mean AS ttft_mean_ms,
  p.tpot_ms_p50 AS tpot_p50_ms, p.tpot_ms_p90 AS tpot_p90_ms, p.tpot_ms_p95 AS tpot_p95_ms,
  p.tpot_ms_p99 AS tpot_p99_ms, p.tpot_ms_mean AS tpot_mean_ms,
  p.itl_ms_p50 AS itl_p50_ms, p.itl_ms_p90 AS itl_p90_ms, p.itl_ms_p95 AS itl_p95_ms,
  p.itl_ms_p99 AS itl_p99_ms, p.itl_ms_mean AS itl_mean_ms,
  p.lag_ms_p99 AS lag_p99_ms,
  m.good_requests, m.good_output_tokens,
  m.good_requests / nullif(m.duration_s, 0) AS goodput_rps,
  m.good_output_tokens / nullif(m.duration_s, 0) AS goodput_tokens_per_s,
  m.energy_total_j / nullif(m.good_output_tokens, 0) AS j_per_good_token,
  p.j_per_request_p50, p.j_per_request_p95, p.j_per_request_p99, p.j_per_request_mean,
  p.j_per_output_token_p50, p.j_per_output_token_p95, p.j_per_output_token_p99,
  m.idle_power_w,
  m.energy_total_j - m.idle_power_w * m.duration_s AS energy_dynamic_j,
  (m.energy_total_j - m.idle_power_w * m.duration_s) / nullif(m.output_tokens, 0) AS j_per_token_dynamic,
  st.begin_ns AS steady_begin_ns, st.end_ns AS steady_end_ns, (st.end_ns - st.begin_ns) / 1e9 AS steady_s,
  st.energy_j AS steady_energy_j, st.output_tokens AS steady_output_tokens,
  st.output_tokens / nullif((st.end_ns - st.begin_ns) / 1e9, 0) AS steady_tokens_per_s,
  st.energy_j / nullif((st.end_ns - st.begin_ns) / 1e9, 0) AS steady_power_w,
  st.energy_j / nullif(st.output_tokens, 0) AS steady_j_per_token,
  m.gpu_energy_min_j, m.gpu_energy_max_j, m.gpu_energy_max_j / nullif(m.gpu_energy_min_j, 0) AS gpu_energy_spread,
  (m.attributed_j - m.batch_j) / nullif(m.batch_j, 0) AS attribution_rel_diff,
  m.batch_j > m.energy_total_j * (1 + 1e-9) AS batch_energy_exceeds_window,
  m.done_after_window AS window_ends_before_last_request,
  m.simulated, m.cap_mw_min, m.cap_mw_max, m.begin_ns
FROM m
LEFT JOIN run_percentiles p ON p.run_id = m.run_id
LEFT JOIN run_steady st ON st.run_id = m.run_id
"""

RUN_RECONCILIATION = """
CREATE VIEW run_reconciliation AS
SELECT run_id, client_sent, server_ok, server_error, missing, duplicated, server_only, outside_window,
  status_mismatch, done_after_window, attributed_j
FROM run_request_totals
"""

VIEWS = {
    "request_join": REQUEST_JOIN,
    "run_gpu_telemetry": RUN_GPU_TELEMETRY,
    "run_metrics": RUN_METRICS,
    "run_reconciliation": RUN_RECONCILIATION,
}
# The views' version: a study DB whose views differ is given these (views hold no data).
VIEWS_VERSION = "4"

STUDY_TABLES = {
    "run_slo": "CREATE TABLE IF NOT EXISTS run_slo (run_id TEXT PRIMARY KEY, ttft_ms REAL, tpot_ms REAL, "
               "e2e_ms REAL, source TEXT)",
    "run_steady": "CREATE TABLE IF NOT EXISTS run_steady (run_id TEXT PRIMARY KEY, target_in_flight REAL, "
                  "begin_ns INTEGER, end_ns INTEGER, energy_j REAL, output_tokens INTEGER)",
    "study_idle_power": "CREATE TABLE IF NOT EXISTS study_idle_power (server_id TEXT, gpu_uuid TEXT, "
                        "power_mw REAL, samples INTEGER, source TEXT, PRIMARY KEY (server_id, gpu_uuid))",
}


# Tables whose rows the derived tables (run_request_totals, run_percentiles, run_steady, study_idle_power)
# are computed from: any change to them by hand marks the study stale, and the next read refreshes.
SOURCE_TABLES = ("servers", "gpus", "runs", "batches", "requests", "idle_power", "telemetry_buckets",
                 "client_runs", "client_requests", "client_chunks")


def create_triggers(db: sqlite_utils.Database) -> None:
    for table in SOURCE_TABLES:
        for event in ("INSERT", "UPDATE", "DELETE"):
            db.execute(f"CREATE TRIGGER IF NOT EXISTS [stale_{table}_{event.lower()}] AFTER {event} ON [{table}] "
                       "BEGIN UPDATE study_state SET stale = 1 WHERE stale = 0; END")


def drop_triggers(db: sqlite_utils.Database) -> None:
    """Before a bulk copy (a trigger per row would cost more than the copy); ingest marks the study stale."""
    for table in SOURCE_TABLES:
        for event in ("insert", "update", "delete"):
            db.execute(f"DROP TRIGGER IF EXISTS [stale_{table}_{event}]")
    db.execute("UPDATE study_state SET stale = 1")


def ensure_fresh(db: sqlite_utils.Database) -> None:
    """Refresh the derived tables when a source table changed since the last refresh."""
    row = db.execute("SELECT stale FROM study_state").fetchone()
    if row is None or row[0]:
        refresh(db)


def create_views(db: sqlite_utils.Database) -> None:
    """Create (or bring up to date) the study tables, views and staleness triggers. Cheap: no data moves."""
    with db.conn:
        for sql in STUDY_TABLES.values():
            db.execute(sql)
        db.execute("CREATE TABLE IF NOT EXISTS study_state (stale INTEGER NOT NULL)")
        if db.execute("SELECT count(*) FROM study_state").fetchone()[0] == 0:
            db.execute("INSERT INTO study_state VALUES (1)")
        create_triggers(db)
        aggregates.ensure_tables(db)
        current = {r[0]: r[1] for r in db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'view'")}
        for name, sql in VIEWS.items():
            if current.get(name, "").strip() != sql.strip():
                db.execute(f"DROP VIEW IF EXISTS [{name}]")
                db.execute(sql.strip())
        for table in ("request_join_rows", "request_dups"):  # an older study DB's materialised join
            db.execute(f"DROP TABLE IF EXISTS [{table}]")


def set_slo(db: sqlite_utils.Database, slo: dict[str, float] | None, source: str = "report") -> None:
    """Objectives (ms) for every run: ``slo`` (e.g. from ``llmwatts report --slo``) where given, else each
    run's own ``client_runs.labels["slo"]`` (as ``llmwatts load --slo`` wrote it), else none."""
    from llmwatts.analysis.slo import parse_slo

    run_ids = [r[0] for r in db.execute("SELECT DISTINCT run_id FROM runs UNION SELECT run_id FROM client_runs")]
    rows = []
    for run_id in run_ids:
        objectives, origin = slo, source
        if not objectives:
            objectives, origin = {}, None
            for (labels,) in db.execute("SELECT labels FROM client_runs WHERE run_id = ?", [run_id]):
                text = _json(labels).get("slo")
                if text:
                    objectives, origin = parse_slo(text), "client_runs.labels"
                    break
        rows.append((run_id, objectives.get("ttft_ms"), objectives.get("tpot_ms"), objectives.get("e2e_ms"), origin))
    with db.conn:
        db.execute("DELETE FROM run_slo")
        db.conn.executemany("INSERT INTO run_slo VALUES (?, ?, ?, ?, ?)", rows)


def _json(value) -> dict:
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def refresh(db: sqlite_utils.Database, slo: dict[str, float] | None = None) -> None:
    """Recompute the tables the views read: SLOs, idle power, percentiles, steady-state spans."""
    set_slo(db, slo)
    aggregates.refresh(db)
    with db.conn:
        create_triggers(db)
        db.execute("UPDATE study_state SET stale = 0")


__all__ = ["VIEWS", "create_views", "ensure_fresh", "refresh", "set_slo"]
