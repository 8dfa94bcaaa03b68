"""Processes and time budgets of bench/sharding.py: each process in a session of its own, so a timeout kills
everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Budget:
    """When a configuration must be done, and what its unfinished rows then say."""
    t_end: float   # time.monotonic()
    reason: str    # "timeout after 300 s", "timeout: deadline"

    def left_s(self) -> float:
        return self.t_end - time.monotonic()


def kill_group(proc: subprocess.Popen, grace_s: float = 0.0) -> None:
    """SIGTERM ``proc`` and wait up to ``grace_s`` (when > 0), then SIGKILL its whole process group."""
    if grace_s > 0 and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children outlive their leader: the group may still exist
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:100]

