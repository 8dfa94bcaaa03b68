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
