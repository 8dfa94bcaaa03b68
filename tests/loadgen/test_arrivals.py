"""Arrival schedules (open loop) and the per-request latency summary of a stream, without a server."""

import numpy as np
import pytest

from llmwatts.errors import InvalidArgument
from llmwatts.loadgen.arrivals import ArrivalSchedule, check_arrivals, gaps_s
from llmwatts.loadgen.latency import stream_latency


def test_gamma_is_vllms_definition_with_mean_one_over_rate():
    rng = np.random.default_rng(0)
    gaps = gaps_s(4.0, "gamma", 0.5, rng, 200_000)
    # shape B, scale 1/(R·B): mean 1/R, variance 1/(R²·B)
    assert gaps.mean() == pytest.approx(0.25, rel=0.01) and gaps.var() == pytest.approx(1 / (16 * 0.5), rel=0.03)
    assert np.all(gaps_s(4.0, "constant", 1.0, rng, 5) == 0.25)
    assert gaps_s(4.0, "poisson", 1.0, rng, 200_000).std() == pytest.approx(0.25, rel=0.01)


def test_schedule_is_repeatable_from_seed_and_node_and_never_catches_up():
    a, b, c = (ArrivalSchedule(10.0, "poisson", seed=7, node=n) for n in (0, 0, 1))
    due = [[s.next_due() for _ in range(5)] for s in (a, b, c)]
    gaps = [np.diff([d[0] for d in ds]) for ds in due]
    assert np.allclose(gaps[0], gaps[1]) and not np.allclose(gaps[0], gaps[2])
    expected = np.random.default_rng([7, 0]).exponential(0.1, 4) * 1e9
    assert np.allclose(gaps[0], expected, atol=1)  # anchored at the first call, each a drawn gap later
    assert all(w - p == due[0][0][1] - due[0][0][0] for p, w in due[0])  # wall = perf + one anchor


@pytest.mark.parametrize("args, message", [((0.0, "poisson", 1.0), "--rate"), ((1.0, "uniform", 1.0), "--arrival"),
                                           ((1.0, "gamma", 0.0), "--burstiness"),
                                           ((1.0, "poisson", 2.0), "gamma only")])
def test_bad_arrival_settings_name_the_flag(args, message):
    with pytest.raises(InvalidArgument, match=message):
        check_arrivals(*args)


def test_stream_latency_definitions():
    # chunks with tokens at 40, 50, 70, 100 ms after the send; the call ends at 110 ms; 7 tokens at most
    lat = stream_latency([40.0, 50.0, 70.0, 100.0], 110.0, 7)
    assert lat.ttft_ms == 40.0 and lat.tpot_ms == pytest.approx(70.0 / 6)
    assert lat.itl_count == 3 and lat.itl_mean_ms == pytest.approx(20.0) and lat.itl_max_ms == 30.0
    assert lat.itl_p50_ms == 20.0 and lat.itl_p99_ms == pytest.approx(29.8)
    one = stream_latency([40.0], 45.0, 1)
    assert one.ttft_ms == 40.0 and one.tpot_ms is None and one.itl_count == 0 and one.itl_mean_ms is None
    assert stream_latency([], 45.0, None).ttft_ms is None


def test_itl_comes_from_the_servers_step_stamps_when_it_sends_them():
    # chunks arrive in lumps (coalesced), but the steps were 10 ms apart on the server's clock
    lat = stream_latency([40.0, 90.0], 95.0, 4, [1_000_000_000, 1_010_000_000, 1_020_000_000, 1_030_000_000])
    assert lat.itl_source == "server_steps" and lat.itl_count == 3 and lat.itl_mean_ms == pytest.approx(10.0)
    assert lat.ttft_ms == 40.0 and lat.tpot_ms == pytest.approx(55.0 / 3)
    assert stream_latency([40.0, 90.0], 95.0, 4).itl_source == "client_chunks"
