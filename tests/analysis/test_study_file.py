"""A new study DB is built in a temporary file and renamed into place (analysis/study_file.py, issue 21):
the same study DB as an ingest into an existing one, and safe at every kill point."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import sqlite_utils

from llmwatts.analysis import ingest, study_file
from llmwatts.analysis.study_db import open_study_db

TABLES = ("servers", "gpus", "runs", "batches", "batch_gpu_energy", "requests", "cap_events", "client_runs",
          "client_requests", "telemetry_buckets", "run_gpu_windows", "run_request_totals", "run_percentiles",
          "run_steady", "run_request_flags", "run_request_points", "study_idle_power", "run_slo")


def dump(path) -> dict:
    db = sqlite_utils.Database(path)
    out = {t: sorted(map(repr, db.execute(f"SELECT * FROM [{t}]").fetchall())) for t in TABLES}
    out["run_metrics"] = sorted(map(repr, db.execute("SELECT * FROM run_metrics").fetchall()))
    out["sources"] = sorted(map(repr, db.execute("SELECT path, sha256, kind, size_bytes, rows FROM sources")))
    db.close()
    return out


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".study.db."))


def test_new_study_db_equals_an_ingest_into_an_existing_one(tmp_path, small):
    """Guards the fast path (temporary file, in-memory journal) against giving other rows than the WAL path."""
    fresh, existing = tmp_path / "fresh" / "study.db", tmp_path / "existing" / "study.db"
    fresh.parent.mkdir()
    existing.parent.mkdir()
    open_study_db(existing).close()  # exists before the ingest: the ordinary path
    assert study_file.is_new(fresh) and not study_file.is_new(existing)
    result = ingest.ingest(fresh, [small.server_db], [small.client_db])
    ingest.ingest(existing, [small.server_db], [small.client_db])
    assert result.study_db == str(fresh.resolve())
    assert dump(fresh) == dump(existing)
    db = sqlite_utils.Database(fresh)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # opened as every study DB is
    db.close()
    assert leftovers(fresh.parent) == []
    # Incremental as before: a second ingest of the same files into the renamed DB adds nothing.
    ingest.ingest(fresh, [small.server_db], [small.client_db])
    assert dump(fresh) == dump(existing)


def test_failed_ingest_of_a_new_study_leaves_no_study_db(tmp_path, small, monkeypatch):
    """Guards against a half-built study DB at the path (or its temporary file left behind) after an error."""
    study = tmp_path / "study.db"
    copy = ingest._copy_table

    def failing(db, path, table, pk, *rest):
        if table == "requests":
            raise OSError("disk full (test)")
        return copy(db, path, table, pk, *rest)

    monkeypatch.setattr(ingest, "_copy_table", failing)
    with pytest.raises(OSError, match="disk full"):
        ingest.ingest(study, [small.server_db], [small.client_db])
    assert not study.exists() and leftovers(tmp_path) == []


KILLED = textwrap.dedent("""
    import os, signal, sys
    from llmwatts.analysis import ingest
    copy = ingest._copy_table
    def killed(db, path, table, pk, *rest):
        if table == "requests":
            os.kill(os.getpid(), signal.SIGKILL)
        return copy(db, path, table, pk, *rest)
    ingest._copy_table = killed
    ingest.ingest(sys.argv[1], [sys.argv[2]], [sys.argv[3]])
""")


def test_killed_ingest_of_a_new_study_leaves_no_study_db(tmp_path, small):
    """Guards kill safety: SIGKILL in the middle of the copy leaves no study DB (as before the ingest); the
    next ingest removes the dead process's temporary file and builds the whole study."""
    study = tmp_path / "study.db"
    done = subprocess.run([sys.executable, "-c", KILLED, str(study), str(small.server_db), str(small.client_db)],
                          env={**os.environ}, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert not study.exists() and leftovers(tmp_path)  # the killed build's temporary file
    ingest.ingest(study, [small.server_db], [small.client_db])
    assert leftovers(tmp_path) == []
    db = sqlite_utils.Database(study)
    assert db["requests"].count == 5 and db["client_requests"].count == 6
    db.close()


def test_existing_study_db_is_not_rebuilt(tmp_path, small):
    """An existing study DB (or a WAL file of one) is ingested in place, in its own transaction."""
    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db])
    inode = study.stat().st_ino
    ingest.ingest(study, [small.server_db], [small.client_db])
    assert study.stat().st_ino == inode
    wal_only = tmp_path / "other.db"
    (tmp_path / "other.db-wal").write_bytes(b"")
    assert not study_file.is_new(wal_only) and not study_file.is_new(sqlite_utils.Database(study))


def test_a_study_db_made_meanwhile_is_never_overwritten(tmp_path, small, monkeypatch):
    """Guards against the new file replacing a study DB another process created at the path while it was being
    built (a plain rename would have dropped that one's rows): this ingest goes into that study DB instead."""
    from analysis_builders import build_small

    (tmp_path / "b").mkdir()
    other = build_small(tmp_path / "b", server_id="srv-b")
    study = tmp_path / "study.db"
    copy = ingest._copy_table

    def meanwhile(db, path, table, pk, *rest):
        if table == "requests" and not study.exists():  # another process's ingest, into the same path
            ingest.ingest(open_study_db(study), [other.server_db])
        return copy(db, path, table, pk, *rest)

    monkeypatch.setattr(ingest, "_copy_table", meanwhile)
    ingest.ingest(study, [small.server_db], [small.client_db])
    db = sqlite_utils.Database(study)
    assert {r[0] for r in db.execute("SELECT DISTINCT server_id FROM requests")} == {"srv-a", "srv-b"}
    assert db["client_requests"].count == 6
    db.close()
    assert leftovers(tmp_path) == []


def _spy_on_early_pass(monkeypatch) -> list[dict]:
    """Record each request pass child started during an ingest: the building file's committed rows then
    (read by a connection of its own, as the child reads them) and the child itself."""
    from llmwatts.analysis import duck, request_pass

    if not duck.available():
        pytest.skip("DuckDB or its sqlite extension is not installed (the [analysis] extra)")
    started = []
    start = request_pass.start_child

    def spy(path, *args, **kwargs):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        seen = {t: conn.execute(f"SELECT count(*) FROM [{t}]").fetchone()[0]
                for t in ("requests", "client_requests", "run_slo", "telemetry_buckets")}
        seen["journal_mode"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
        seen["requests_indexes"] = sorted(r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'requests'"))
        conn.close()
        child = start(path, *args, **kwargs)
        started.append({"seen": seen, "child": child, "path": str(path)})
        return child

    monkeypatch.setattr(request_pass, "start_child", spy)
    return started


def test_request_pass_of_a_new_study_starts_beside_the_telemetry(tmp_path, small, monkeypatch):
    """The new study DB's request pass starts once every table it reads is committed and before the telemetry
    is in (issue 21: beside the telemetry's child); guards against a pass over rows not yet copied (its
    tables would then differ from an ingest into an existing study DB, whose pass runs after the ingest)."""
    started = _spy_on_early_pass(monkeypatch)
    fresh, existing = tmp_path / "fresh" / "study.db", tmp_path / "existing" / "study.db"
    fresh.parent.mkdir()
    existing.parent.mkdir()
    open_study_db(existing).close()
    ingest.ingest(fresh, [small.server_db], [small.client_db])
    assert len(started) == 1 and started[0]["path"].endswith(".building")
    # The requests' key index is built after the start (the source's primary key proves the study key unique);
    # the run_id index came with the rows (the source has the same index: the raw copy copies it).
    assert started[0]["seen"] == {"requests": 5, "client_requests": 6, "run_slo": 1, "telemetry_buckets": 0,
                                  "journal_mode": "wal", "requests_indexes": ["idx_requests_run_id"]}
    assert started[0]["child"].proc.poll() is not None  # waited for by the ingest's refresh
    ingest.ingest(existing, [small.server_db], [small.client_db])
    # An existing study DB: the pass after the whole ingest, as before.
    assert len(started) == 2 and started[1]["path"] == str(existing.resolve())
    assert started[1]["seen"]["telemetry_buckets"] > 0
    assert dump(fresh) == dump(existing)


def test_failed_ingest_after_the_request_pass_started_leaves_nothing(tmp_path, small, monkeypatch):
    """Guards the early pass's clean-up: an error after it started (in the telemetry) stops the child and
    removes the temporary file with its WAL files; no study DB at the path."""
    from llmwatts.analysis import samples

    started = _spy_on_early_pass(monkeypatch)

    def failing(*args, **kwargs):
        raise OSError("disk full (test)")

    monkeypatch.setattr(samples, "windows", failing)
    study = tmp_path / "study.db"
    with pytest.raises(OSError, match="disk full"):
        ingest.ingest(study, [small.server_db], [small.client_db])
    assert len(started) == 1 and started[0]["child"].proc.poll() is not None
    assert not study.exists() and leftovers(tmp_path) == []


KILLED_AFTER_PASS = textwrap.dedent("""
    import os, signal, sys
    from llmwatts.analysis import ingest, request_pass, samples
    start = request_pass.start_child
    def started(*args, **kwargs):
        child = start(*args, **kwargs)
        print(child.proc.pid, flush=True)
        return child
    request_pass.start_child = started
    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    samples.windows = killed
    ingest.ingest(sys.argv[1], [sys.argv[2]], [sys.argv[3]])
""")


def test_killed_ingest_after_the_request_pass_started_leaves_no_study_db(tmp_path, small):
    """Guards kill safety with the early request pass: SIGKILL after it started (the building file then in WAL
    mode, read by the child) leaves no study DB; the next ingest removes the file and its WAL files."""
    from llmwatts.analysis import duck

    if not duck.available():
        pytest.skip("DuckDB or its sqlite extension is not installed (the [analysis] extra)")
    study = tmp_path / "study.db"
    done = subprocess.run([sys.executable, "-c", KILLED_AFTER_PASS, str(study), str(small.server_db),
                           str(small.client_db)], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL and done.stdout.strip().isdigit()  # killed after the start
    assert not study.exists() and leftovers(tmp_path)
    ingest.ingest(study, [small.server_db], [small.client_db])
    assert leftovers(tmp_path) == []
    db = sqlite_utils.Database(study)
    assert db["requests"].count == 5 and db["run_request_totals"].count == 1
    db.close()


def test_request_pass_starts_after_the_keys_where_the_source_does_not_prove_them(tmp_path, small, monkeypatch):
    """A server DB whose ``requests`` has no unique key of its own (the bulk copy's key index may then fail and
    the copy fall back to an upsert): the early pass starts only after the whole copy, once, and the study
    equals an ingest into an existing study DB. Guards the start before the indexes (bulk_copy.copy) from
    being taken where the key index could still fail."""
    import shutil

    server = tmp_path / "keyless.db"
    shutil.copy(small.server_db, server)
    conn = sqlite3.connect(server)
    conn.executescript("DROP VIEW run_windows; CREATE TABLE r2 AS SELECT * FROM requests; DROP TABLE requests; "
                       "ALTER TABLE r2 RENAME TO requests;")
    conn.close()
    started = _spy_on_early_pass(monkeypatch)
    fresh, existing = tmp_path / "fresh" / "study.db", tmp_path / "existing" / "study.db"
    fresh.parent.mkdir()
    existing.parent.mkdir()
    open_study_db(existing).close()
    ingest.ingest(fresh, [server], [small.client_db])
    assert len(started) == 1 and started[0]["seen"]["requests"] == 5
    assert started[0]["seen"]["requests_indexes"] == ["idx_requests_run_id", "key_requests"]  # built before it
    ingest.ingest(existing, [server], [small.client_db])
    assert dump(fresh) == dump(existing)
