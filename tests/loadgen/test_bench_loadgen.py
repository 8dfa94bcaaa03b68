"""bench/loadgen.py's own code path on CPU (``--quick``): both clients meet the fake server, every row is
produced, and the llmwatts side recorded its requests. No timing is asserted (timings live in docs/)."""

import json
import subprocess
import sys

from tests.loadgen.conftest import REPO, offline_env


def test_loadgen_bench_quick_produces_its_tables(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "loadgen.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=offline_env(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["call"] for r in rows["capacity"]] == ["unary", "stream"]
    for r in rows["capacity"]:
        assert r["raw_rps"] > 0 and r["llmwatts_rps"] > 0 and r["recorded"] > 0
    assert rows["capacity"][1]["llmwatts_chunks_per_s"] > 0
    assert rows["open_loop"] and rows["open_loop"][0]["rate_rps"] == 20
    assert rows["open_loop"][0]["lag_p99_ms"] is not None
    assert "| offered req/s |" in done.stdout and "| call | users |" in done.stdout
