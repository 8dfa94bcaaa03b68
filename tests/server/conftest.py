"""Fixtures of the server tests."""

import pytest


class FakeClock:
    """A monotonic nanosecond clock that moves only when told (a ``SimulatedGPU``'s ``clock_ns``)."""

    def __init__(self):
        self.now_ns = 1_000_000_000

    def __call__(self):
        return self.now_ns

    def advance_s(self, seconds):
        self.now_ns += int(seconds * 1e9)


@pytest.fixture
def fake_clock():
    return FakeClock()
