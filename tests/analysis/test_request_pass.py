"""The request pass (issue 21): per-run totals, percentiles, reconciliation ids and steady spans computed by
DuckDB in a child process equal the same pass in SQLite over the ``request_join`` view, and the report's
numbers equal an independent recomputation from that view's rows."""

import math
import sys
from pathlib import Path

import numpy as np
import sqlite_utils

from llmwatts.analysis import aggregates, ingest, metrics, reconcile, request_pass, views

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from analysis_study import StudySpec, generate  # noqa: E402


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and (
            math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b)))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _diffs(a: dict, b: dict, where: str = "") -> list:
    out = []
    for key in sorted(set(a) | set(b), key=str):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diffs(x, y, f"{where}/{key}")
        elif not _same(x, y):
            out.append((f"{where}/{key}", x, y))
    return out


def _study(tmp_path: Path) -> sqlite_utils.Database:
    """A generated study plus the rare cases: a request id on two servers, a server row no client claims,
    a client row of another run than its server row, streamed chunks, and an SLO."""
    server_db, client_db = generate(StudySpec(3_000, 20_000, runs=3, gpus=2), tmp_path / "inputs")
    study = tmp_path / "study.db"
    ingest.ingest(study, [server_db], [client_db])
    db = sqlite_utils.Database(study)
    first, second, third = [r[0] for r in db.execute(
        "SELECT request_id FROM requests WHERE status = 'OK' ORDER BY request_id LIMIT 3")]
    run_a, run_b = [r[0] for r in db.execute("SELECT run_id FROM runs ORDER BY begin_ns LIMIT 2")]
    with db.conn:
        db.execute("INSERT INTO requests (request_id, run_id, server_id, batch_id, received_ns, done_ns, n_prompts, "
                   "output_tokens, energy_j, status) SELECT request_id, run_id, 'srv-twin', batch_id, received_ns, "
                   "done_ns, n_prompts, output_tokens, energy_j, status FROM requests WHERE request_id = ?", [first])
        db.execute("INSERT INTO requests (request_id, run_id, server_id, received_ns, done_ns, n_prompts, output_tokens,"
                   " energy_j, status) SELECT 'stray', run_id, server_id, received_ns, done_ns, 1, 7, 0.5, 'OK' "
                   "FROM requests WHERE request_id = ?", [second])
        db.execute("UPDATE client_requests SET run_id = ? WHERE request_id = ?", [run_b, third])
        db.execute("UPDATE requests SET run_id = ? WHERE request_id = ?", [run_a, third])
        for i, (request_id,) in enumerate(db.execute(
                "SELECT request_id FROM client_requests WHERE status = 'ok' LIMIT 40").fetchall()):
            db.conn.executemany("INSERT INTO client_chunks (request_id, chunk_index, arrival_ns, elapsed_ms, tokens) "
                                "VALUES (?, ?, ?, ?, ?)",
                                [(request_id, k, 0, 10.0 * k + (i % 7) * k * k, 1) for k in range(5)])
    views.refresh(db, {"ttft_ms": 600.0, "e2e_ms": 1500.0})
    return db


def test_duckdb_child_and_sqlite_view_give_the_same_request_pass(tmp_path):
    """Guards the DuckDB dialect of the join (request_pass.JOIN_DUCKDB) against drifting from the
    request_join view's SQLite definition: every total, percentile, id, span and scatter point."""
    db = _study(tmp_path)
    db.conn.commit()
    child = request_pass.run_child(tmp_path / "study.db")
    assert child is not None, "the DuckDB child failed"
    here = request_pass.sqlite_pass(db)
    assert child["flags"] == here["flags"] and any(f[2] == "duplicated" for f in here["flags"])
    assert {f[2] for f in here["flags"]} >= {"duplicated", "server_only", "missing"}
    assert _diffs(child["totals"], here["totals"], "totals") == []
    assert _diffs(child["percentiles"], here["percentiles"], "percentiles") == []
    assert _diffs(child["spans"], here["spans"], "spans") == []
    assert _diffs(child["points"], here["points"], "points") == []
    assert any(row.get("itl_ms_n") for row in here["percentiles"].values())


def test_report_numbers_equal_an_independent_recomputation_from_the_view(tmp_path):
    """Guards the per-run tables the views read (run_request_totals, run_percentiles) against disagreeing
    with the request_join view a user queries: sums by SQL GROUP BY, percentiles by numpy over its rows."""
    db = _study(tmp_path)
    runs = {r["run_id"]: r for r in metrics.all_run_metrics(db)}
    recs = {r.run_id: r for r in reconcile.all_reconciliations(db)}
    sums = db.execute("""
        SELECT run_id, sum(ok), sum(CASE WHEN ok THEN output_tokens ELSE 0 END), sum(good),
          sum(CASE WHEN has_server THEN energy_j END), sum(has_client AND server_rows = 0), sum(NOT has_client),
          sum(has_server) - sum(ok)
        FROM request_join GROUP BY run_id""").fetchall()
    assert len(sums) == 3
    for run_id, ok, tokens, good, joules, missing, server_only, failed in sums:
        row = runs[run_id]
        assert (row["requests_ok"], row["output_tokens"], row["good_requests"], row["requests_failed"]) == (
            ok, tokens, good, failed)
        assert math.isclose(recs[run_id].attributed_j, joules, rel_tol=1e-12)
        assert (recs[run_id].missing, recs[run_id].server_only) == (missing, server_only)
        latency = np.array([r[0] for r in db.execute(
            "SELECT e2e_ms FROM request_join WHERE run_id = ? AND ok AND e2e_ms IS NOT NULL", [run_id])])
        for pct in (50, 90, 95, 99):
            assert row[f"latency_p{pct}_ms"] == float(np.percentile(latency, pct, method="linear"))
        assert row["latency_mean_ms"] == float(latency.mean())
    assert sum(r.server_only for r in recs.values()) >= 1 and sum(r.duplicated for r in recs.values()) == 1


def test_without_duckdb_the_sqlite_pass_fills_the_same_tables(tmp_path, monkeypatch):
    """Guards the fallback (DuckDB not installed, or its child failing): the tables are still filled."""
    db = _study(tmp_path)
    with_duck = [dict(r) for r in db.query("SELECT * FROM run_request_totals ORDER BY run_id")]
    monkeypatch.setattr(request_pass, "run_child", lambda path, timeout_s=600: None)
    aggregates.refresh(db)
    without = [dict(r) for r in db.query("SELECT * FROM run_request_totals ORDER BY run_id")]
    assert len(with_duck) == 3 and [_diffs(a, b) for a, b in zip(with_duck, without)] == [[], [], []]


def test_reingest_of_a_grown_server_db_updates_the_run_totals(tmp_path, small):
    """Guards the per-run totals against going stale when a grown server DB is re-ingested (only its new
    rows are copied; the totals are recomputed from all of them)."""
    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db], [small.client_db])
    before, rec_before = metrics.run_metrics(study, "run-1"), reconcile.reconcile(study, "run-1")
    server = sqlite_utils.Database(small.server_db)
    server["requests"].insert({"request_id": "late", "run_id": "run-1", "server_id": "srv-a", "status": "OK",
                               "n_prompts": 1, "output_tokens": 5, "energy_j": 1.0, "received_ns": 1, "done_ns": 2})
    server.conn.commit()
    server.conn.close()
    again = ingest.ingest(study, [small.server_db], [small.client_db])
    assert sqlite_utils.Database(study)["requests"].count == 6 and again.sources[1].skipped
    after = metrics.run_metrics(study, "run-1")
    rec = reconcile.reconcile(study, "run-1")
    assert after["requests_ok"] == before["requests_ok"]  # its run has client rows: unclaimed is not counted
    assert rec.server_only == 1 and rec.server_only_ids == ["late"]
    assert math.isclose(rec.attributed_j, rec_before.attributed_j + 1.0) and rec_before.server_only == 0


def test_the_pass_runs_under_its_memory_cap_and_leaves_no_scratch_folder(tmp_path, monkeypatch):
    """Guards the request pass's DuckDB memory cap (request_pass.MEMORY_MIB, which keeps a 1M x 10M ingest within
    2 GiB): the child applies it (far too little and DuckDB cannot run: the caller then passes in SQLite), gives
    every number the SQLite pass gives under a small one, and removes its spill folder."""
    db = _study(tmp_path)
    db.conn.commit()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setenv("LLMWATTS_DUCKDB_MEMORY_MIB", "16")
    assert request_pass.run_child(tmp_path / "study.db") is None  # out of memory: the cap is DuckDB's
    monkeypatch.setenv("LLMWATTS_DUCKDB_MEMORY_MIB", "96")
    child = request_pass.run_child(tmp_path / "study.db")
    assert child is not None, "the DuckDB child failed under a 96 MiB cap"
    here = request_pass.sqlite_pass(db)
    assert child["flags"] == here["flags"]
    for part in ("totals", "percentiles", "spans", "points"):
        assert _diffs(child[part], here[part], part) == []
    assert list(scratch.iterdir()) == []
    monkeypatch.setenv("LLMWATTS_DUCKDB_MEMORY_MIB", "lots")
    assert request_pass.memory_mib() == request_pass.MEMORY_MIB
