"""The load summary from a real client DB: one percentile definition, goodput, lag; and the SLO parser."""

import pytest

from llmwatts.errors import InvalidArgument
from llmwatts.loadgen import records
from llmwatts.loadgen.summary import Slo, parse_slo, summarise
from llmwatts.stats import percentile


def request(i, **extra) -> records.ClientRequest:
    fields = dict(request_id=f"r{i}", run_id="run", worker="w", dataset="mini", batch_size=1, stream=1,
                  client_send_ns=1_000_000_000 + i * 100_000_000, done_ns=1_000_000_000 + i * 100_000_000 + 50,
                  status="ok", output_tokens=10)
    fields.update(extra)
    return records.ClientRequest(**fields)


def write(tmp_path, reqs) -> str:
    path = str(tmp_path / "client.db")
    db = records.open_client_db(path)
    records.db_sink(db)([records.wire_row(r) for r in reqs])
    db.close()
    return path


def test_load_summary_uses_the_reports_percentile_definition(tmp_path):
    """Defect 3 of issue 17: `llmwatts load` printed nearest-rank percentiles while the report interpolated,
    so one run showed two different p95s. The summary must equal llmwatts.stats (numpy 'linear')."""
    latencies = [100.0, 200.0, 300.0, 400.0]
    path = write(tmp_path, [request(i, latency_ms=v, ttft_ms=v / 10) for i, v in enumerate(latencies)])
    result = summarise(path, "run")
    assert result.latency_p95_ms == pytest.approx(385.0) == pytest.approx(percentile(latencies, 95))
    assert result.latency_p50_ms == 250.0  # nearest rank would say 200
    assert result.ttft_p99_ms == pytest.approx(percentile([v / 10 for v in latencies], 99))


def test_goodput_counts_ok_requests_meeting_every_objective_and_lag_is_actual_minus_scheduled(tmp_path):
    reqs = [
        request(0, latency_ms=900.0, ttft_ms=100.0, tpot_ms=20.0, scheduled_send_ns=1_000_000_000 - 2_000_000),
        request(1, latency_ms=900.0, ttft_ms=400.0, tpot_ms=20.0, scheduled_send_ns=1_100_000_000),  # ttft too slow
        request(2, latency_ms=900.0, ttft_ms=100.0, tpot_ms=80.0, scheduled_send_ns=1_200_000_000),  # tpot too slow
        request(3, latency_ms=800.0, ttft_ms=100.0, tpot_ms=None, scheduled_send_ns=1_300_000_000),  # no tpot
        request(4, latency_ms=100.0, ttft_ms=50.0, tpot_ms=5.0, status="UNAVAILABLE", output_tokens=None,
                scheduled_send_ns=1_400_000_000),
        request(5, latency_ms=700.0, ttft_ms=90.0, tpot_ms=10.0, scheduled_send_ns=1_500_000_000 - 8_000_000),
    ]
    path = write(tmp_path, reqs)
    result = summarise(path, "run", slo=parse_slo("ttft_ms=300,tpot_ms=50"), rate_rps=10.0)
    assert (result.requests_ok, result.requests_failed, result.requests_good) == (5, 1, 2)
    duration_s = (reqs[-1].done_ns - reqs[0].client_send_ns) / 1e9
    assert result.goodput_rps == pytest.approx(2 / duration_s)
    assert result.goodput_tokens_per_s == pytest.approx(20 / duration_s)
    lags_ms = [2.0, 0.0, 0.0, 0.0, 0.0, 8.0]
    assert result.lag_p99_ms == pytest.approx(percentile(lags_ms, 99)) and result.lag_max_ms == pytest.approx(8.0)
    assert "goodput (ttft_ms=300,tpot_ms=50): 2 good" in result.summary()
    assert "lag" in result.summary() and result.slo == "ttft_ms=300,tpot_ms=50"


def test_slo_parser():
    assert parse_slo("ttft_ms=200, tpot_ms=50,e2e_ms=5000") == Slo(200.0, 50.0, 5000.0)
    assert not parse_slo("") and parse_slo("e2e_ms=1").e2e_ms == 1.0
    for bad in ("ttft=200", "ttft_ms=-1", "ttft_ms=abc", "ttft_ms=1,ttft_ms=2", "e2e_ms"):
        with pytest.raises(InvalidArgument, match="--slo wants"):
            parse_slo(bad)
