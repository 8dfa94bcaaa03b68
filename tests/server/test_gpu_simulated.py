"""The GPU seam's simulated GPU: its power model, cap and clock physics, pacing, profiles."""

import pytest

from llmwatts.errors import InvalidArgument
from llmwatts.server import gpu as gpu_mod
from llmwatts.server.gpu import SIM_PROFILES, SimulatedGPU


def test_sim_identity_is_stable_and_marked_simulated():
    g = SimulatedGPU(1, node="n7")
    assert (g.uuid, g.name, g.simulated, g.power_source) == ("SIM-n7-1", "Simulated A100 (250 W)", True, "simulated")
    assert SimulatedGPU(1, node="n7").uuid == g.uuid
    assert g.memory_total_bytes == 40 * 1024**3


def test_sim_power_follows_load():
    g = SimulatedGPU(0, node="n")
    powers = []
    for n in (0, 1, 4, 16, 64):
        g.set_load(n)
        powers.append(g.sample().power_mw)
    assert powers[0] == 50_000  # idle
    assert powers == sorted(powers) and powers[1] > powers[0] and powers[3] > powers[1]
    g.set_load(0)
    assert g.sample().power_mw == 50_000
    assert g.sample().sm_pct == 0.0


def test_sim_cap_binds_under_load_and_throttles_clock():
    g = SimulatedGPU(0, node="n")
    g.set_load(64)
    full = g.sample()
    assert full.power_mw > 175_000 and full.sm_clock_mhz == 1410 and g.slowdown() == 1.0
    g.set_power_limit_mw(175_000)
    capped = g.sample()
    assert capped.power_mw <= 175_000
    assert capped.power_mw > 174_000  # the clock drops only as far as the cap needs
    assert capped.sm_clock_mhz < full.sm_clock_mhz
    assert capped.cap_mw == 175_000
    assert 1.0 < g.slowdown() < 1.15
    # At idle the cap does not bind.
    g.set_load(0)
    assert g.sample().power_mw == 50_000 and g.slowdown() == 1.0


def test_sim_energy_counter_is_the_integral_of_power(fake_clock):
    clock = fake_clock
    g = SimulatedGPU(0, node="n", clock_ns=clock)
    assert g.energy_mj() == 0
    clock.advance_s(2.0)                      # idle: 50 W · 2 s = 100 J
    g.set_load(64)
    p_load_w = g.power_mw() / 1000
    clock.advance_s(1.0)
    g.set_power_limit_mw(150_000)
    clock.advance_s(3.0)                      # capped: 150 W · 3 s
    mid = g.sample().energy_mj                # a read closes the segment without changing the total
    clock.advance_s(1.0)
    g.set_load(0)
    clock.advance_s(0.5)
    expected_mj = (50 * 2.0 + p_load_w * 1.0 + 150 * 3.0 + 150 * 1.0 + 50 * 0.5) * 1000
    assert abs(g.energy_mj() - expected_mj) <= 1
    assert abs(mid - (50 * 2.0 + p_load_w + 150 * 3.0) * 1000) <= 1


def test_sim_pace_sleeps_by_the_slowdown():
    slept = []
    g = SimulatedGPU(0, node="n", sleep=slept.append)
    g.set_load(64)
    g.pace(1.0)
    assert slept == []  # uncapped: no extra time
    g.set_power_limit_mw(150_000)
    g.pace(2.0)
    assert slept == [pytest.approx(2.0 * (g.slowdown() - 1.0))]
    assert slept[0] > 0.2


def test_sim_pace_really_slows_wall_time():
    import time

    g = SimulatedGPU(0, node="n")
    g.set_load(64)
    g.set_power_limit_mw(100_000)
    start = time.perf_counter()
    g.pace(0.05)
    assert time.perf_counter() - start >= 0.05 * (g.slowdown() - 1.0) * 0.95


@pytest.mark.parametrize("limit_mw", [99_999, 250_001, 0, -5])
def test_sim_set_out_of_range_refused(limit_mw):
    g = SimulatedGPU(0, node="n")
    with pytest.raises(InvalidArgument, match=r"\[100, 250\] W"):
        g.set_power_limit_mw(limit_mw)
    assert g.power_limit_mw() == 250_000


def test_sim_unknown_profile_lists_choices():
    with pytest.raises(InvalidArgument, match="a100-250w"):
        SimulatedGPU(0, node="n", profile="nope")


def test_predicted_table_direction_matches_paper():
    # Paper (Samsi et al. 2023): 250→175 W cut energy ~23% for ~6–7% more time; 150 W ~20% more time.
    p = SIM_PROFILES["a100-250w"]
    rows = {cap: (p.slowdown(p.clock_ratio(1.0, cap)), p.power_w(1.0, p.clock_ratio(1.0, cap))) for cap in (250, 175, 150)}
    t250, p250 = rows[250]
    t175, p175 = rows[175]
    t150, _ = rows[150]
    assert 1.04 < t175 / t250 < 1.10
    assert 1.15 < t150 / t250 < 1.25
    assert 0.70 < (p175 * t175) / (p250 * t250) < 0.82


# ---------------------------------------------------------------------------------------------------
# NVML, faked at the pynvml seam
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SIM_PROFILES))
def test_every_profile_can_hold_its_minimum_cap(name):
    # Guards against a profile whose floor clock draws more than its own minimum cap (the cap would
    # then be accepted but not met).
    g = SimulatedGPU(0, node="n", profile=name)
    g.set_load(1024)
    min_mw, _ = g.power_limit_constraints_mw()
    g.set_power_limit_mw(min_mw)
    assert g.sample().power_mw <= min_mw


def test_predicted_cap_table_shape():
    rows = gpu_mod.predicted_cap_table("a100-250w")
    assert [r["cap_w"] for r in rows] == [250, 225, 200, 175, 150, 125]
    assert rows[0]["time_change_pct"] == 0 and rows[0]["energy_change_pct"] == 0
    assert all(b["time_change_pct"] >= a["time_change_pct"] for a, b in zip(rows, rows[1:]))
