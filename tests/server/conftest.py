"""Fixtures of the server tests."""

import json
import os
import subprocess
import sys

import pytest


def triton_module(name: str):
    """(``llmwatts.server.engine.<name>``, or None where Triton is missing; a ``skipif`` mark for the tests
    that need it). Triton is in the test extra (pyproject): under CI a missing Triton fails instead."""
    import importlib

    try:
        module = importlib.import_module(f"llmwatts.server.engine.{name}")
    except ImportError as e:
        if os.environ.get("CI") or os.environ.get("LLMWATTS_CI"):
            raise
        return None, pytest.mark.skipif(True, reason=f"Triton is not installed ({e}): pip install -e '.[test]'")
    return module, pytest.mark.skipif(False, reason="")


def interpreted_child(test_file: str) -> dict:
    """Run ``test_file`` as a script with ``TRITON_INTERPRET=1`` (its kernels on the CPU, by numpy; Triton
    reads the variable when it is imported, so nothing else in the test process runs interpreted) -> the
    JSON its last line of output prints (its ``__main__`` block)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # From the test's own folder: the repo root's llmwatts/ would shadow the installed package.
    done = subprocess.run([sys.executable, test_file], env=env, cwd=os.path.dirname(test_file),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


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


@pytest.fixture
def events():
    """The event rows a manager recorded (its ``record_event``)."""
    return []


@pytest.fixture
def manager_of(tmp_path, events):
    """``manager_of(cls, state_name)`` makes ``make(gpus=None, backend="simulated", **kwargs)``: a
    ``SettingManager`` subclass over two simulated GPUs (or ``gpus``), state in ``tmp_path/state_name``,
    events into ``events``; every manager made is closed after the test."""
    from llmwatts.server.gpu import SimulatedGPU

    managers = []

    def factory(cls, state_name):
        def make(gpus=None, backend="simulated", **kwargs):
            gpus = gpus if gpus is not None else [SimulatedGPU(i, node="n", rank=0) for i in range(2)]
            m = cls(gpus, backend, state_path=tmp_path / state_name, record_event=events.append, **kwargs)
            managers.append(m)
            return m
        return make

    yield factory
    for m in managers:
        m.close()
