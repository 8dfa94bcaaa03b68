"""bench/batch_waste.py: the bound on what continuous batching saves, checked on lengths worked by hand."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from batch_waste import waste  # noqa: E402


def test_one_batch_worked_by_hand():
    # Lengths 1, 3, 2, 2 in one batch: 3 steps x 4 rows = 12 row-steps, 8 useful; packed, 8 / 4 = 2 steps.
    r = waste([1, 3, 2, 2], batch=4)
    assert r["static_steps_per_batch"] == 3
    assert r["finished_row_share"] == pytest.approx(1 / 3)
    assert r["step_saving_bound"] == pytest.approx(1 / 3)


def test_batch_one_and_equal_lengths_waste_nothing():
    assert waste([5, 1, 7], batch=1)["finished_row_share"] == 0
    assert waste([4] * 8, batch=4)["step_saving_bound"] == 0


def test_too_few_responses_for_one_batch_is_an_error():
    with pytest.raises(ValueError, match="do not fill one batch of 8"):
        waste([1, 2], batch=8)


def test_cli_on_files_written_here(tmp_path):
    (tmp_path / "alpaca_5k.jsonl").write_text("\n".join(
        json.dumps({"instruction": "i", "input": "", "output": " ".join(["word"] * n)}) for n in (1, 5, 20, 40)))
    out = tmp_path / "w.json"
    run = [sys.executable, str(REPO / "bench" / "batch_waste.py"), "--data-dir", str(tmp_path)]
    done = subprocess.run(run + ["--datasets", "alpaca", "--batches", "1,2", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert rows[0]["finished_row_share"] == 0 < rows[1]["finished_row_share"]
    missing = subprocess.run(run + ["--datasets", "gsm8k"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("error: gsm8k_test.jsonl not found")
    assert "Traceback" not in missing.stderr
    short = subprocess.run(run + ["--datasets", "alpaca", "--batches", "8"], capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)
    assert short.returncode == 2
    assert short.stderr.strip() == "error: alpaca: 4 responses do not fill one batch of 8"
