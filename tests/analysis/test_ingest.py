"""Ingest: idempotent, keyed by content, one clear error per bad input."""

import sqlite3

import pytest
import sqlite_utils
from analysis_builders import build_small

from llmwatts.analysis import bulk_copy, ingest, metrics
from llmwatts.errors import InvalidArgument, NotFound

TABLES = ["servers", "gpus", "runs", "batches", "batch_gpu_energy", "requests", "cap_events",
          "client_runs", "client_requests"]


def counts(path):
    """Rows per copied table; telemetry is aggregated (issue 21), so its count is the samples it holds."""
    db = sqlite_utils.Database(path)
    return {t: db[t].count for t in TABLES} | {
        "telemetry": db.execute("SELECT sum(samples) FROM telemetry_buckets").fetchone()[0]}


def test_ingest_copies_every_table_and_is_idempotent(tmp_path, small):
    study = tmp_path / "study.db"
    result = ingest.ingest(study, [small.server_db], [small.client_db])
    first = counts(study)
    assert first == {"servers": 1, "gpus": 2, "runs": 1, "batches": 3, "batch_gpu_energy": 6,
                     "requests": 5, "telemetry": 26, "cap_events": 1, "client_runs": 1,
                     "client_requests": 6}
    assert result.sources[0].rows["telemetry"] == 26 and result.sources[1].kind == "client"
    before = metrics.run_metrics(study, "run-1")
    ingest.ingest(study, [small.server_db, small.server_db], [small.client_db])
    assert counts(study) == first
    assert metrics.run_metrics(study, "run-1") == before
    db = sqlite_utils.Database(study)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    sources = list(db["sources"].rows)
    assert len(sources) == 2 and {s["kind"] for s in sources} == {"server", "client"}
    assert all(len(s["sha256"]) == 64 and s["size_bytes"] > 0 and s["ingested_ns"] > 0 for s in sources)
    # Each client row carries its own worker's clock offset (server − client) for cross-clock joins.
    assert {r["client_clock_offset_ns"] for r in db["client_requests"].rows} == {5_000_000}


def test_reingest_of_a_grown_file_takes_new_and_updated_rows(tmp_path, small):
    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db])
    server = sqlite_utils.Database(small.server_db)
    server.execute("UPDATE runs SET end_energy_j = 3500.0")
    server["requests"].insert({"request_id": "late", "run_id": "run-1", "server_id": "srv-a",
                               "status": "CANCELLED", "n_prompts": 1})
    server.conn.commit()
    server.conn.close()
    ingest.ingest(study, [small.server_db])
    db = sqlite_utils.Database(study)
    assert db["requests"].count == 6
    # Regression: an upsert must never write NULL over columns it was not given.
    assert db.execute("SELECT begin_energy_j, end_energy_j, labels IS NOT NULL FROM runs").fetchone() == (
        1000.0, 3500.0, 1)
    assert len(list(db["sources"].rows)) == 2  # same path, new content


def test_two_servers_with_the_same_batch_ids_stay_apart(tmp_path):
    # A cap sweep restarts the server on one machine: same GPU uuids, batch ids from b1 again.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = build_small(tmp_path / "a", server_id="srv-a")
    b = build_small(tmp_path / "b", server_id="srv-b")
    study = tmp_path / "study.db"
    ingest.ingest(study, [a.server_db, b.server_db])
    db = sqlite_utils.Database(study)
    assert db["batches"].count == 6 and db["batch_gpu_energy"].count == 12
    assert {r["server_id"] for r in db["batch_gpu_energy"].rows} == {"srv-a", "srv-b"}


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="no such DB file"):
        ingest.ingest(tmp_path / "study.db", [tmp_path / "absent.db"])
    assert not (tmp_path / "study.db").exists()


def test_wrong_kind_and_foreign_dbs_are_invalid(tmp_path, small):
    with pytest.raises(InvalidArgument, match="is a server DB, not a client DB; pass it with --server-db"):
        ingest.ingest(tmp_path / "study.db", client_dbs=[small.server_db])
    other = tmp_path / "other.db"
    sqlite_utils.Database(other)["dogs"].insert({"name": "Cleo"})
    with pytest.raises(InvalidArgument, match="neither an llmwatts server DB .* it has dogs"):
        ingest.ingest(tmp_path / "study.db", [other])
    text = tmp_path / "notes.db"
    text.write_text("not a database, only words " * 50)
    with pytest.raises(InvalidArgument, match="not a SQLite database"):
        ingest.ingest(tmp_path / "study.db", [text])
    with pytest.raises(InvalidArgument, match="not a file"):
        ingest.ingest(tmp_path / "study.db", [tmp_path])


def test_missing_key_column_is_reported(tmp_path):
    bad = tmp_path / "old.db"
    conn = sqlite3.connect(bad)
    for table in ("servers", "runs", "requests"):
        conn.execute(f"CREATE TABLE {table} (server_id TEXT, run_id TEXT, request_id TEXT)")
    conn.execute("CREATE TABLE batches (batch_id TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(InvalidArgument, match="table batches lacks column\\(s\\) server_id"):
        ingest.ingest(tmp_path / "study.db", [bad])
    assert not sqlite_utils.Database(tmp_path / "study.db")["servers"].exists()  # nothing half-copied


def _late_sample(server_db, ts_ns: int, sm_pct: float, gpus=("GPU-0000",)) -> None:
    server = sqlite_utils.Database(server_db)
    for gpu in gpus:
        row = next(server.query("SELECT * FROM telemetry WHERE gpu_uuid = ? ORDER BY ts_ns LIMIT 1", [gpu]))
        server["telemetry"].insert({**row, "ts_ns": ts_ns, "sm_pct": sm_pct})
    server.conn.commit()
    server.conn.close()


def test_reingest_takes_telemetry_samples_that_arrive_late(tmp_path, small):
    """Guards against the incremental telemetry cursor skipping samples written long after their time: the
    cursor was 'the study's newest sample minus 60 s', so a sample 195 s late (a remote rank's buffered
    batch, a mirror filled out of order) was never counted in its bucket or its run's window."""
    from analysis_builders import S, T0

    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db])
    _late_sample(small.server_db, T0 + 200 * S, 10.0, ("GPU-0000", "GPU-1111"))  # sampling goes on after the run
    ingest.ingest(study, [small.server_db])
    db = sqlite_utils.Database(study)
    before = db.execute("SELECT samples, sm_pct_sum FROM run_gpu_windows WHERE gpu_uuid = 'GPU-0000'").fetchone()
    _late_sample(small.server_db, T0 + 5 * S + S // 2, 1000.0)  # inside run-1's window, written 195 s late
    result = ingest.ingest(study, [small.server_db])
    assert result.sources[0].rows["telemetry"] == 1
    assert db.execute("SELECT sum(samples) FROM telemetry_buckets").fetchone()[0] == 26 + 3
    after = db.execute("SELECT samples, sm_pct_sum FROM run_gpu_windows WHERE gpu_uuid = 'GPU-0000'").fetchone()
    assert after == (before[0] + 1, before[1] + 1000.0)
    # Ingesting the same file again, or a copy of it at another path, counts no sample twice.
    copy = tmp_path / "copy.db"
    copy.write_bytes(small.server_db.read_bytes())
    ingest.ingest(study, [small.server_db, copy])
    assert db.execute("SELECT sum(samples) FROM telemetry_buckets").fetchone()[0] == 26 + 3
    assert db.execute("SELECT samples, sm_pct_sum FROM run_gpu_windows WHERE gpu_uuid = 'GPU-0000'").fetchone() == after


def test_bulk_copy_keeps_keys_and_a_copy_or_a_grown_file_adds_only_new_rows(tmp_path, small):
    """Guards the bulk path (an empty study table is copied without indexes, which are built afterwards):
    the key and the views' indexes must exist after it, and the next ingest of a copy, or of the grown file,
    must upsert on them (a missing key index would duplicate every row)."""
    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db], [small.client_db])
    db = sqlite_utils.Database(study)
    indexes = {(table, bool(unique), tuple(c[2] for c in db.execute(f"PRAGMA index_info([{name}])")))
               for table in ("requests", "client_requests", "batches", "batch_gpu_energy")
               for _, name, unique, *_ in db.execute(f"PRAGMA index_list([{table}])")}
    # (A study key may be a UNIQUE constraint, as its source's primary key is: bulk_copy.raw_layout.)
    assert {("requests", True, ("request_id", "server_id")), ("requests", False, ("run_id",)),
            ("client_requests", True, ("request_id",)), ("client_requests", False, ("run_id",)),
            ("batches", True, ("server_id", "batch_id")),
            ("batch_gpu_energy", True, ("server_id", "batch_id", "gpu_uuid"))} <= indexes
    first = counts(study)
    copy = tmp_path / "copy.db"
    copy.write_bytes(small.server_db.read_bytes())
    ingest.ingest(study, [copy])
    assert counts(study) == first
    server = sqlite_utils.Database(small.server_db)
    server["requests"].insert({"request_id": "late", "run_id": "run-1", "server_id": "srv-a", "status": "OK",
                               "n_prompts": 1})
    server.conn.commit()
    server.conn.close()
    ingest.ingest(study, [small.server_db])
    assert counts(study) == {**first, "requests": first["requests"] + 1}


def test_a_source_holding_a_key_twice_is_upserted_not_refused(tmp_path, small):
    """Guards the bulk path's fallback: an older client DB whose client_requests has no primary key may hold
    one request_id twice; building the study key after a bulk copy would fail, so the copy is rolled back and
    upserted (the later row wins), as before the bulk path."""
    client = sqlite_utils.Database(small.client_db)
    client.execute("CREATE TABLE loose AS SELECT * FROM client_requests")
    client.execute("INSERT INTO loose SELECT * FROM client_requests LIMIT 1")
    client.execute("UPDATE loose SET latency_ms = 12345.0 WHERE rowid = (SELECT max(rowid) FROM loose)")
    client.execute("DROP TABLE client_requests")
    client.execute("ALTER TABLE loose RENAME TO client_requests")
    client.conn.commit()
    client.conn.close()
    study = tmp_path / "study.db"
    result = ingest.ingest(study, [small.server_db], [small.client_db])
    assert result.sources[1].rows["client_requests"] == 7  # 6 rows + the duplicate's update
    db = sqlite_utils.Database(study)
    assert db["client_requests"].count == 6
    assert db.execute("SELECT count(*) FROM client_requests WHERE latency_ms = 12345.0").fetchone()[0] == 1


def test_batch_gpu_energy_takes_its_batchs_server_in_a_file_of_two_servers(tmp_path, small):
    """Guards the one-server shortcut of batch_gpu_energy.server_id (ingest._one_server: no lookup per row)
    against a file whose batches belong to two servers: each row still gets its own batch's server."""
    two = tmp_path / "two.db"
    two.write_bytes(small.server_db.read_bytes())
    server = sqlite_utils.Database(two)
    row = next(server.query("SELECT * FROM servers"))
    server["servers"].insert({**row, "server_id": "srv-0"})  # sorts first: min(server_id) is not the batches'
    moved = next(server.query("SELECT batch_id FROM batches ORDER BY batch_id"))["batch_id"]
    server.execute("UPDATE batches SET server_id = 'srv-0' WHERE batch_id = ?", [moved])
    server.conn.commit()
    server.conn.close()
    study = tmp_path / "study.db"
    ingest.ingest(study, [two])
    db = sqlite_utils.Database(study)
    got = dict(db.execute("SELECT batch_id, group_concat(DISTINCT server_id) FROM batch_gpu_energy GROUP BY batch_id"))
    assert got[moved] == "srv-0" and {v for k, v in got.items() if k != moved} == {"srv-a"}
    # One server in the file: every row is that server's, without a lookup per row.
    ingest.ingest(tmp_path / "one.db", [small.server_db])
    one = sqlite_utils.Database(tmp_path / "one.db")
    assert {r[0] for r in one.execute("SELECT DISTINCT server_id FROM batch_gpu_energy")} == {"srv-a"}


def test_an_energy_row_without_its_batch_is_refused_only_where_its_server_is_unknown(tmp_path, small):
    """A batch_gpu_energy row whose batch is not in the file: in a file of one server it is that server's (the
    check is skipped: no scan of the table there), in a file of two it is refused before anything is written."""
    one = tmp_path / "one.db"
    one.write_bytes(small.server_db.read_bytes())
    server = sqlite_utils.Database(one)
    row = next(server.query("SELECT * FROM batch_gpu_energy"))
    server["batch_gpu_energy"].insert({**row, "batch_id": "no-such-batch"})
    server.conn.commit()
    server.conn.close()
    ingest.ingest(tmp_path / "study.db", [one])
    study = sqlite_utils.Database(tmp_path / "study.db")
    assert study.execute("SELECT server_id FROM batch_gpu_energy WHERE batch_id = 'no-such-batch'").fetchall() == [
        ("srv-a",)]
    two = tmp_path / "two.db"
    two.write_bytes(one.read_bytes())
    server = sqlite_utils.Database(two)
    server["servers"].insert({**next(server.query("SELECT * FROM servers")), "server_id": "srv-0"})
    server.conn.commit()
    server.conn.close()
    with pytest.raises(InvalidArgument, match="no-such-batch.*several servers"):
        ingest.ingest(tmp_path / "refused.db", [two])
    assert not (tmp_path / "refused.db").exists()


def _by_name(db: sqlite_utils.Database, table: str) -> list:
    """A table's rows as sorted (column, value) tuples: the same whatever the column order."""
    names = sorted(r[1] for r in db.execute(f"PRAGMA table_info([{table}])"))
    return sorted(repr(r) for r in db.execute(f"SELECT {', '.join(f'[{c}]' for c in names)} FROM [{table}]"))


RAW_TABLES = ("batches", "batch_gpu_energy", "requests", "client_requests", "client_chunks")


def test_raw_copies_equal_named_copies_and_are_transfers(tmp_path, monkeypatch):
    """Guards the record-by-record copy of an empty study table (bulk_copy.raw_layout: the source's layout, SQLite's
    transfer optimisation, added columns filled afterwards) against any other row, value, key or derived number
    than the column-by-column copy, and against silently losing the transfer (which copies the indexes its
    source also has: ``RowData`` into ``IdxInsert`` in its program)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from analysis_study import StudySpec, generate

    server_db, client_db = generate(StudySpec(1_500, 6_000), tmp_path / "inputs")
    layouts = {}
    real = bulk_copy.raw_layout
    monkeypatch.setattr(bulk_copy, "raw_layout", lambda db, table, *a: layouts.setdefault(table, real(db, table, *a)))
    raw_result = ingest.ingest(tmp_path / "raw.db", [server_db], [client_db])
    monkeypatch.setattr(bulk_copy, "raw_layout", lambda *a: None)
    named_result = ingest.ingest(tmp_path / "named.db", [server_db], [client_db])
    assert [s.rows for s in raw_result.sources] == [s.rows for s in named_result.sources]
    assert raw_result.sources[0].rows["requests"] == sqlite_utils.Database(server_db)["requests"].count > 0
    raw, named = sqlite_utils.Database(tmp_path / "raw.db"), sqlite_utils.Database(tmp_path / "named.db")
    assert all(layouts[t] is not None for t in RAW_TABLES)
    assert layouts["client_requests"].constraint and layouts["requests"].early  # the key; the run_id index
    for table in RAW_TABLES:
        assert _by_name(raw, table) == _by_name(named, table), table
    assert raw.execute("SELECT count(*) FROM client_requests WHERE client_started_ns IS NULL").fetchone()[0] == 0
    assert metrics.all_run_metrics(tmp_path / "raw.db") == metrics.all_run_metrics(tmp_path / "named.db")
    # The copy is SQLite's transfer: set the table up as the ingest does and read the copy's program.
    for table, source in (("requests", server_db), ("client_requests", client_db)):
        db = sqlite_utils.Database(memory=True)
        db.execute("ATTACH DATABASE ? AS src", [str(source)])
        layout = layouts[table]
        db.execute(layout.create.replace("main.", "", 1))
        for name in layout.early:
            db.execute(raw.execute("SELECT sql FROM sqlite_master WHERE name = ?", [name]).fetchone()[0])
        program = [r[1] for r in db.execute(f"EXPLAIN {layout.insert}")]
        assert "RowData" in program and "IdxInsert" in program[program.index("RowData"):], table


def test_sources_the_raw_copy_cannot_take_are_copied_by_name(tmp_path, small, monkeypatch):
    """Guards the raw copy's conditions: a source without a base column (an older writer), with a column default
    (the transfer would need the study's to match) or WITHOUT ROWID is copied column by column, with the same
    rows as a source the raw copy takes."""
    def alter(path, sql):
        conn = sqlite3.connect(path)
        conn.executescript(sql)
        conn.close()

    variants = {
        "older": "CREATE TABLE r2 AS SELECT request_id, run_id, batch_id, server_id, received_ns, done_ns, n_prompts, "
                 "output_tokens, status FROM requests; DROP TABLE requests; ALTER TABLE r2 RENAME TO requests;",
        "default": "CREATE TABLE r2 (request_id TEXT PRIMARY KEY, run_id TEXT, batch_id TEXT, server_id TEXT, "
                   "received_ns INTEGER, done_ns INTEGER, n_prompts INTEGER, output_tokens INTEGER, energy_j REAL, "
                   "status TEXT DEFAULT 'OK'); INSERT INTO r2 SELECT request_id, run_id, batch_id, server_id, "
                   "received_ns, done_ns, n_prompts, output_tokens, energy_j, status FROM requests; "
                   "DROP TABLE requests; ALTER TABLE r2 RENAME TO requests;",
        "without_rowid": "CREATE TABLE r2 (request_id TEXT PRIMARY KEY, run_id TEXT, batch_id TEXT, server_id TEXT, "
                         "received_ns INTEGER, done_ns INTEGER, n_prompts INTEGER, output_tokens INTEGER, "
                         "energy_j REAL, status TEXT) WITHOUT ROWID; INSERT INTO r2 SELECT request_id, run_id, "
                         "batch_id, server_id, received_ns, done_ns, n_prompts, output_tokens, energy_j, status "
                         "FROM requests; DROP TABLE requests; ALTER TABLE r2 RENAME TO requests;",
    }
    base = sqlite_utils.Database(small.server_db)
    want = sorted(base.execute("SELECT request_id, server_id, status, output_tokens FROM requests").fetchall())
    seen = {}
    real = bulk_copy.raw_layout
    for name, sql in variants.items():
        server = tmp_path / f"{name}.db"
        server.write_bytes(small.server_db.read_bytes())
        alter(server, "DROP VIEW run_windows;" + sql)
        monkeypatch.setattr(bulk_copy, "raw_layout",
                            lambda db, table, *a, name=name: seen.setdefault((name, table), real(db, table, *a)))
        ingest.ingest(tmp_path / f"study-{name}.db", [server], [small.client_db])
        study = sqlite_utils.Database(tmp_path / f"study-{name}.db")
        assert seen[(name, "requests")] is None, name
        assert sorted(study.execute("SELECT request_id, server_id, status, output_tokens FROM requests")) == want
    assert seen[("older", "client_requests")] is not None  # the same study's other sources: raw
