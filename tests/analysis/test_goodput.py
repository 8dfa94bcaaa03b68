"""Issue 17's analysis side on hand-built DBs: goodput and J per good token (checked against an independent
computation from the raw server and client DBs), one set of requests behind every numerator, the window
checks, per-request joules, idle/dynamic energy, the steady-state span, and the views' numbers."""

import sqlite3

import numpy as np
import pytest
import sqlite_utils

from llmwatts.analysis import aggregates, ingest, metrics, reconcile, report
from llmwatts.analysis.slo import parse_slo
from llmwatts.errors import InvalidArgument

from analysis_builders import S, T0, build_small

SLO = "ttft_ms=50,e2e_ms=350"


def _independent_goodput(server_db, client_db, run_id: str, slo: dict) -> dict:
    """Goodput from the raw DBs with plain sqlite3: a request is good when ok on both sides and every
    objective is met by a measured value; J per good token = window counter energy / good tokens."""
    server = sqlite3.connect(server_db)
    client = sqlite3.connect(client_db)
    begin_ns, end_ns, begin_j, end_j = server.execute(
        "SELECT begin_ns, end_ns, begin_energy_j, end_energy_j FROM runs WHERE run_id = ?", [run_id]).fetchone()
    served = {rid: (status, tokens) for rid, status, tokens in server.execute(
        "SELECT request_id, status, output_tokens FROM requests")}
    good = good_tokens = 0
    for rid, status, ttft, latency in client.execute(
            "SELECT request_id, status, ttft_ms, latency_ms FROM client_requests WHERE run_id = ?", [run_id]):
        server_status, tokens = served.get(rid, (None, 0))
        measured = {"ttft_ms": ttft, "e2e_ms": latency}
        if status == "ok" and server_status == "OK" and all(
                measured[k] is not None and measured[k] <= bound for k, bound in slo.items()):
            good += 1
            good_tokens += tokens
    duration_s = (end_ns - begin_ns) / 1e9
    return {"good_requests": good, "goodput_rps": good / duration_s,
            "goodput_tokens_per_s": good_tokens / duration_s, "j_per_good_token": (end_j - begin_j) / good_tokens}


def test_goodput_and_j_per_good_token_match_an_independent_computation(tmp_path, small):
    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db], [small.client_db])
    result = report.build_report(study, tmp_path / "out", slo=parse_slo(SLO))
    row = result.runs[0]
    expected = _independent_goodput(small.server_db, small.client_db, "run-1", {"ttft_ms": 50, "e2e_ms": 350})
    # By hand: r1 (ttft 20, e2e 100) and r2 (40, 200) are good; r3 has no TTFT, r4's is 80 ms.
    assert expected["good_requests"] == 2 and expected["j_per_good_token"] == pytest.approx(2000 / 300)
    for key, value in expected.items():
        assert row[key] == pytest.approx(value), key
    assert row["slo"] == "ttft_ms=50,e2e_ms=350"
    assert "j_per_good_token" in (tmp_path / "out" / "runs.csv").read_text().splitlines()[0]


def test_without_an_slo_every_counted_request_is_good(tmp_path, small):
    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db], [small.client_db])
    row = metrics.run_metrics(study, "run-1")
    assert row["good_requests"] == row["requests_ok"] == 4
    assert row["j_per_good_token"] == pytest.approx(row["j_per_token"])


def test_slo_text_is_checked():
    assert parse_slo("tpot_ms=50") == {"tpot_ms": 50.0}
    with pytest.raises(InvalidArgument, match="ttft_ms=500"):
        parse_slo("ttft=5")


def test_numerators_come_from_the_same_requests(tmp_path, small):
    """Defect 1 of issue 17: a request the server finished (OK, tokens counted) but the client recorded as
    CANCELLED at the deadline gave tokens/s over 5 requests and words/s over 3. Now neither counts it."""
    db = sqlite_utils.Database(small.client_db)
    db.execute("UPDATE client_requests SET status = 'CANCELLED', output_words = 0 WHERE request_id = 'r4'")
    db.conn.commit()
    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db], [small.client_db])
    row = metrics.run_metrics(study, "run-1")
    assert row["requests_ok"] == 3
    assert row["output_tokens"] == 1000 - 300 and row["output_words"] == 750 - 225
    assert row["responses"] == 12 - 4
    rec = reconcile.reconcile(study, "run-1")
    assert rec.status_mismatch == 1


def test_window_that_ends_before_its_requests_is_flagged(tmp_path, small):
    """Issue 16 item 3 / 17 defect 1: a window that closed before the run's last batch finished, and batch
    energy above window energy, were reported as consistent."""
    db = sqlite_utils.Database(small.server_db)
    db.execute("UPDATE requests SET done_ns = ? WHERE request_id = 'r4'", [T0 + 11 * S])
    db.execute("UPDATE batches SET energy_j = 2500 WHERE batch_id = 'b3'")
    db.conn.commit()
    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db], [small.client_db])
    row = metrics.run_metrics(study, "run-1")
    assert row["window_ends_before_last_request"] == 1
    assert row["batch_energy_exceeds_window"] == 1  # 400 + 500 + 2500 J of batches, 2000 J of window
    rec = reconcile.reconcile(study, "run-1")
    assert rec.done_after_window == 1 and rec.batch_energy_exceeds_window and not rec.consistent


def test_per_request_joules(tmp_path, small):
    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db], [small.client_db])
    row = metrics.run_metrics(study, "run-1")
    joules = np.array([250.0, 150.0, 500.0, 300.0])  # r1..r4, attributed by the server
    per_token = joules / np.array([200, 100, 400, 300])
    assert row["j_per_request_p50"] == pytest.approx(np.percentile(joules, 50))
    assert row["j_per_request_p95"] == pytest.approx(np.percentile(joules, 95))
    assert row["j_per_request_mean"] == pytest.approx(300.0)
    assert row["j_per_output_token_p50"] == pytest.approx(np.percentile(per_token, 50))


def test_idle_power_gives_dynamic_energy(tmp_path, small):
    # The server (or study runner) records idle power per GPU before the first run.
    db = sqlite_utils.Database(small.server_db)
    db["idle_power"].insert_all([
        {"server_id": "srv-a", "gpu_uuid": g, "begin_ns": T0 - 20 * S, "end_ns": T0 - 15 * S, "power_mw": mw,
         "simulated": 0} for g, mw in (("GPU-0000", 60_000), ("GPU-1111", 40_000))])
    db.conn.close()
    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db], [small.client_db])
    row = metrics.run_metrics(study, "run-1")
    assert row["idle_power_w"] == pytest.approx(100.0)
    assert row["energy_dynamic_j"] == pytest.approx(2000.0 - 100.0 * 10)
    assert row["j_per_token_dynamic"] == pytest.approx(1000.0 / 1000)


def test_idle_power_falls_back_to_telemetry_before_the_first_run(tmp_path, small):
    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db], [small.client_db])
    # build_small samples 1 s before BeginRun at 120 W and 80 W (per_s_mj): idle = 200 W.
    assert metrics.run_metrics(study, "run-1")["idle_power_w"] == pytest.approx(200.0)
    source = sqlite_utils.Database(study).execute("SELECT DISTINCT source FROM study_idle_power").fetchall()
    assert source == [("telemetry before first run",)]


def test_steady_span_by_hand():
    # Target 4 in flight; 90% = 3.6, so 4 are needed: from t=3 (4th start) to t=6 (first finish).
    received = np.array([0, 1, 2, 3, 8], dtype=float)
    done = np.array([6, 7, 9, 9, 10], dtype=float)
    assert aggregates.steady_span(received, done, 4) == (3, 6)
    assert aggregates.steady_span(received, done, 10) is None


def test_steady_state_of_a_run(tmp_path, small):
    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db], [small.client_db])
    row = metrics.run_metrics(study, "run-1")
    # users = 4 but at most 2 requests are ever in flight (r1, r2 in b1): no steady span at 90% of 4.
    assert row["steady_s"] is None
    db = sqlite_utils.Database(study)
    db.execute("UPDATE client_runs SET users = 2")
    db.conn.commit()
    row = metrics.run_metrics(study, "run-1")  # the hand edit marks the study stale; the read refreshes
    # r1 and r2 are in flight together from received (T0 + 0.5 s) until b1 ends (T0 + 2 s).
    assert row["steady_s"] == pytest.approx(1.5)
    assert row["steady_output_tokens"] == 300
    assert row["steady_energy_j"] == pytest.approx(200.0)  # samples at 1 s and 2 s: 120 + 80 J


def test_views_give_the_reports_numbers(tmp_path, small):
    """Issue 18 item 5: what sqlite-utils query / Datasette read is the report's row."""
    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db], [small.client_db])
    row = metrics.run_metrics(study, "run-1")
    view = next(sqlite_utils.Database(study).query("SELECT * FROM run_metrics WHERE run_id = 'run-1'"))
    for key in ("tokens_per_s", "j_per_token", "latency_p95_ms", "energy_busy_j", "sm_pct_mean"):
        assert view[key] == pytest.approx(row[key]), key
    joined = list(sqlite_utils.Database(study).query(
        "SELECT request_id, ok, good, uplink_ms FROM request_join WHERE run_id = 'run-1' ORDER BY request_id"))
    assert [(r["request_id"], r["ok"]) for r in joined] == [
        ("r1", 1), ("r2", 1), ("r3", 1), ("r4", 1), ("r5", 0), ("r6", 0)]
    telemetry = sqlite_utils.Database(study).execute(
        "SELECT sum(samples), count(DISTINCT gpu_uuid) FROM telemetry_timeline WHERE server_id = 'srv-a'").fetchone()
    assert telemetry == (26, 2)
    windows = sqlite_utils.Database(study).execute(
        "SELECT gpu_uuid, samples, sm_pct_sum / sm_pct_n FROM run_gpu_telemetry ORDER BY gpu_uuid").fetchall()
    assert windows == [("GPU-0000", 11, 50.0), ("GPU-1111", 11, 30.0)]


def test_reingest_of_a_grown_server_db_adds_only_new_rows(tmp_path):
    built = build_small(tmp_path)
    study = tmp_path / "study.db"
    ingest.ingest(study, [built.server_db], [built.client_db])
    db = sqlite_utils.Database(built.server_db)
    db["telemetry"].insert({"server_id": "srv-a", "ts_ns": T0 + 20 * S, "gpu_uuid": "GPU-0000", "power_mw": 1})
    db.conn.close()
    again = ingest.ingest(study, [built.server_db], [])
    assert again.sources[0].rows["telemetry"] == 1
    assert sqlite_utils.Database(study).execute("SELECT sum(samples) FROM telemetry_buckets").fetchone()[0] == 27
