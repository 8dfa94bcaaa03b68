"""The server's records (server/records.py): the one attribution rule and the schema derived from the
records."""

import math
import sqlite3

from hypothesis import given
from hypothesis import strategies as st

from llmwatts.schema import columns_of
from llmwatts.server.records import BatchRow, GpuEnergyRow, RequestRow, attribute
from llmwatts.server.store import SCHEMA, ServerStore

tokens_per_request = st.dictionaries(st.text(min_size=1, max_size=8), st.integers(0, 10**7), min_size=1, max_size=64)
joules = st.floats(0.0, 1e7, allow_nan=False, allow_infinity=False)


@given(joules, tokens_per_request)
def test_attribution_adds_up_to_the_batch_and_follows_the_tokens(energy_j, tokens):
    """Guards the rule both batchers use (it was coded twice, once per batcher): every joule of a batch
    goes to its requests (the shares add up to it, to the float's last bit), split in proportion to the
    tokens each processed."""
    shares = attribute(energy_j, tokens)
    assert shares.keys() == tokens.keys()
    assert abs(math.fsum(shares.values()) - energy_j) <= math.ulp(energy_j)
    total = sum(tokens.values())
    for key, n in tokens.items():
        expected = energy_j * n / total if total else energy_j / len(tokens)
        assert math.isclose(shares[key], expected, rel_tol=1e-9, abs_tol=4 * len(tokens) * math.ulp(energy_j))
        assert shares[key] >= 0


def test_a_batch_without_tokens_loses_no_joules():
    """Guards: the old rule divided by ``total or 1``, so a batch whose requests processed no tokens
    gave its joules to nobody."""
    assert attribute(3.0, {"a": 0, "b": 0}) == {"a": 1.5, "b": 1.5}
    assert attribute(3.0, {}) == {}


def test_the_batchers_tables_are_their_records_and_say_simulated(tmp_path):
    """The store's schema for the batchers' tables is derived from the records, and every energy row says
    whether its joules came from the simulated GPU (issue 17: only the analysis views said it)."""
    assert SCHEMA["requests"][0] == columns_of(RequestRow)
    assert SCHEMA["batches"][0] == columns_of(BatchRow)
    assert SCHEMA["batch_gpu_energy"][0] == columns_of(GpuEnergyRow)
    store = ServerStore(tmp_path / "s.db", "srv")
    store.close()
    db = sqlite3.connect(tmp_path / "s.db")
    for table in ("requests", "batches", "batch_gpu_energy", "cap_events", "clock_events"):
        kinds = {r[1]: r[2] for r in db.execute(f"pragma table_info({table})")}
        assert kinds["simulated"] == "INTEGER", table


def test_an_older_server_db_gains_the_simulated_columns_on_open(tmp_path):
    """Guards: old server DBs must stay readable and writable after the new columns (ALTER TABLE on open);
    their old rows read NULL."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("create table requests (request_id TEXT PRIMARY KEY, run_id TEXT, status TEXT NOT NULL, "
               "energy_j REAL) STRICT")
    db.execute("insert into requests values ('old', 'r', 'ok', 1.5)")
    db.execute("create table cap_events (id INTEGER PRIMARY KEY, server_id TEXT, kind TEXT) STRICT")
    db.commit()
    db.close()
    store = ServerStore(path, "srv")
    store.record_requests([RequestRow(request_id="new", run_id="r", received_ns=1, n_prompts=1, prompt_tokens=3,
                                      status="ok", simulated=1)])
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("select request_id, simulated from requests order by request_id").fetchall() == [
        ("new", 1), ("old", None)]
    assert "simulated" in {r[1] for r in db.execute("pragma table_info(cap_events)")}


def test_a_segment_write_leaves_the_tables_as_sqlite_utils_upserts_left_them(tmp_path):
    """Guards the continuous segment's prepared writes (``record_segment``, issue 20: sqlite-utils took ~7 ms a
    write beside the decode loop): after the same writes, every table holds what sqlite-utils' upsert
    (batches, per-GPU rows) and insert-or-replace (requests) left, and the segment's ``batches`` row keeps
    its rowid as it grows (readers follow rowids)."""
    import sqlite_utils

    def request(rid, status, energy_j):
        return RequestRow(request_id=rid, run_id="r", batch_id="s1", received_ns=1, batch_start_ns=2, n_prompts=1,
                          prompt_tokens=3, energy_j=energy_j, status=status, simulated=1, steps=4)

    def batch(energy_j, output_tokens):
        return BatchRow(batch_id="s1", start_ns=1, first_token_ns=2, end_ns=3 + output_tokens, n_requests=2,
                        n_sequences=2, prompt_tokens=6, output_tokens=output_tokens, energy_j=energy_j,
                        energy_method="counter", simulated=1)

    def gpu(energy_j):
        return GpuEnergyRow(batch_id="s1", gpu_uuid="g0", node="n", rank=0, energy_start_mj=0,
                            energy_end_mj=int(1000 * energy_j), energy_j=energy_j, method="counter", simulated=1)

    writes = [(batch(1.0, 0), [gpu(1.0)], [request("a", "running", 0.5), request("b", "running", 0.5)]),
              (batch(3.0, 5), [gpu(3.0)], [request("a", "ok", 2.0), request("b", "running", 1.0)]),
              (batch(4.0, 9), [gpu(4.0)], [request("b", "ok", 2.0)])]
    store = ServerStore(tmp_path / "new.db", "srv")
    store.db["batches"].insert({"batch_id": "other", "start_ns": 0, "first_token_ns": 0, "end_ns": 0,
                                "n_requests": 0, "n_sequences": 0, "prompt_tokens": 0, "output_tokens": 0,
                                "energy_j": 0.0, "energy_method": "counter"})
    rowids = []
    for w in writes:
        store.record_segment(*w)
        rowids.append(store.db.execute("select rowid from batches where batch_id = 's1'").fetchone()[0])
    store.close()
    assert len(set(rowids)) == 1
    old = ServerStore(tmp_path / "old.db", "srv")  # the same writes as sqlite-utils made them
    old.db["batches"].insert({"batch_id": "other", "start_ns": 0, "first_token_ns": 0, "end_ns": 0,
                              "n_requests": 0, "n_sequences": 0, "prompt_tokens": 0, "output_tokens": 0,
                              "energy_j": 0.0, "energy_method": "counter"})
    for b, gpus, requests in writes:
        old.db["batches"].upsert(old._own(b), pk="batch_id")
        old.db["batch_gpu_energy"].upsert_all([vars(g) for g in gpus], pk=("batch_id", "gpu_uuid"))
        old.db["requests"].insert_all([old._own(r) for r in requests], replace=True)
    old.close()
    new_db, old_db = sqlite_utils.Database(tmp_path / "new.db"), sqlite_utils.Database(tmp_path / "old.db")
    for table in ("batches", "batch_gpu_energy", "requests"):
        order = "rowid" if table == "batches" else ", ".join(SCHEMA[table][1]) if isinstance(SCHEMA[table][1], tuple) \
            else SCHEMA[table][1]
        assert list(new_db[table].rows_where(order_by=order)) == list(old_db[table].rows_where(order_by=order)), table
    assert [r["status"] for r in new_db["requests"].rows_where(order_by="request_id")] == ["ok", "ok"]
    assert new_db["batches"].get("s1")["energy_j"] == 4.0 and new_db["batches"].get("s1")["server_id"] == "srv"
