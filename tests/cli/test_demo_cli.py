"""``llmwatts demo`` checks everything before its first side effect (issue 16 item 9): a rejected flag
starts no server and creates no --out folder."""

import pytest

from llmwatts.cli import build_parser, main


@pytest.mark.parametrize("flag,value", [("--requests", "0"), ("--users", "0"), ("--max-new-tokens", "-1"),
                                        ("--batch-sizes", "1,0"), ("--datasets", "alpaca,squad"),
                                        ("--model", "llama-3b"), ("--engine", "warp"),
                                        ("--power-backend", "nvidia")])
def test_rejected_input_starts_nothing_and_creates_no_out(tmp_path, capsys, monkeypatch, flag, value):
    """Guards: --requests 0, --users 0 and --max-new-tokens -1 were refused only after a server had started,
    and --out was created for rejected input."""
    import subprocess

    def no_server(*a, **k):
        raise AssertionError("rejected input must not start a server")

    monkeypatch.setattr(subprocess, "Popen", no_server)
    out = tmp_path / "demo-out"
    assert main(["demo", "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("llmwatts demo: error: ") and "Traceback" not in err
    assert not out.exists()


def test_a_missing_data_dir_is_said_not_passed_over(tmp_path, capsys):
    """Guards: a --data-dir that does not exist fell back to the mini set without a word."""
    out = tmp_path / "demo-out"
    assert main(["demo", "--out", str(out), "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert f"--data-dir {tmp_path / 'nowhere'} is not a folder" in capsys.readouterr().err
    assert not out.exists()


def test_mini_is_a_dataset_the_demo_accepts(tmp_path, capsys, monkeypatch):
    """Guards: `--datasets mini` was refused although the demo falls back to it; a missing
    $LLMWATTS_DATA_DIR is said."""
    from llmwatts import demo

    monkeypatch.setenv("LLMWATTS_DATA_DIR", str(tmp_path / "gone"))
    monkeypatch.setenv("LLMWATTS_CACHE_DIR", str(tmp_path / "cache"))
    args = build_parser().parse_args(["demo", "--out", str(tmp_path / "o"), "--datasets", "mini,alpaca"])
    data_dir, batch_sizes, datasets = demo.check(args)
    assert data_dir is None and batch_sizes == [1, 4, 8]
    assert datasets == [("mini", "mini (embedded)")]  # alpaca's file is nowhere: said, and left out
    err = capsys.readouterr().err
    assert f"$LLMWATTS_DATA_DIR={tmp_path / 'gone'} is not a folder" in err and "alpaca" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_the_demo_runs_a_small_study_and_its_report(tmp_path):
    """Guards issue 19's last acceptance bullet: `make demo` shows a small study and its report (before,
    the demo ran only its batch sweep). A shortened demo: the study's 2 caps x 2 batch sizes are all done,
    each run labelled with its cap, and its report.html is written beside its study DB."""
    import json
    import sqlite3
    import subprocess
    import sys

    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "llmwatts.cli", "demo", "--out", str(out), "--datasets", "mini",
                           "--batch-sizes", "1,2", "--requests", "2", "--max-new-tokens", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "study report:" in done.stdout and "SLA:" in done.stdout
    conn = sqlite3.connect(str(out / "study" / "study.db"))
    cells = conn.execute("select count(*) from study_cells where status = 'done'").fetchone()[0]
    labels = [json.loads(r[0]) for r in conn.execute("select labels from runs")]
    conn.close()
    assert cells == 4 and sorted((lab["cap_w"], lab["batch_size"]) for lab in labels) == [
        ("175", "1"), ("175", "2"), ("250", "1"), ("250", "2")]
    assert (out / "study" / "report.html").exists() and (out / "report.html").exists()
