"""How a time-bounded run ends (issue 17, defects 4 and 1, client side): Locust's own statistics agree with
the client DB about cancelled calls, in-flight requests finish within the grace period before EndRun, and a
run where nothing failed exits 0."""

import json
import subprocess
import sys

import sqlite_utils

from tests.loadgen.conftest import REPO, offline_env
from test_load import load


def test_a_call_cut_at_the_deadline_is_a_failure_in_locusts_stats_too(server, tmp_path):
    """Defect 4: a call cancelled by the load generator was CANCELLED in the client DB but a success in
    Locust's statistics (web UI, CSV, exit code). With --stop-timeout 0 every call in flight at -t is cut (closed loop: each user always has one)."""
    target, _ = server
    db = tmp_path / "client.db"
    done = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(REPO / "loadgen" / "locustfile.py"), "--headless", "-u", "2",
         "-r", "2", "--host", target, "-t", "3s", "--stop-timeout", "0", "--json-file", str(tmp_path / "stats"),
         "--llm-dataset", "mini", "--llm-max-new-tokens", "64", "--llm-ignore-eos", "--llm-client-db", str(db),
         "--llm-run-id", "cut"],
        capture_output=True, text=True, timeout=120, env=offline_env(tmp_path), cwd=tmp_path)
    rows = list(sqlite_utils.Database(db).query("select status from client_requests where run_id = 'cut'"))
    failed = sum(r["status"] != "ok" for r in rows)
    assert failed >= 1 and {r["status"] for r in rows} <= {"ok", "CANCELLED"}, rows
    stats = json.loads((tmp_path / "stats.json").read_text())  # Locust's final statistics
    (generate,) = [s for s in stats if s["method"] == "grpc" and s["name"] == "Generate"]
    assert generate["num_requests"] == len(rows)
    assert generate["num_failures"] == failed  # main: 0, although the DB says CANCELLED
    assert done.returncode == 1, done.stderr[-2000:]  # Locust's exit code on failures, like `llmwatts load`


def test_requests_in_flight_at_the_deadline_finish_before_end_run_and_the_run_exits_0(server, tmp_path):
    """Defect 4 (the other way round) and defect 1 (client side): `--run-time` used to kill the requests in
    flight, record them CANCELLED and exit 1 although nothing failed, and EndRun came while the server
    still worked on them. Now they finish within --grace, EndRun follows the last reply, exit code 0."""
    target, server_db = server
    db = tmp_path / "client.db"
    done = load(tmp_path, "--target", target, "--dataset", "mini", "--users", "3", "--run-time", "3s",
                "--grace", "60s", "--max-new-tokens", "48", "--ignore-eos", "--stream", "--run-id", "graceful",
                "--client-db", str(db), "--json", "--quiet", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    rows = list(sqlite_utils.Database(db).query("select * from client_requests where run_id = 'graceful'"))
    assert rows and {r["status"] for r in rows} == {"ok"} and result["requests_failed"] == 0
    assert result["requests_ok"] == len(rows)
    run = sqlite_utils.Database(db)["client_runs"].get("graceful")
    first_send = min(r["client_send_ns"] for r in rows)
    last_done = max(r["done_ns"] for r in rows)
    assert run["ended_ns"] >= last_done  # EndRun after the last reply, on the client's clock
    assert last_done - first_send > 3e9 or len(rows) >= 3  # requests were still in flight at the deadline
    # No request started after the deadline (3 s after the run's start, with a second of slack for set-up).
    assert max(r["client_send_ns"] for r in rows) < run["started_ns"] + 4e9
    server_rows = sqlite_utils.Database(server_db)
    (marker,) = server_rows.query("select * from runs where run_id = 'graceful'")
    done_ns = [r["done_ns"] for r in server_rows.query("select done_ns from requests where run_id = 'graceful'")]
    assert done_ns and marker["end_ns"] >= max(done_ns)  # the server's window holds every request of the run
