"""DuckDB's sqlite extension is copied once into llmwatts' cache and reused, never left in the temp dir.

Guards a leak found when the disk filled: ``duck._extension`` copied the 34 MB extension into a fresh
``tempfile.mkdtemp`` folder in every process (each ``llmwatts report``, each request-pass and telemetry
child) and never removed it; a day of reports and test runs left hundreds of copies in /tmp."""

import os
import subprocess
import sys

import pytest

from llmwatts.analysis import duck

CHILD = """
from llmwatts.analysis import duck
conn = duck.connect(threads=1)
assert conn is not None
assert conn.execute("select 42").fetchone() == (42,)
print(duck._extension())
"""


def run_child(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"), LLMWATTS_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_the_extension_is_cached_once_and_nothing_is_left_in_the_temp_dir(tmp_path):
    if not duck.available():
        pytest.skip("DuckDB or its sqlite extension is not installed (the [analysis] extra)")
    (tmp_path / "tmp").mkdir()
    first = run_child(tmp_path)
    stamp = os.stat(first).st_mtime_ns
    second = run_child(tmp_path)
    assert first == second and str(tmp_path / "cache") in first  # one copy, in the cache, reused
    assert os.stat(second).st_mtime_ns == stamp                   # not copied again
    assert list((tmp_path / "tmp").iterdir()) == []               # nothing left in the temp dir
    copies = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert [p.name for p in copies] == ["sqlite_scanner.duckdb_extension"]


def test_an_unwritable_cache_falls_back_to_sqlite(tmp_path, monkeypatch):
    """No cache dir to copy into: DuckDB is reported unavailable (callers run the SQLite pass), no traceback."""
    if not duck.available():
        pytest.skip("DuckDB or its sqlite extension is not installed (the [analysis] extra)")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LLMWATTS_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(duck, "_EXTENSION", [])
    assert duck.available() is False and duck.connect() is None
