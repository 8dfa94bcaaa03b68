"""The server DB's telemetry buckets computed in a child process beside the other tables' copy (issue 21,
analysis/bucket_prefetch.py) are the rows the in-process passes store."""

import sys
from pathlib import Path

import sqlite_utils

from llmwatts.analysis import bucket_prefetch, duck, ingest, metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from analysis_study import StudySpec, generate  # noqa: E402

BUCKETS = "SELECT g.server_id, g.gpu_uuid, b.* FROM telemetry_buckets b JOIN telemetry_gpus g USING (gpu_key) ORDER BY 1, 2, b.bucket"
WINDOWS = "SELECT * FROM run_gpu_windows ORDER BY server_id, run_id, gpu_uuid"


def _tables(path: Path) -> tuple[list, list, list]:
    db = sqlite_utils.Database(path)
    return (db.execute(BUCKETS).fetchall(), db.execute(WINDOWS).fetchall(),
            db.execute("SELECT path, max_rowid FROM telemetry_cursor").fetchall())


def test_prefetched_buckets_equal_the_in_process_passes(tmp_path, monkeypatch):
    """Guards the child-process buckets (and their SQLite fallback when the child fails) against storing other
    rows, counts or cursors than ingesting the file alone in this process does."""
    server_db, client_db = generate(StudySpec(2_000, 20_000), tmp_path / "inputs")
    started = []
    real = bucket_prefetch._BucketsChild
    monkeypatch.setattr(bucket_prefetch, "_BucketsChild", lambda *a: started.append(a) or real(*a))
    result = ingest.ingest(tmp_path / "child.db", [server_db], [client_db])
    assert len(started) == 1 and [s.kind for s in result.sources] == ["server", "client"]
    alone = ingest.schema.open_study_db(tmp_path / "alone.db")  # ingest_file: no prefetch, DuckDB in-process
    rows = ingest.ingest_file(alone, server_db, "server").rows
    ingest.ingest(alone, [], [client_db])
    assert result.sources[0].rows == rows and rows["telemetry"] == 20_000
    monkeypatch.setattr(real, "rows", lambda self, timeout_s=0: self.discard())  # a child that failed: SQLite
    ingest.ingest(tmp_path / "failed.db", [server_db], [client_db])
    child, alone_, failed = (_tables(tmp_path / f"{n}.db") for n in ("child", "alone", "failed"))
    assert child[0] and child == alone_ == failed
    assert metrics.all_run_metrics(tmp_path / "child.db") == metrics.all_run_metrics(tmp_path / "failed.db")


def test_a_second_ingest_starts_no_child_and_adds_nothing(tmp_path, monkeypatch):
    """Guards incremental ingest: a server DB already in the study is not aggregated whole again."""
    server_db, client_db = generate(StudySpec(500, 5_000), tmp_path / "inputs")
    ingest.ingest(tmp_path / "study.db", [server_db], [client_db])
    before = _tables(tmp_path / "study.db")
    monkeypatch.setattr(bucket_prefetch, "_BucketsChild", lambda *a: (_ for _ in ()).throw(AssertionError(a)))
    assert all(s.skipped for s in ingest.ingest(tmp_path / "study.db", [server_db], [client_db]).sources)
    assert _tables(tmp_path / "study.db") == before and duck.available()


def test_bucket_chunks_are_the_buckets_in_pieces(tmp_path):
    """Guards the chunked hand-off of the buckets' child (it never holds every row at once) against losing or
    repeating rows at chunk edges."""
    from llmwatts.analysis import samples

    if not duck.available():
        import pytest
        pytest.skip("DuckDB or its sqlite extension is not installed (the [analysis] extra)")
    server_db, _ = generate(StudySpec(200, 2_000), tmp_path / "inputs")
    names = {r[1] for r in sqlite_utils.Database(server_db).execute("PRAGMA table_info(telemetry)")}
    whole = samples._buckets_duckdb(server_db, names)
    chunks = list(samples.bucket_chunks_duckdb(server_db, names, chunk_rows=7))
    assert len(chunks) > 1 and all(len(c) <= 7 for c in chunks)
    assert sorted(row for chunk in chunks for row in chunk) == sorted(whole) and len(whole) > 7


def _with_second_server(server_db: Path) -> None:
    """Make ``server_db`` a file two servers wrote: a second server with its own GPUs and copies of the first
    server's samples a second later (other powers), as two server processes sharing one DB path would."""
    db = sqlite_utils.Database(server_db)
    with db.conn:
        db.execute("INSERT INTO servers (server_id, node, simulated) VALUES ('srv-two', 'node-b', 0)")
        db.execute("INSERT INTO gpus (server_id, gpu_uuid, node, rank, simulated) SELECT 'srv-two', gpu_uuid || '-b', "
                   "'node-b', rank, simulated FROM gpus")
        db.execute("INSERT INTO telemetry (server_id, ts_ns, gpu_uuid, node, rank, power_mw, energy_mj, sm_pct, "
                   "mem_pct, mem_used_bytes, cap_mw, simulated) SELECT 'srv-two', ts_ns + 1000000000, "
                   "gpu_uuid || '-b', 'node-b', rank, power_mw + 7, energy_mj, sm_pct, mem_pct, mem_used_bytes, "
                   "cap_mw, simulated FROM telemetry")


def test_one_server_files_skip_the_server_column_and_others_group_by_it(tmp_path, monkeypatch):
    """Guards the constant server id of a one-server file's buckets (DuckDB need not read ``server_id`` from
    10M samples) against being used where it would be wrong: a file two servers wrote, or whose gpus name
    another server, is grouped by each sample's server; either way the buckets equal SQLite's own pass."""
    from llmwatts.analysis import samples

    one, _ = generate(StudySpec(300, 3_000), tmp_path / "one")
    two, _ = generate(StudySpec(300, 3_000), tmp_path / "two")
    _with_second_server(two)
    stray, _ = generate(StudySpec(300, 3_000), tmp_path / "stray")
    with sqlite_utils.Database(stray).conn as conn:
        conn.execute("UPDATE gpus SET server_id = 'srv-elsewhere' WHERE rank = 1")
    found = {}
    for name, path in (("one", one), ("two", two), ("stray", stray)):
        db = sqlite_utils.Database(memory=True)
        db.execute("ATTACH DATABASE ? AS s", [str(path)])
        found[name] = samples.one_server(db, "s")
    server_id = sqlite_utils.Database(one).execute("SELECT server_id FROM servers").fetchone()[0]
    assert found == {"one": server_id, "two": None, "stray": None}

    started = []
    real = bucket_prefetch._BucketsChild
    monkeypatch.setattr(bucket_prefetch, "_BucketsChild", lambda *a: started.append(a) or real(*a))
    for name, path in (("one", one), ("two", two)):
        ingest.ingest(tmp_path / f"{name}-child.db", [path], [])
    assert [a[2] for a in started] == [server_id, None]
    two_child = _tables(tmp_path / "two-child.db")
    assert {r[0] for r in two_child[0]} == {server_id, "srv-two"}
    monkeypatch.setattr(duck, "connect", lambda threads=None: None)
    monkeypatch.setattr(duck, "available", lambda: False)
    for name, path in (("one", one), ("two", two)):
        ingest.ingest(tmp_path / f"{name}-sqlite.db", [path], [])
        child, own = _tables(tmp_path / f"{name}-child.db"), _tables(tmp_path / f"{name}-sqlite.db")
        assert child[0] and child[:2] == own[:2]
