"""Fixtures for the loadgen tests: a real `llmwatts serve` (tiny model, CPU, simulated GPU) in a subprocess.

Everything that imports Locust runs in a subprocess too: Locust monkey-patches its process for gevent,
which must not leak into the other boxes' tests sharing this pytest process.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LLMWATTS = [sys.executable, "-m", "llmwatts.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(tmp: Path) -> dict:
    """Environment for subprocesses: no network for prompt files, a private cache, no real data dir."""
    env = dict(os.environ)
    env["LLMWATTS_OFFLINE"] = "1"
    env["HF_HUB_OFFLINE"] = "1"  # the tiny preset needs no hub; never wait on a network timeout
    env["LLMWATTS_CACHE_DIR"] = str(tmp / "cache")
    env.pop("LLMWATTS_DATA_DIR", None)
    env.pop("LLMWATTS_INFERENCE_TOKEN", None)
    return env


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMWATTS_OFFLINE", "1")
    monkeypatch.setenv("LLMWATTS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMWATTS_DATA_DIR", raising=False)


def serve_tiny(tmp: Path, *flags: str):
    """Run ``llmwatts serve`` (tiny, CPU, simulated GPU, port 0, DB in ``tmp``) with ``flags``; yields
    ``(target, server_db)`` once it listens, then stops it (a fixture's body: ``yield from``)."""
    port_file, db = tmp / "port", tmp / "server.db"
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen(
        [*LLMWATTS, "serve", "--model", "tiny", "--device", "cpu", "--power-backend", "simulated", "--port", "0",
         "--port-file", str(port_file), "--db", str(db), *flags],
        stdout=log, stderr=subprocess.STDOUT, env=offline_env(tmp), cwd=tmp,
    )
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"llmwatts serve did not start:\n{(tmp / 'serve.log').read_text()}")
        time.sleep(0.1)
    yield f"127.0.0.1:{port_file.read_text().strip()}", db
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def master_and_worker(tmp: Path, *master_args: str, master_env: dict | None = None,
                      worker_env: dict | None = None) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """`llmwatts load --master --expect-workers 1 MASTER_ARGS` and one `llmwatts load --worker --quiet` of it
    (a free port on 127.0.0.1), run to their end -> their (returncode, stdout, stderr)."""
    port = str(free_port())
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp,
                              env=env if env is not None else offline_env(tmp)) for argv, env in (
        ([*LLMWATTS, "load", "--master", "--expect-workers", "1", "--master-bind-host", "127.0.0.1",
          "--master-port", port, *master_args], master_env),
        ([*LLMWATTS, "load", "--worker", "--master-host", "127.0.0.1", "--master-port", port, "--quiet"], worker_env))]
    try:
        done = [(proc, *proc.communicate(timeout=timeout)) for proc, timeout in zip(procs, (90, 30))]
    finally:
        for proc in procs:
            proc.kill()
    master, worker = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err) for proc, out, err in done)
    return master, worker


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """``(target, server_db)`` of a real server shared by the loadgen tests."""
    yield from serve_tiny(tmp_path_factory.mktemp("server"), "--telemetry-hz", "5")
