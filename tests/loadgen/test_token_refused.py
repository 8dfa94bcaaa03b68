"""A load against a server that needs an inference token, run with none or a wrong one, against a real
`llmwatts serve` (tiny, CPU, simulated GPU) started with ``--inference-token-file``.

Guards the bug where ``run_load`` (and so `llmwatts load`) exited 0 with every request failed
UNAUTHENTICATED, `llmwatts load` printed a summary of failures instead of what to set, `locust -f` sent
every request anyway, and a distributed worker without the token ran the whole run into refusals: the
first UNAUTHENTICATED (BeginRun's, or a request's) now stops the run with one line naming
$LLMWATTS_INFERENCE_TOKEN_FILE / $LLMWATTS_INFERENCE_TOKEN, and the client DB keeps what it recorded.
"""

import subprocess
import sys
import textwrap

import pytest
import sqlite_utils

from tests.loadgen.conftest import LLMWATTS, REPO, master_and_worker, offline_env, serve_tiny

TOKEN = "an-inference-token-of-32-bytes!!"
WHAT_TO_SET = "set $LLMWATTS_INFERENCE_TOKEN_FILE or $LLMWATTS_INFERENCE_TOKEN"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """``(target, server_db, token_file)`` of a server that needs the inference token ``TOKEN``."""
    tmp = tmp_path_factory.mktemp("guarded")
    token = tmp / "inference.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    for target, server_db in serve_tiny(tmp, "--inference-token-file", str(token), "--telemetry-hz", "5"):
        yield target, server_db, token


def _env(tmp_path, token: str | None = None) -> dict:
    env = offline_env(tmp_path)
    env.pop("LLMWATTS_INFERENCE_TOKEN_FILE", None)
    if token is not None:
        env["LLMWATTS_INFERENCE_TOKEN"] = token
    return env


def _rows(db, table: str = "client_requests") -> list[dict]:
    db = sqlite_utils.Database(db)
    return list(db[table].rows) if db[table].exists() else []


@pytest.mark.parametrize("token, said", [(None, "needs an inference token and none was given"),
                                         ("not-the-servers-token", "refused the inference token")])
def test_run_load_raises_unauthenticated_and_sends_nothing(guarded, tmp_path, token, said):
    target, server_db, _ = guarded
    script = textwrap.dedent(f"""
        from llmwatts.errors import Unauthenticated
        from llmwatts.loadgen.config import LoadConfig
        from llmwatts.loadgen.runner import run_load
        config = LoadConfig(target={target!r}, dataset="mini", requests=3, users=2, max_new_tokens=4,
                            client_db="client.db", run_id="no-token", quiet=True, run_time_s=60)
        try:
            run_load(config)
        except Unauthenticated as e:
            print("Unauthenticated:", e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env=_env(tmp_path, token), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = done.stdout.strip().splitlines()
    assert line.startswith(f"Unauthenticated: {target} {said}") and WHAT_TO_SET in line
    assert done.stderr == ""  # the error is raised, not also logged
    assert _rows(tmp_path / "client.db") == []  # BeginRun refused: no request was sent
    assert not sqlite_utils.Database(server_db).execute(
        "SELECT 1 FROM requests WHERE run_id = 'no-token'").fetchall()


def test_llmwatts_load_without_the_token_is_one_line(guarded, tmp_path):
    target, _, _ = guarded
    done = subprocess.run([*LLMWATTS, "load", "--target", target, "--dataset", "mini", "--requests", "3",
                           "--max-new-tokens", "4", "--client-db", "client.db"], capture_output=True, text=True,
                          timeout=60, env=_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"llmwatts load: error: {target} needs an inference token") and WHAT_TO_SET in line


def test_locust_without_the_token_stops_at_once_and_exits_non_zero(guarded, tmp_path):
    target, _, _ = guarded
    done = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(REPO / "loadgen" / "locustfile.py"), "--headless", "-u", "2",
         "-r", "2", "--host", target, "-t", "60s", "--llm-dataset", "mini", "--llm-requests", "5",
         "--llm-max-new-tokens", "4", "--llm-client-db", "client.db"],
        capture_output=True, text=True, timeout=60, env=_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 1
    said = [line for line in done.stderr.splitlines() if "llmwatts.loadgen" in line]
    assert len(said) == 1 and WHAT_TO_SET in said[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and _rows(tmp_path / "client.db") == []


def test_a_worker_without_the_token_stops_the_distributed_run_keeping_its_rows(guarded, tmp_path):
    """The master has the token (BeginRun passes), its worker has none: the worker's first refused request
    stops the run; both exit 2 in one line; the master's client DB keeps the refused requests' rows."""
    target, _, _ = guarded
    master, worker = master_and_worker(
        tmp_path, "--target", target, "--dataset", "mini", "--requests", "60", "--users", "2", "--max-new-tokens",
        "4", "--client-db", "master.db", "--run-id", "worker-no-token", "--quiet",
        master_env=_env(tmp_path, TOKEN), worker_env=_env(tmp_path))
    assert master.returncode == 2 and worker.returncode == 2, master.stderr + worker.stderr
    for said in (master.stderr, worker.stderr):
        (line,) = said.strip().splitlines()
        assert f"{target} needs an inference token and none was given" in line and WHAT_TO_SET in line
    rows = _rows(tmp_path / "master.db")
    assert 1 <= len(rows) < 60 and {r["status"] for r in rows} == {"UNAUTHENTICATED"}
