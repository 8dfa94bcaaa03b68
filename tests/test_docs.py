"""The README's commands still run: every `llmwatts ...` line names real subcommands and real flags."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("llmwatts "):
                commands.append(line.split())
    assert lines
    return commands


COMMANDS = readme_commands()


def test_readme_names_every_box_command():
    names = {c[1] for c in COMMANDS}
    assert {"serve", "load", "report", "cap"} <= names


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c[:3]) for c in COMMANDS])
def test_readme_command_parses(argv):
    sub = argv[1:3] if argv[1] in ("cap", "clocks") else argv[1:2]
    help_text = subprocess.run([sys.executable, "-m", "llmwatts.cli", *sub, "--help"], capture_output=True,
                               text=True, timeout=120, cwd=REPO)
    assert help_text.returncode == 0, help_text.stderr
    for flag in (a.split("=")[0] for a in argv if a.startswith("--")):
        assert flag in help_text.stdout, f"README uses {flag} but `llmwatts {' '.join(sub)} --help` lacks it"


def test_makefile_has_the_readme_targets():
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", make, re.M) and re.search(r"^test:", make, re.M)
    assert "make test" in (REPO / ".ci/run").read_text()
