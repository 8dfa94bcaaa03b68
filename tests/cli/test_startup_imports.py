"""What `llmwatts` imports before it runs a command, in a fresh interpreter.

Guards the slow start-up of every CLI command: building the parsers (every `llmwatts` command does, its
`--help` and `--version` too) imported numpy, sqlite_utils (which imports pandas whenever pandas is
installed) and grpc, through loadgen/config.py (summary -> records, arrivals) and the cap/clocks commands'
clients: ~450 ms of start-up with pandas installed, ~125 ms without those (2-core box, 2026-12-06).
A command imports what it needs once it runs.
"""

import json
import subprocess
import sys

import pytest

HEAVY = ("pandas", "numpy", "sqlite_utils", "grpc", "matplotlib", "duckdb", "torch", "transformers", "locust",
         "gevent", "jinja2")


@pytest.mark.parametrize("code", [
    "import llmwatts.cli as c; c.build_parser()",
    "import llmwatts.analysis.cli",
    "from llmwatts.loadgen.config import LoadConfig; LoadConfig(target='grpc://127.0.0.1:1', requests=1).validate()",
])
def test_building_the_cli_imports_no_heavy_module(code):
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(set({HEAVY!r}) & set(sys.modules))))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
