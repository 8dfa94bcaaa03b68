"""Paper metrics on hand-computed runs (values derived in conftest.build_small's docstring/comments)."""

import pytest

from llmwatts.analysis import ingest, join, metrics, reconcile, tradeoffs
from llmwatts.errors import InvalidArgument, NotFound

from analysis_builders import CLOCK_OFFSET_NS, build_small, build_sweep


@pytest.fixture
def study(tmp_path, small):
    path = tmp_path / "study.db"
    ingest.ingest(path, [small.server_db], [small.client_db])
    return path


def test_percentile_matches_linear_interpolation_by_hand():
    values = [400.0, 100.0, 300.0, 200.0]
    assert metrics.percentile(values, 50) == 250.0
    assert metrics.percentile(values, 95) == pytest.approx(385.0)  # rank 2.85: 300 + 0.85 × 100
    assert metrics.percentile(values, 99) == pytest.approx(397.0)
    assert metrics.percentile(values, 0) == 100.0 and metrics.percentile(values, 100) == 400.0
    assert metrics.percentile([7.0], 95) == 7.0
    assert metrics.percentile([], 50) is None
    with pytest.raises(InvalidArgument):
        metrics.percentile(values, 101)


def test_status_ok_in_either_spelling():
    # Regression: the server writes the gRPC code name "OK", the client "ok"; both are successes.
    assert metrics.is_ok("OK") and metrics.is_ok("ok")
    assert not metrics.is_ok("RESOURCE_EXHAUSTED") and not metrics.is_ok(None)


def test_small_run_metrics_are_exact(study):
    row = metrics.run_metrics(study, "run-1")
    assert list(row) == list(metrics.METRIC_COLUMNS)
    expected = {
        "run_id": "run-1", "model": "llama-7b", "engine": "transformers", "dtype": "float16",
        "dataset": "alpaca", "batch_size": 4, "shard_count": 2,
        "cap_w": 300.0,  # no cap label: the telemetry cap (300 000 mW) in the window
        "users": 4, "n_gpus": 2, "power": "nvml", "simulated": 0,
        "duration_s": 10.0,
        "requests_ok": 4, "requests_failed": 1, "requests_refused": 1,
        "responses": 12, "output_tokens": 1000, "output_words": 750,
        "words_per_s": 75.0, "tokens_per_s": 100.0, "responses_per_s": 1.2,
        "energy_total_j": 2000.0, "energy_source": "counter", "energy_busy_j": 1200.0,
        "avg_power_w": 200.0, "j_per_token": 2.0,
        "latency_p50_ms": 250.0, "ttft_p50_ms": 40.0,
        "gpu_energy_min_j": 800.0, "gpu_energy_max_j": 1200.0, "gpu_energy_spread": 1.5,
        "attribution_rel_diff": 0.0,
    }
    for key, value in expected.items():
        assert row[key] == pytest.approx(value), key
    assert row["j_per_response"] == pytest.approx(2000 / 12)
    # sm: GPU0 0,10..100 (mean 50), GPU1 30 → 22 samples mean 40; out-of-window samples (100 %) excluded.
    assert row["sm_pct_mean"] == pytest.approx(40.0)
    assert row["mem_pct_mean"] == pytest.approx(25.0)
    assert row["mem_used_pct_max"] == pytest.approx(75.0)  # 60 GiB of 80 GiB, not the 80 GiB outside
    assert row["latency_p95_ms"] == pytest.approx(385.0)
    assert row["latency_p99_ms"] == pytest.approx(397.0)
    assert row["ttft_p95_ms"] == pytest.approx(76.0)  # [20, 40, 80]: rank 1.9
    assert '"note": "small"' in row["labels"] and '"operator": "test"' in row["labels"]


def test_window_energy_falls_back_to_telemetry_without_counter_markers(study):
    import sqlite_utils

    db = sqlite_utils.Database(study)
    db.execute("UPDATE runs SET end_energy_j = NULL")
    db.conn.commit()
    row = metrics.run_metrics(study, "run-1")
    assert row["energy_source"] == "telemetry"
    assert row["energy_total_j"] == pytest.approx(2000.0)  # 1200 J + 800 J of per-GPU counter deltas


def test_simulated_power_is_labelled(tmp_path):
    built = build_small(tmp_path, simulated=True)
    study = tmp_path / "study.db"
    ingest.ingest(study, [built.server_db], [built.client_db])
    row = metrics.run_metrics(study, "run-1")
    assert row["power"] == "simulated" and row["simulated"] == 1


def test_join_uses_clock_offset_and_reports_both_sides(study):
    import sqlite_utils

    result = join.join_requests(sqlite_utils.Database(study), "run-1")
    assert [m["request_id"] for m in result.matched] == ["r1", "r2", "r3", "r4", "r5"]
    # The client stamped send 1 ms before the server received it, on a clock 5 ms behind.
    assert {m["uplink_ms"] for m in result.matched} == {1.0}
    assert [r["request_id"] for r in result.client_only] == ["r6"]
    assert result.server_only == [] and result.duplicated == {}
    assert join.client_to_server_ns(100, CLOCK_OFFSET_NS) == 100 + CLOCK_OFFSET_NS
    assert join.client_to_server_ns(100, None) is None


def test_reconcile_detects_missing_and_duplicated_requests(tmp_path, small):
    # A second server that also claims r2 (a retried request served twice): r2 becomes a duplicate.
    (tmp_path / "b").mkdir()
    other = build_small(tmp_path / "b", server_id="srv-b")
    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db], [small.client_db])
    import sqlite_utils

    db = sqlite_utils.Database(study)
    src = sqlite_utils.Database(other.server_db)
    db["requests"].insert(dict(next(src.query("SELECT * FROM requests WHERE request_id = 'r2'"))))
    db["requests"].insert({"request_id": "stray", "run_id": "run-1", "server_id": "srv-a", "status": "ok",
                           "n_prompts": 1, "output_tokens": 1, "energy_j": 0.0})
    rec = reconcile.reconcile(study, "run-1")
    assert rec.client_sent == 6
    assert (rec.server_ok, rec.server_error) == (3, 1)  # r1 r3 r4 ok, r5 refused by the server
    assert (rec.missing, rec.missing_ids) == (1, ["r6"])
    assert (rec.duplicated, rec.duplicated_ids) == (1, ["r2"])
    assert (rec.server_only, rec.server_only_ids) == (1, ["stray"])
    assert not rec.consistent


def test_reconcile_attribution_matches_batches(study):
    rec = reconcile.reconcile(study, "run-1")
    assert rec.attributed_j == pytest.approx(1200.0) and rec.batch_j == pytest.approx(1200.0)
    assert rec.attribution_rel_diff == pytest.approx(0.0)
    assert (rec.missing, rec.duplicated, rec.server_only, rec.outside_window) == (1, 0, 0, 0)


def test_reconcile_flags_requests_sent_before_begin_run_on_the_server_clock(study):
    import sqlite_utils

    db = sqlite_utils.Database(study)
    # r1 and r2 were sent 499 ms after BeginRun (server clock); the client's clock is 5 ms behind.
    # r1 moved 600 ms earlier: before BeginRun. r2 moved 496 ms earlier: its raw client stamp reads 2 ms
    # before BeginRun, but on the server clock it is 3 ms after; only the offset tells the two apart.
    db.execute("UPDATE client_requests SET client_send_ns = client_send_ns - 600000000 WHERE request_id = 'r1'")
    db.execute("UPDATE client_requests SET client_send_ns = client_send_ns - 496000000 WHERE request_id = 'r2'")
    db.conn.commit()
    rec = reconcile.reconcile(study, "run-1")
    assert (rec.outside_window, rec.outside_window_ids) == (1, ["r1"])


def test_unknown_run_and_missing_study_db(tmp_path, study):
    with pytest.raises(NotFound, match="no run 'nope'"):
        metrics.run_metrics(study, "nope")
    with pytest.raises(NotFound, match="no study DB"):
        metrics.run_metrics(tmp_path / "absent.db", "run-1")


SWEEP = [(700, 1, 4.0, 50.0), (700, 8, 1.0, 120.0), (300, 8, 0.8, 200.0), (300, 32, 0.9, 400.0),
         (200, 32, 0.5, 900.0)]


@pytest.fixture
def sweep_study(tmp_path):
    built = build_sweep(tmp_path, SWEEP)
    path = tmp_path / "sweep-study.db"
    ingest.ingest(path, [built.server_db], [built.client_db])
    return path


def test_tradeoffs_pareto_front(sweep_study):
    points = tradeoffs.tradeoffs(sweep_study)
    by_run = {p.run_id: p for p in points}
    assert by_run["sweep-700w-b8"].j_per_token == pytest.approx(1.0)
    assert by_run["sweep-300w-b8"].row["cap_w"] == 300
    # 300 W / b32 (0.9 J/token at 400 ms) is beaten by 300 W / b8 (0.8 J/token at 200 ms).
    front = {p.run_id for p in points if p.pareto}
    assert front == {"sweep-700w-b1", "sweep-700w-b8", "sweep-300w-b8", "sweep-200w-b32"}
    assert [p.latency_p95_ms for p in points] == sorted(p.latency_p95_ms for p in points)
    only_b8 = tradeoffs.tradeoffs(sweep_study, where={"batch_size": 8})
    assert {p.run_id for p in only_b8} == {"sweep-700w-b8", "sweep-300w-b8"}
    with pytest.raises(InvalidArgument, match="unknown run column"):
        tradeoffs.tradeoffs(sweep_study, where={"colour": 1})


def test_choose_sla(sweep_study):
    # p95 of latencies ms×(0.90, 0.95, 1.00, 1.05) is ms × 1.0425.
    choice = tradeoffs.choose_sla(sweep_study, latency_p95_ms_max=250)
    assert choice.met and choice.row["run_id"] == "sweep-300w-b8"
    assert "SIMULATED" in choice.message and "0.8 J/token" in choice.message
    assert tradeoffs.choose_sla(sweep_study, latency_p95_ms_max=10_000).row["run_id"] == "sweep-200w-b32"
    none = tradeoffs.choose_sla(sweep_study, latency_p95_ms_max=10)
    assert not none.met and "no run meets latency p95 <= 10 ms" in none.message
    assert "sweep-700w-b1" in none.message
    with pytest.raises(InvalidArgument):
        tradeoffs.choose_sla(sweep_study, latency_p95_ms_max=-1)


def test_run_without_end_marker_leaves_rates_blank(tmp_path, small):
    # A server killed mid-run never writes EndRun: no window, so no rate or energy, but no crash either.
    import sqlite_utils

    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db], [small.client_db])
    db = sqlite_utils.Database(study)
    db.execute("UPDATE runs SET end_ns = NULL, end_energy_j = NULL")
    db.conn.commit()
    row = metrics.run_metrics(study, "run-1")
    assert row["duration_s"] is None and row["tokens_per_s"] is None and row["j_per_token"] is None
    assert row["responses"] == 12 and row["latency_p50_ms"] == 250.0
