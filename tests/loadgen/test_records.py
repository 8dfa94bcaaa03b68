"""The client DB schema and the recorder's batching and exactly-once guarantees."""

import sqlite3

import pytest
import sqlite_utils

from llmwatts.loadgen import records


def row(i: int, **extra) -> dict:
    base = {"request_id": f"r{i}", "run_id": "run", "worker": "w", "dataset": "mini", "batch_size": 1,
            "stream": 0, "client_send_ns": 10 + i, "done_ns": 20 + i, "latency_ms": 1.5, "status": "ok"}
    base.update(extra)
    return base


def test_schema_matches_the_architecture_doc_strict_and_wal(tmp_path):
    db = records.open_client_db(tmp_path / "c.db")
    assert db.journal_mode == "wal"
    for table, columns in (("client_requests", records.CLIENT_REQUESTS_COLUMNS),
                           ("client_runs", records.CLIENT_RUNS_COLUMNS)):
        assert list(db[table].columns_dict) == list(columns)
        assert "STRICT" in db[table].schema
    assert list(records.CLIENT_REQUESTS_COLUMNS) == [
        "request_id", "run_id", "worker", "dataset", "batch_size", "stream", "client_send_ns", "first_token_ns",
        "done_ns", "latency_ms", "ttft_ms", "prompt_tokens", "output_tokens", "output_words", "status", "error",
        "batch_id", "clock_offset_ns", "scheduled_send_ns", "longest_output_tokens", "tpot_ms", "itl_count",
        "itl_mean_ms", "itl_p50_ms", "itl_p99_ms", "itl_max_ms", "itl_source"]
    assert db["client_requests"].pks == ["request_id"] and db["client_runs"].pks == ["run_id"]
    with pytest.raises(sqlite3.IntegrityError):  # STRICT: a wrong type is refused, not stored
        db["client_requests"].insert(row(1, batch_size="many"))


def test_recorder_flushes_in_batches_and_on_demand():
    batches = []
    recorder = records.RequestRecorder(batches.append, flush_rows=3)
    for i in range(7):
        recorder.add(row(i))
    assert [len(b) for b in batches] == [3, 3] and recorder.pending == 1
    assert recorder.flush() == 1 and recorder.flush() == 0
    assert [r["request_id"] for b in batches for r in b] == [f"r{i}" for i in range(7)]
    assert recorder.count == recorder.flushed == 7


def test_rows_reach_the_db_exactly_once_and_duplicates_fail_loudly(tmp_path):
    db = records.open_client_db(tmp_path / "c.db")
    recorder = records.RequestRecorder(records.db_sink(db), flush_rows=2)
    recorder.add_many([row(0), row(1, first_token_ns=15, ttft_ms=0.5), row(2)])
    recorder.flush()
    got = {r["request_id"]: r for r in db["client_requests"].rows}
    assert sorted(got) == ["r0", "r1", "r2"]
    assert got["r1"]["first_token_ns"] == 15 and got["r0"]["first_token_ns"] is None
    recorder.add(row(2))  # the same request again: a bug upstream, and it must not double-count
    with pytest.raises(sqlite3.IntegrityError):
        recorder.flush()
    assert recorder.pending == 1 and db["client_requests"].count == 3


def test_run_rows_start_then_end(tmp_path):
    db = records.open_client_db(tmp_path / "c.db")
    records.write_run_start(db, {"run_id": "run", "target": "h:1", "started_ns": 5, "labels": {"b": "2", "a": "1"},
                                 "clock_offset_ns": -3, "users": 2, "batch_size": 4, "dataset": "mini", "stream": 1})
    records.write_run_end(db, "run", 9)
    (run,) = db["client_runs"].rows
    assert run["ended_ns"] == 9 and run["labels"] == '{"a": "1", "b": "2"}' and run["clock_offset_ns"] == -3


def test_a_client_db_from_before_per_row_offsets_gains_the_column(tmp_path):
    # Regression: rows with clock_offset_ns could not be written into a DB created before that column.
    path = tmp_path / "old.db"
    old = sqlite_utils.Database(path)
    columns = {k: v for k, v in records.CLIENT_REQUESTS_COLUMNS.items() if k != "clock_offset_ns"}
    old["client_requests"].create(columns, pk="request_id", strict=True)
    old.conn.close()
    db = records.open_client_db(path)
    records.db_sink(db)([dict(row(1), clock_offset_ns=-5)])
    assert db["client_requests"].get(row(1)["request_id"])["clock_offset_ns"] == -5
