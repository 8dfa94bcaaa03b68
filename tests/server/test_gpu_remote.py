"""A follower's GPU on rank 0 (``gpu.remote``): each rank brackets its own batch's energy and returns it
with its step reply, so rank 0's energy meter reads a ``RemoteGPU`` without a control round trip.

The follower's GPU is a real ``SimulatedGPU`` on a fake clock (conftest.py); the controller is a stand-in that records
(and here refuses) commands, because a real one needs a gloo process group (tests/server/test_sharding.py
runs the real thing)."""

import pytest

from llmwatts.server.gpu import SimulatedGPU
from llmwatts.server.gpu.remote import RemoteGPU, bracket_batch, gpu_info
from llmwatts.server.telemetry import EnergyMeter


class NoRoundTrips:
    """Rank 0's controller as a RemoteGPU sees it; any command sent fails the test."""

    def __init__(self):
        self.energy = {}
        self.commands = []

    def call(self, op, *, local=None, **fields):
        self.commands.append((op, fields))
        raise AssertionError(f"a control round trip at a batch boundary: {op} {fields}")


def test_batch_energy_of_a_follower_costs_no_round_trip_and_excludes_idle_time(fake_clock):
    """Guards against 2·(N−1) gloo round trips per batch for energy reads (issue 18), and against a
    bracket that would charge a batch with the follower's idle time between batches."""
    clock = fake_clock
    follower_gpu = SimulatedGPU(0, node="n1", rank=1, clock_ns=clock)
    controller = NoRoundTrips()
    remote = RemoteGPU(controller, gpu_info(follower_gpu))
    meter = EnergyMeter([remote])

    joules = []
    for idle_s, busy_s in ((5.0, 2.0), (3.0, 1.0)):
        clock.advance_s(idle_s)             # idle between batches: 50 W, not the batch's
        start = meter.read()                # rank 0, before it broadcasts the batch
        follower_gpu.set_load(0)
        p_idle_w = follower_gpu.power_mw() / 1000

        def run():
            clock.advance_s(busy_s)
            return "tokens"

        tokens, ends = bracket_batch([follower_gpu], 64, run)   # the follower, inside `generate`
        controller.energy.update(ends)      # what Controller does with the step reply
        end = meter.read()                  # rank 0, after the gather
        (row,) = meter.between(start, end)
        assert tokens == "tokens" and row.method == "counter" and row.rank == 1
        joules.append(row.energy_j)
    follower_gpu.set_load(64)
    p_busy_w = follower_gpu.power_mw() / 1000
    assert p_busy_w > p_idle_w == 50.0
    assert joules == [pytest.approx(p_busy_w * 2.0, abs=0.01), pytest.approx(p_busy_w * 1.0, abs=0.01)]
    assert controller.commands == []


def test_no_batch_between_two_reads_is_zero_joules(fake_clock):
    """A bracket already counted is not counted again by a later pair of reads with no batch between."""
    clock = fake_clock
    follower_gpu = SimulatedGPU(0, node="n1", rank=1, clock_ns=clock)
    controller = NoRoundTrips()
    remote = RemoteGPU(controller, gpu_info(follower_gpu))
    meter = EnergyMeter([remote])

    def run():
        clock.advance_s(1.0)

    _, ends = bracket_batch([follower_gpu], 8, run)
    controller.energy.update(ends)
    a = meter.read()
    b = meter.read()
    assert [r.energy_j for r in meter.between(a, b)] == [0.0]
