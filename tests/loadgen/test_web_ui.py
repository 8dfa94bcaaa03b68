"""Issue 19: Locust's web UI shows llmwatts' options, and a run started from the UI's form is a full llmwatts
run: the options typed there reach the users (dataset, batch size, max new tokens, stream, rate)."""

import json
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import sqlite_utils

from tests.loadgen.conftest import REPO, free_port, offline_env

UI_OPTIONS = ("llm_dataset", "llm_batch_size", "llm_max_new_tokens", "llm_stream", "llm_rate_rps", "llm_arrival",
              "llm_requests", "llm_slo")


def test_a_run_started_from_the_web_ui_uses_the_llm_options_typed_there(server, tmp_path):
    target, _ = server
    port, db = free_port(), tmp_path / "ui.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(REPO / "loadgen" / "locustfile.py"), "--web-host", "127.0.0.1",
         "--web-port", str(port), "--host", target],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "locust.log", "w"), env=offline_env(tmp_path),
        cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        page = None
        for _ in range(150):
            try:
                page = urllib.request.urlopen(base + "/", timeout=5).read().decode()
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "locust.log").read_text()
                time.sleep(0.2)
        assert page is not None, "the web UI did not come up"
        shown = set(re.findall(r'"(llm_[a-z_]+)"', page))
        assert set(UI_OPTIONS) <= shown, sorted(shown)  # in the form's "custom parameters"
        form = {"user_count": "2", "spawn_rate": "2", "host": target, "llm_dataset": "mini", "llm_batch_size": "2",
                "llm_max_new_tokens": "3", "llm_stream": "true", "llm_requests": "4", "llm_rate_rps": "20",
                "llm_client_db": str(db), "llm_run_id": "web-ui"}
        reply = urllib.request.urlopen(base + "/swarm", data=urllib.parse.urlencode(form).encode(), timeout=10)
        assert json.loads(reply.read())["success"] is True
        rows, deadline = [], time.monotonic() + 60
        while len(rows) < 4 and time.monotonic() < deadline:
            time.sleep(0.5)
            if db.exists():
                rows = list(sqlite_utils.Database(db).query("select * from client_requests where run_id = 'web-ui'"))
        assert len(rows) == 4, (tmp_path / "locust.log").read_text()[-3000:]
        assert {r["status"] for r in rows} == {"ok"} and {r["batch_size"] for r in rows} == {2}
        assert {r["stream"] for r in rows} == {1} and all(r["ttft_ms"] is not None for r in rows)
        assert all(r["dataset"].startswith("mini") for r in rows)
        assert all(r["longest_output_tokens"] <= 3 for r in rows)  # max new tokens reached the request
        assert all(r["scheduled_send_ns"] is not None for r in rows)  # the rate made it an open-loop run
        labels = json.loads(sqlite_utils.Database(db)["client_runs"].get("web-ui")["labels"])
        assert labels["rate_rps"] == "20" and labels["batch_size"] == "2" and labels["max_new_tokens"] == "3"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
