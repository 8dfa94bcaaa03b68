"""bench/analysis.py on a tiny study (--quick): the script runs, llmwatts reports every run, and every
baseline that is installed (pandas, DuckDB) agrees with it number by number. No timing is asserted."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_bench_runs_and_agrees(tmp_path):
    methods = ["llmwatts"]
    if importlib.util.find_spec("pandas"):
        methods.append("pandas")
    if importlib.util.find_spec("duckdb") and importlib.util.find_spec("duckdb_extension_sqlite"):
        methods.append("duckdb-1")
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "analysis.py"), "--quick", "--data-dir", str(tmp_path / "data"),
         "--methods", ",".join(methods), "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    [study] = json.loads(out.read_text())
    assert set(study["results"]) == set(methods)
    assert all("seconds" in r for r in study["results"].values()), study["results"]
    assert not any(study["problems"].values())
    assert "| yes |" in done.stdout
