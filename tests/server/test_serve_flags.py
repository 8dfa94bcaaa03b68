"""``llmwatts serve`` refuses bad flags (and a bad engine environment variable) before loading anything:
one readable line and a non-zero exit, never a traceback."""

import os
import subprocess
import sys

import pytest

SERVE = [sys.executable, "-m", "llmwatts.cli", "serve", "--model", "tiny", "--device", "cpu", "--power-backend",
         "simulated", "--port", "0"]


@pytest.mark.parametrize("flags,env,fragment", [
    (["--engine", "warp"], {}, "unknown engine 'warp': use auto, eager or fast"),
    (["--engine", "fast"], {"LLMWATTS_FAST_ATTENTION": "flash"},
     "LLMWATTS_FAST_ATTENTION='flash' is not a decode attention: use one of sdpa, bmm, flex"),
    (["--shards", "0"], {}, "--shards must be at least 1"),
])
def test_bad_serve_input_exits_with_one_line(tmp_path, flags, env, fragment):
    done = subprocess.run(SERVE + ["--db", str(tmp_path / "s.db"), *flags], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, **env})
    assert done.returncode != 0
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_eager_engine_ignores_the_fast_engines_attention_variable(monkeypatch):
    """The variable only matters to the fast engine: eager serving is not refused for it."""
    from llmwatts.errors import InvalidArgument
    from llmwatts.server.config import check_engine

    monkeypatch.setenv("LLMWATTS_FAST_ATTENTION", "flash")
    check_engine("eager")
    with pytest.raises(InvalidArgument):
        check_engine("auto")
