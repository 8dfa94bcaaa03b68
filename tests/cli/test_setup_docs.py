"""What a new user meets before any command (issue 16 item 9): how to reach `llmwatts` after `make`, the
tests' cache, and an install without the extra a command needs."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cache_dir_for_tests

REPO = Path(__file__).resolve().parents[2]


def test_readme_says_to_activate_the_virtualenv():
    """Guards: after `make demo`, `llmwatts` is not on PATH and the README never said so."""
    readme = (REPO / "README.md").read_text()
    assert "source .venv/bin/activate" in readme and ".venv/bin/llmwatts" in readme
    assert "pip install 'llmwatts[all]'" in readme


def test_tests_cache_honours_xdg_cache_home(tmp_path, monkeypatch):
    """Guards: the tests wrote to ~/.cache/llmwatts-tests whatever $XDG_CACHE_HOME said."""
    monkeypatch.delenv("LLMWATTS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir_for_tests() == tmp_path / "xdg" / "llmwatts-tests"


def run_without(module: str, *argv: str) -> subprocess.CompletedProcess:
    """``llmwatts *argv`` in an install that lacks ``module`` (its import fails as a missing package's does)."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            f"from llmwatts.cli import main\nsys.exit(main({list(argv)!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize("module,argv,extra", [
    ("locust", ["load", "--target", "127.0.0.1:1", "--dataset", "mini", "--requests", "1"], "loadgen"),
    ("sqlite_utils", ["load", "--target", "127.0.0.1:1", "--dataset", "mini", "--requests", "1"], "loadgen"),
    ("torch", ["serve", "--port", "0"], "server"),
    ("fairscale", ["serve", "--port", "0", "--shards", "2", "--device", "cpu"], "shards"),
])
def test_a_missing_extra_is_one_line_naming_it(module, argv, extra, tmp_path):
    """Dependencies by role (issue 18 item 6): a command whose extra is not installed says which one (when it
    runs: `llmwatts load --help` builds its parser without sqlite_utils, tests/cli/test_startup_imports.py)."""
    done = run_without(module, *argv, *(["--db", str(tmp_path / "s.db")] if argv[0] == "serve" else []))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"needs {module}" in lines[0] and f"pip install 'llmwatts[{extra}]'" in lines[0]


def test_cap_and_clocks_need_only_the_base_install():
    """The base install (grpcio, protobuf, rich, platformdirs) runs the control commands."""
    done = run_without("torch", "cap", "get", "--target", "127.0.0.1:1", "--timeout-s", "0.5")
    assert done.returncode == 2 and "UNAVAILABLE: could not reach 127.0.0.1:1" in done.stderr, done.stderr
