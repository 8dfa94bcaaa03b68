"""End to end: a real server on port 0 (static batches, and continuous batching), real headless Locust runs,
the study DB, and the reconciliation.

Every request the client sent must be in the study DB exactly once (as success or error), and the
per-request attributed joules must sum to the joules the GPU counters measured over the run's batches
within 1%.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlite_utils

from llmwatts.analysis import reconcile

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "llmwatts.cli"]


def _dataset() -> list[str]:
    data_dir = os.environ.get("LLMWATTS_DATA_DIR")
    if data_dir and (Path(data_dir) / "alpaca_5k.jsonl").exists():
        return ["--dataset", "alpaca", "--data-dir", data_dir]
    return ["--dataset", "mini"]


@pytest.fixture(params=[[], ["--continuous"]], ids=["batches", "continuous"])
def served(tmp_path, request):
    port_file = tmp_path / "port"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(CLI + ["serve", "--model", "tiny", "--device", "cpu", "--power-backend", "simulated",
                                   "--port", "0", "--port-file", str(port_file), "--db", str(tmp_path / "server.db"),
                                   "--telemetry-hz", "20", "--queue-size", "4", *request.param],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
        time.sleep(0.2)
    yield f"127.0.0.1:{port_file.read_text()}", tmp_path
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_locust_runs_reconcile_in_the_study_db(served):
    target, tmp = served
    runs = {"e2e-unary": [], "e2e-stream": ["--stream"]}
    for run_id, extra in runs.items():
        out = subprocess.run(
            CLI + ["load", "--target", target, *_dataset(), "--batch-size", "3", "--users", "3", "--requests", "9",
                   "--max-new-tokens", "12", "--ignore-eos", "--run-id", run_id, "--label", "batch_size=3",
                   "--client-db", str(tmp / "client.db"), "--quiet", *extra],
            capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
    # A request the server refuses (max_new_tokens over its limit) is recorded as an error on both sides.
    bad = subprocess.run(
        CLI + ["load", "--target", target, "--dataset", "mini", "--requests", "2", "--max-new-tokens", "99999",
               "--run-id", "e2e-refused", "--client-db", str(tmp / "client.db"), "--quiet"],
        capture_output=True, text=True, timeout=300)
    time.sleep(0.5)  # let the server's telemetry buffer reach its DB before the report reads it
    report = subprocess.run(
        CLI + ["report", "--server-db", str(tmp / "server.db"), "--client-db", str(tmp / "client.db"),
               "--study-db", str(tmp / "study.db"), "--out", str(tmp / "report")],
        capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert (tmp / "report" / "runs.csv").exists() and (tmp / "report" / "report.html").exists()

    db = sqlite_utils.Database(tmp / "study.db")
    for run_id in runs:
        rec = reconcile.reconcile(db, run_id)
        assert rec.client_sent == 9 and rec.server_ok == 9
        assert rec.missing == 0 and rec.duplicated == 0 and rec.server_only == 0
        # Attributed joules (joined through the client rows) vs what the counters measured per GPU.
        attributed = db.execute(
            "select sum(r.energy_j) from client_requests c join requests r using (request_id) "
            "where c.run_id = ?", [run_id]).fetchone()[0]
        measured = db.execute(
            "select sum(g.energy_j) from batch_gpu_energy g where g.batch_id in "
            "(select batch_id from requests where run_id = ?)", [run_id]).fetchone()[0]
        assert measured > 0 and abs(attributed - measured) / measured < 0.01
        rows = list(db.query("select * from client_requests where run_id = ?", [run_id]))
        assert all(r["status"] == "ok" and r["output_tokens"] == 36 for r in rows)
        assert all(r["client_send_ns"] <= (r["first_token_ns"] or r["done_ns"]) <= r["done_ns"] for r in rows)
        # Only a stream shows the client its first token.
        assert all((r["first_token_ns"] is not None) == (run_id == "e2e-stream") for r in rows)
    refused = list(db.query("select status from client_requests where run_id = 'e2e-refused'"))
    assert bad.returncode != 0 or refused, bad.stderr
    assert all(r["status"] == "INVALID_ARGUMENT" for r in refused)
    table = (tmp / "report" / "runs.md").read_text()
    assert "e2e-unary" in table and "simulated" in table.lower()
