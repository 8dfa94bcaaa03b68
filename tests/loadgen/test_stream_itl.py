"""Streams coalesced by the server (``--stream-interval-ms``) still give the client ITL exact to the step."""

import subprocess
import sys
import textwrap
import time

import pytest
import sqlite_utils

from tests.loadgen.conftest import offline_env, serve_tiny


@pytest.fixture
def coalescing_server(tmp_path):
    """A continuous server whose streams send the first tokens, then nothing until every sequence is done."""
    yield from serve_tiny(tmp_path, "--continuous", "--stream-interval-ms", "10000")


def test_coalesced_streams_record_the_itl_of_the_servers_steps(coalescing_server, tmp_path):
    """Guards against ITL taken from chunk arrivals once the server coalesces steps (issue 20): a request
    here arrives in two token chunks, yet its client row holds one gap per step, and they add up to the
    server's own first-token-to-last-token time."""
    target, server_db = coalescing_server
    db = tmp_path / "client.db"
    script = textwrap.dedent(f"""
        from llmwatts.loadgen.config import LoadConfig
        from llmwatts.loadgen.runner import run_load
        run_load(LoadConfig(target={target!r}, dataset="mini", requests=4, users=2, batch_size=1, max_new_tokens=12,
                            ignore_eos=True, stream=True, record_chunks=True, client_db={str(db)!r}, quiet=True))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=offline_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client = sqlite_utils.Database(db)
    rows = list(client["client_requests"].rows)
    assert len(rows) == 4 and all(r["status"] == "ok" and r["output_tokens"] == 12 for r in rows), rows
    deadline = time.monotonic() + 10  # the server writes its rows a moment after replying
    while True:
        server = {r["request_id"]: r for r in sqlite_utils.Database(server_db).query(
            "select request_id, first_token_ns, done_ns from requests")}
        if len(server) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for r in rows:
        chunks = client.execute("select count(*) from client_chunks where request_id = ?", [r["request_id"]]).fetchone()[0]
        assert chunks <= 2  # coalesced: the first tokens, then the rest at once
        assert r["itl_source"] == "server_steps" and r["itl_count"] == 11
        s = server[r["request_id"]]
        # the gaps are the steps': their sum is the server's first-to-last-token time (stamps µs apart)
        assert r["itl_mean_ms"] * 11 == pytest.approx((s["done_ns"] - s["first_token_ns"]) / 1e6, abs=2.0)
