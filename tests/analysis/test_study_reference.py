"""The 10k-request study's report content is the same as before the SQL rewrite (issue 21).

``data/study10k_main_48303d5.json`` holds every run's metrics and reconciliation as main at 48303d5 (the
row-by-row ingest and Python joins) computed them for the deterministic study ``bench/analysis_study.py``
builds from ``StudySpec(10_000, 100_000)``; the test rebuilds that study and compares number by number.
"""

import dataclasses
import json
import math
import sys
from pathlib import Path

from llmwatts.analysis import ingest, metrics, reconcile

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from analysis_study import StudySpec, generate  # noqa: E402

EXPECTED = Path(__file__).parent / "data" / "study10k_main_48303d5.json"


def _same(old, new) -> bool:
    if isinstance(old, float) or isinstance(new, float):
        return old is not None and new is not None and math.isclose(old, new, rel_tol=1e-9, abs_tol=1e-9)
    return old == new


def test_10k_study_report_matches_the_row_by_row_implementation(tmp_path):
    """Guards the SQL ingest and views against drifting from the numbers the old code path produced."""
    server_db, client_db = generate(StudySpec(10_000, 100_000), tmp_path / "inputs")
    study = tmp_path / "study.db"
    ingest.ingest(study, [server_db], [client_db])
    runs = metrics.all_run_metrics(study)
    recs = [dataclasses.asdict(r) for r in reconcile.all_reconciliations(study)]
    expected = json.loads(EXPECTED.read_text())
    assert [r["run_id"] for r in runs] == [r["run_id"] for r in expected["runs"]]
    diffs = [(old["run_id"], k, v, new.get(k)) for old, new in zip(expected["runs"], runs)
             for k, v in old.items() if not _same(v, new.get(k))]
    diffs += [(old["run_id"], k, v, new.get(k)) for old, new in zip(expected["reconciliations"], recs)
              for k, v in old.items() if not _same(v, new.get(k))]
    assert diffs == []
    # A second ingest of the same files adds nothing and changes no number.
    again = ingest.ingest(study, [server_db], [client_db])
    assert all(s.skipped for s in again.sources)
    assert metrics.all_run_metrics(study) == runs


def test_sqlite_and_duckdb_bucket_passes_give_the_same_numbers(tmp_path, monkeypatch):
    """Guards the SQLite fallback (no DuckDB installed) against drifting from the DuckDB telemetry pass."""
    from llmwatts.analysis import duck

    server_db, client_db = generate(StudySpec(2_000, 20_000), tmp_path / "inputs")
    ingest.ingest(tmp_path / "duck.db", [server_db], [client_db])
    monkeypatch.setattr(duck, "connect", lambda threads=None: None)
    monkeypatch.setattr(duck, "available", lambda: False)  # nor a child process (bucket_prefetch, request_pass)
    ingest.ingest(tmp_path / "sqlite.db", [server_db], [client_db])
    a, b = metrics.all_run_metrics(tmp_path / "duck.db"), metrics.all_run_metrics(tmp_path / "sqlite.db")
    assert [(r["run_id"], k) for r, s in zip(a, b) for k in r if not _same(r[k], s[k])] == []
