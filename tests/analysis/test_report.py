"""Report files, the `llmwatts report` command and its one-line errors."""

import csv
import os
import subprocess
import sys

import pytest
from analysis_builders import build_small, build_sweep
from rich.console import Console

from llmwatts.analysis import ingest, metrics, report, study_db
from llmwatts.cli import main
from llmwatts.errors import FailedPrecondition

SWEEP = [(700, 1, 4.0, 50.0), (700, 8, 1.0, 120.0), (300, 8, 0.8, 200.0), (200, 32, 0.5, 900.0)]


def test_report_writes_every_file(tmp_path):
    """Also guards the first draft's PNG files written beside report.html (stale figures of an older layout,
    e.g. one squeezed server-lifetime timeline), and old ones left in the folder by an earlier report."""
    built = build_sweep(tmp_path, SWEEP, simulated=True)
    orphan = build_small(tmp_path)  # its client DB only: a run no ingested server saw
    study = tmp_path / "study.db"
    ingest.ingest(study, [built.server_db], [built.client_db, orphan.client_db])
    console = Console(record=True, width=300)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tradeoff.png").write_bytes(b"an older report's figure")
    result = report.build_report(study, tmp_path / "out", sla_p95_ms=250, console=console)

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "runs.csv", "runs.md"]
    for path in [result.runs_csv, result.runs_md, result.report_html]:
        assert path.exists() and path.stat().st_size > 0, path
    md = result.runs_md.read_text()
    assert md.startswith("# llmwatts runs — SIMULATED power\n")
    assert "| " + " | ".join(report.DISPLAY_COLUMNS) + " |" in md
    assert "sweep-300w-b8" in md and "## SLA choice" in md
    with open(result.runs_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(metrics.METRIC_COLUMNS)
    assert [r["run_id"] for r in rows] == built.run_ids
    assert {r["power"] for r in rows} == {"simulated"}
    assert float(rows[1]["j_per_token"]) == pytest.approx(1.0)
    page = result.report_html.read_text()
    assert "SIMULATED power" in page and page.count("data:image/png;base64,") >= 4
    text = console.export_text()
    assert "SIMULATED power" in text and "sweep-300w-b8" in text and "meets latency p95 <= 250 ms" in text
    assert "client run run-1 has no server run: ingest its server DB" in text


def test_real_power_is_not_labelled_simulated(tmp_path, small):
    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db], [small.client_db])
    result = report.build_report(study, tmp_path / "out", console=Console(file=open(os.devnull, "w")))
    assert "SIMULATED" not in result.runs_md.read_text()
    assert "| run-1 | llama-7b | 2 | 4 | 300 | nvml | 10 |" in result.runs_md.read_text()
    assert result.sla is None and not result.simulated
    # The client row refused at the door shows in the reconciliation table.
    assert "| run-1 | 6 | 4 | 1 | 1 | 0 | 0 |" in result.runs_md.read_text()


def test_report_without_runs_is_a_clear_error(tmp_path):
    study = tmp_path / "empty.db"
    study_db.open_study_db(study)
    with pytest.raises(FailedPrecondition, match="holds no runs"):
        report.build_report(study, tmp_path / "out")


def llmwatts(*args, cwd):
    return subprocess.run([sys.executable, "-m", "llmwatts.cli", "report", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=60)


def test_cli_report_end_to_end(tmp_path, small, capsys):
    # In-process through llmwatts.cli.main, the function the console script runs (a subprocess costs
    # seconds of imports; test_cli_mistake_in_a_subprocess covers the process boundary).
    out = tmp_path / "out"
    args = ["report", "--server-db", small.server_db, "--client-db", small.client_db, "--study-db",
            tmp_path / "study.db", "--out", out, "--sla-p95-ms", "1000"]
    assert main([str(a) for a in args]) == 0
    stdout = capsys.readouterr().out
    assert (out / "report.html").exists() and (out / "runs.csv").exists()
    assert "run run-1" in stdout and "meets latency p95 <= 1000 ms" in stdout
    # Re-ingesting the same files adds nothing twice (the report is not rebuilt: plots cost seconds).
    ingest.ingest(tmp_path / "study.db", [small.server_db], [small.client_db])
    assert metrics.all_run_metrics(tmp_path / "study.db")[0]["responses"] == 12
    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["responses"] == "12"


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda t, s: ["--server-db", t / "nope.db", "--study-db", t / "st.db", "--out", t / "o"],
         "no such DB file"),
        (lambda t, s: ["--server-db", s.client_db, "--study-db", t / "st.db", "--out", t / "o"],
         "is a client DB, not a server DB; pass it with --client-db"),
        (lambda t, s: ["--client-db", t / "junk.db", "--study-db", t / "st.db", "--out", t / "o"],
         "is not a SQLite database"),
        (lambda t, s: ["--study-db", t / "absent.db", "--out", t / "o"], "no study DB at"),
        (lambda t, s: ["--server-db", s.server_db, "--study-db", t / "st.db", "--out", t / "o",
                       "--sla-p95-ms", "-5"], "--sla-p95-ms must be a positive number"),
        (lambda t, s: ["--server-db", s.server_db, "--study-db", t / "st.db", "--out", t / "junk.db"],
         "is a file; give a folder"),
    ],
)
def test_cli_user_mistakes_exit_2_with_one_line(tmp_path, small, capsys, make_args, message):
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite, just text" * 100)
    assert main(["report", *map(str, make_args(tmp_path, small))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("llmwatts report: error: ") and message in err


def test_cli_mistake_in_a_subprocess_has_no_traceback(tmp_path):
    result = llmwatts("--server-db", tmp_path / "nope.db", "--study-db", tmp_path / "st.db", "--out",
                      tmp_path / "o", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"llmwatts report: error: no such DB file: {tmp_path / 'nope.db'}\n"
    assert not (tmp_path / "st.db").exists()  # inputs are checked before the study DB is created


def test_cli_help_lists_options(tmp_path):
    result = subprocess.run([sys.executable, "-m", "llmwatts.cli", "report", "--help"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0
    for option in ("--server-db", "--client-db", "--study-db", "--out", "--sla-p95-ms"):
        assert option in result.stdout
