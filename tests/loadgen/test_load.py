"""End to end against a real `llmwatts serve`: headless runs, exact rows, distributed mode, CLI errors.

Every Locust run happens in a subprocess (see conftest.py).
"""

import json
import subprocess
import sys
import textwrap
import time

import sqlite_utils

from tests.loadgen.conftest import LLMWATTS, REPO, free_port, master_and_worker, offline_env, serve_tiny


def load(tmp_path, *args, timeout=60):
    return subprocess.run([*LLMWATTS, "load", *args], capture_output=True, text=True, timeout=timeout,
                          env=offline_env(tmp_path), cwd=tmp_path)


def client_rows(db_path, run_id=None):
    db = sqlite_utils.Database(db_path)
    where = ("run_id = ?", [run_id]) if run_id else (None, None)
    return list(db["client_requests"].rows_where(*where))


def assert_sane(rows, stream: bool):
    for r in rows:
        assert r["status"] == "ok", r
        assert r["client_send_ns"] < r["done_ns"] and r["latency_ms"] > 0
        assert r["stream"] == int(stream) and r["batch_id"] and r["output_tokens"] > 0 and r["prompt_tokens"] > 0
        if stream:
            assert r["client_send_ns"] <= r["first_token_ns"] <= r["done_ns"]
            assert 0 < r["ttft_ms"] <= r["latency_ms"]
        else:
            assert r["first_token_ns"] is None


def server_request_ids(server_db, run_id, expected: int, wait_s=10.0):
    """The server's own request rows of a run (it may write them a moment after replying)."""
    deadline = time.monotonic() + wait_s
    while True:
        ids = {r["request_id"] for r in sqlite_utils.Database(server_db).query(
            "select request_id from requests where run_id = ?", [run_id])}
        if len(ids) >= expected or time.monotonic() > deadline:
            return ids
        time.sleep(0.2)


def test_unary_and_streaming_runs_record_every_request_exactly_once(server, tmp_path):
    target, server_db = server
    db = tmp_path / "client.db"
    # Two runs through the library in one process: run_load must be callable repeatedly.
    script = textwrap.dedent(f"""
        import json
        from llmwatts.loadgen.config import LoadConfig
        from llmwatts.loadgen.runner import run_load
        out = []
        for stream in (False, True):
            config = LoadConfig(target={target!r}, dataset="mini", requests=7, users=3, batch_size=2,
                                max_new_tokens=6, stream=stream, client_db={str(db)!r}, quiet=True,
                                labels={{"case": "stream" if stream else "unary"}})
            out.append(run_load(config).to_dict())
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90,
                          env=offline_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len({r["run_id"] for r in results}) == 2
    for result, stream in zip(results, (False, True)):
        rows = client_rows(db, result["run_id"])
        assert result["requests_ok"] == 7 and result["requests_failed"] == 0
        assert len(rows) == 7 and len({r["request_id"] for r in rows}) == 7  # exactly N, each once
        assert_sane(rows, stream)
        assert all(r["batch_size"] == 2 and r["dataset"].startswith("mini (embedded") for r in rows)
        # The client-made request id is the join key: the server saw the same requests under this run.
        assert server_request_ids(server_db, result["run_id"], 7) == {r["request_id"] for r in rows}
        run = sqlite_utils.Database(db)["client_runs"].get(result["run_id"])
        assert run["ended_ns"] > run["started_ns"] and run["clock_offset_ns"] is not None
        assert abs(run["clock_offset_ns"]) < 1_000_000_000  # same machine: well under a second
        assert json.loads(run["labels"])["case"] == ("stream" if stream else "unary")
        (marker,) = sqlite_utils.Database(server_db).query("select * from runs where run_id = ?",
                                                           [result["run_id"]])
        assert marker["end_ns"] is not None  # BeginRun and EndRun reached the server


def test_distributed_master_and_worker_write_each_row_once(server, tmp_path):
    """Also #16.3 in distributed mode (untested before): the run's secret from the master's BeginRun reaches
    the worker with the spawn message, so the server accepts the worker's requests under the run, and the
    master's EndRun (with the secret) closes the run's window after its last request."""
    target, server_db = server
    db = tmp_path / "master.db"
    master, worker = master_and_worker(
        tmp_path, "--target", target, "--dataset", "mini", "--requests", "9", "--users", "3", "--max-new-tokens",
        "4", "--stream", "--client-db", str(db), "--run-id", "dist-run", "--json", "--quiet")
    out, err, worker_err = master.stdout, master.stderr, worker.stderr
    assert master.returncode == 0, err
    assert worker.returncode == 0, worker_err
    assert json.loads(out)["requests_ok"] == 9
    rows = client_rows(db, "dist-run")
    assert len(rows) == 9 and len({r["request_id"] for r in rows}) == 9
    assert_sane(rows, stream=True)
    # Each row carries its worker's own clock offset (measured on the worker, not the master).
    assert all(r["clock_offset_ns"] is not None for r in rows)
    (worker_name,) = {r["worker"] for r in rows}  # written by the master, made by the worker
    assert worker_name != "" and sqlite_utils.Database(db)["client_runs"].get("dist-run")["users"] == 3
    # The server's side: the worker's requests were accepted under the owned run (a request naming a begun
    # run without its secret is PERMISSION_DENIED), and EndRun carried the secret and closed the window.
    assert server_request_ids(server_db, "dist-run", 9) == {r["request_id"] for r in rows}
    sdb = sqlite_utils.Database(server_db)
    assert {r["status"] for r in sdb.query("select status from requests where run_id = 'dist-run'")} == {"ok"}
    (window,) = sdb.query("select w.end_ns, w.pending_at_end, w.window_ok, r.secret_sha256 from run_windows w "
                          "join runs r using (run_id) where run_id = 'dist-run'")
    assert window["secret_sha256"] and window["end_ns"] is not None and window["window_ok"] == 1, window
    assert "EndRun" not in err and "PERMISSION_DENIED" not in err + worker_err


def test_locustfile_runs_headless_with_llm_options(server, tmp_path):
    target, _ = server
    db = tmp_path / "locust.db"
    done = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(REPO / "loadgen" / "locustfile.py"), "--headless", "-u", "2",
         "-r", "2", "--host", target, "-t", "60s", "--llm-dataset", "mini", "--llm-requests", "5",
         "--llm-max-new-tokens", "4", "--llm-client-db", str(db), "--llm-run-id", "via-locust",
         "--llm-label", "who=test"],
        capture_output=True, text=True, timeout=90, env=offline_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = client_rows(db, "via-locust")
    assert len(rows) == 5 and {r["status"] for r in rows} == {"ok"}
    assert json.loads(sqlite_utils.Database(db)["client_runs"].get("via-locust")["labels"])["who"] == "test"


def test_unreachable_server_is_one_line_without_traceback(tmp_path):
    port = free_port()
    done = load(tmp_path, "--target", f"127.0.0.1:{port}", "--dataset", "mini", "--requests", "1")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"llmwatts load: error: cannot reach 127.0.0.1:{port}: is `llmwatts serve` running?")
    assert "Traceback" not in done.stderr + done.stdout


def test_missing_dataset_is_one_line_naming_the_file(tmp_path):
    done = load(tmp_path, "--target", "127.0.0.1:1", "--dataset", "gsm8k", "--data-dir", str(tmp_path / "none"),
                "--requests", "1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "gsm8k_test.jsonl" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_cli_parser_does_not_import_locust():
    # Regression guard: `llmwatts serve` builds the same parser; Locust's gevent monkey-patching must
    # never reach the server process.
    code = "import sys, llmwatts.cli as c; c.build_parser(); sys.exit('locust' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


LATE_PERMIT_SCRIPT = r"""
import json, socket, sys
import gevent
from locust import User, task
from locust.env import Environment
from llmwatts.loadgen import session as session_mod
from llmwatts.loadgen.config import LoadConfig

class Idle(User):
    @task
    def nothing(self):
        gevent.sleep(1)

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
master_env, worker_env = Environment(user_classes=[Idle]), Environment(user_classes=[Idle])
master_env.create_master_runner("127.0.0.1", port)
worker_env.create_worker_runner("127.0.0.1", port)
master, worker = session_mod.LoadSession(master_env), session_mod.LoadSession(worker_env)
master.config = LoadConfig(target="127.0.0.1:1", requests=2)
for _ in range(100):  # until the master knows the worker
    if master_env.runner.clients:
        break
    gevent.sleep(0.05)
session_mod.PERMIT_WAIT_S = 0.0       # this user gives up before the master's grant arrives...
gave_up = worker.take_permit()
if "--new-test" in sys.argv:          # ...and a new test starts on the worker before the grant lands
    worker._new_test_permits()        # what on_test_start does about permits
gevent.sleep(1.0)                     # ...which then comes, for nobody
session_mod.PERMIT_WAIT_S = 10.0
seqs = [worker.take_permit() for _ in range(3)]
print(json.dumps({"gave_up": gave_up, "seqs": seqs}))
sys.stdout.flush()
worker_env.runner.quit()
master_env.runner.quit()
"""


def test_a_grant_that_arrives_after_its_user_gave_up_is_used_not_lost(tmp_path):
    """Distributed --requests N: the master counts every number it grants, so a grant that comes after the
    worker's user stopped waiting must still become a request, or the run never reaches N."""
    assert late_permit_run(tmp_path) == {"gave_up": None, "seqs": [0, 1, None]}


def test_a_grant_from_an_earlier_test_is_not_used_in_the_next(tmp_path):
    # Number 0 was the last test's; this test gets the master's next number, then none (2 in all).
    assert late_permit_run(tmp_path, "--new-test") == {"gave_up": None, "seqs": [1, None, None]}


def late_permit_run(tmp_path, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", LATE_PERMIT_SCRIPT, *args], capture_output=True, text=True,
                          timeout=90, cwd=tmp_path, env=offline_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_load_reads_the_inference_token_file_from_its_environment_variable(tmp_path):
    """Guards #18's one credentials rule: `llmwatts load` read $LLMWATTS_INFERENCE_TOKEN_FILE (through
    llmwatts.client.inference_token), but run_load, the Locust users and `locust -f` read only
    $LLMWATTS_INFERENCE_TOKEN, so a library run against a server with an inference token failed
    UNAUTHENTICATED although the token file was configured."""
    token = tmp_path / "inference.token"
    token.write_text("an-inference-token-of-32-bytes!!\n")
    token.chmod(0o600)
    gen = serve_tiny(tmp_path, "--inference-token-file", str(token), "--telemetry-hz", "5")
    target, server_db = next(gen)
    try:
        script = textwrap.dedent(f"""
            import json
            from llmwatts.loadgen.config import LoadConfig
            from llmwatts.loadgen.runner import run_load
            config = LoadConfig(target={target!r}, dataset="mini", requests=3, users=2, batch_size=1,
                                max_new_tokens=4, client_db={str(tmp_path / "client.db")!r}, quiet=True)
            print(json.dumps(run_load(config).to_dict()))
        """)
        env = dict(offline_env(tmp_path), LLMWATTS_INFERENCE_TOKEN_FILE=str(token))
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90,
                              env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["requests_ok"] == 3 and result["requests_failed"] == 0
        # Without it the run stops at BeginRun, in one line: test_token_refused.py.
    finally:
        next(gen, None)
