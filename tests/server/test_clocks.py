"""Locked clocks (issue 22): ClockManager on real simulated GPUs (validation against the supported
clocks, leases, rollback, persistence, recovery, events), the simulated clock model, and the RPCs on a
real server (token required, refusals name the supported clocks, events recorded with who and why)."""

import json
import sqlite3
import time

import grpc
import pytest

from llmwatts.errors import InvalidArgument, ReadOnlyPowerError
from llmwatts.server.clocks import ClockManager, clocks_reply
from llmwatts.server.gpu import LockedClocks, SimulatedGPU, clock_event_names, predicted_clock_table
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

LADDER = "1410 down to 210 MHz in steps of 15 MHz (81 values)"  # the simulated A100's supported SM clocks


class FailingGPU(SimulatedGPU):
    """A simulated GPU whose clock setter fails, as a GPU of another rank that died mid-call would."""

    def set_locked_clocks(self, lock):
        if lock != self.locked_clocks():
            raise RuntimeError("rank 1 went away")
        super().set_locked_clocks(lock)


@pytest.fixture
def make_manager(manager_of):
    return manager_of(ClockManager, "clocks.json")


def locks(manager):
    return [s.locked for s in manager.get([])]


def test_get_reports_current_max_and_supported_clocks(make_manager):
    m = make_manager()
    (s, _) = m.get([])
    assert (s.uuid, s.sm_max_mhz, s.mem_max_mhz, s.locked, s.lease_end_ns, s.simulated) == (
        "SIM-n-0", 1410, 1215, None, 0, True)
    assert list(s.supported) == [1215] and s.supported[1215][:3] == (1410, 1395, 1380) and len(s.supported[1215]) == 81
    assert s.event_reasons == ["idle"]
    reply = clocks_reply(m.get(["1"]), "simulated")
    assert reply.backend == "simulated" and reply.gpus[0].uuid == "SIM-n-1"
    assert reply.gpus[0].supported[0].mem_mhz == 1215 and list(reply.gpus[0].supported[0].sm_mhz)[-1] == 210
    assert reply.gpus[0].locked_sm_max_mhz == 0


def test_set_locks_records_events_persists_and_reset_unlocks(make_manager, events, tmp_path):
    m = make_manager()
    before_ns = time.time_ns()
    (status,) = m.set(["1"], LockedClocks(1005, 1005), 60, who="alice", reason="clock sweep")
    assert status.locked == LockedClocks(1005, 1005) and status.lease_end_ns >= before_ns + 59 * 10**9
    assert locks(m) == [None, LockedClocks(1005, 1005)]
    assert [{k: e[k] for k in ("gpu_uuid", "kind", "old_sm_max_mhz", "new_sm_min_mhz", "new_sm_max_mhz",
                                 "new_mem_max_mhz", "who", "reason")} for e in events] == [
        {"gpu_uuid": "SIM-n-1", "kind": "set", "old_sm_max_mhz": None, "new_sm_min_mhz": 1005, "new_sm_max_mhz": 1005,
         "new_mem_max_mhz": None, "who": "alice", "reason": "clock sweep"}]
    state = json.loads((tmp_path / "clocks.json").read_text())
    assert state["gpus"]["SIM-n-1"]["original_clocks"] is None  # the original: unlocked
    m.reset([], who="alice", reason="done")
    assert locks(m) == [None, None]
    assert [(e["kind"], e["old_sm_max_mhz"], e["new_sm_max_mhz"]) for e in events[1:]] == [("reset", 1005, None)]
    assert not (tmp_path / "clocks.json").exists()


@pytest.mark.parametrize("lock, message", [
    (LockedClocks(1000, 1000), "SM clock 1000 MHz is not supported; supported SM clocks at memory 1215 MHz: " + LADDER),
    (LockedClocks(1005, 1500), "SM clock 1500 MHz is not supported.*" + LADDER),
    (LockedClocks(195, 1410), "SM clock 195 MHz is not supported"),
    (LockedClocks(1200, 1005), "not a range"),
    (LockedClocks(0, 0), "not a range"),
    (LockedClocks(1005, 1005, 1593, 1593), "memory clock 1593 MHz is not supported; supported memory clocks: 1215 MHz"),
    (LockedClocks(1005, 1005, 0, 1215), "memory clocks 0-1215 MHz are not a range"),
])
def test_unsupported_clocks_refused_with_the_supported_list_and_nothing_changes(make_manager, events, tmp_path,
                                                                               lock, message):
    m = make_manager()
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        m.set([], lock, 60, "a", "")
    assert locks(m) == [None, None] and events == [] and not (tmp_path / "clocks.json").exists()


def test_partial_failure_rolls_back(make_manager, events, tmp_path):
    gpus = [SimulatedGPU(0, node="n"), SimulatedGPU(1, node="n"), FailingGPU(2, node="n")]
    m = make_manager(gpus)
    m.set(["1"], LockedClocks(1200, 1200), 60, "a", "earlier")  # an existing lease must survive the rollback
    events.clear()
    with pytest.raises(RuntimeError, match="went away"):
        m.set([], LockedClocks(900, 900), 60, "a", "")
    assert locks(m) == [None, LockedClocks(1200, 1200), None]
    assert events == []
    state = json.loads((tmp_path / "clocks.json").read_text())
    assert list(state["gpus"]) == ["SIM-n-1"] and state["gpus"]["SIM-n-1"]["original_clocks"] is None


def test_lease_expiry_unlocks(make_manager, events, tmp_path):
    m = make_manager()
    m.set([], LockedClocks(810, 1005), 0.2, "a", "short")
    deadline = time.monotonic() + 5
    while locks(m) != [None, None] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert locks(m) == [None, None]
    assert [e["kind"] for e in events if e["kind"] != "set"] == ["lease-expiry", "lease-expiry"]
    assert not (tmp_path / "clocks.json").exists()


def test_readonly_backend_refuses(make_manager, events):
    m = make_manager(backend="nvml-readonly")
    with pytest.raises(ReadOnlyPowerError, match="clocks are read-only.*`llmwatts clocks get` works"):
        m.set([], LockedClocks(1005, 1005), 60, "a", "")
    assert locks(m) == [None, None] and events == []


def test_recover_unlocks_what_a_killed_manager_left(tmp_path, events):
    gpus = [SimulatedGPU(i, node="n") for i in range(2)]
    killed = ClockManager(gpus, "simulated", state_path=tmp_path / "clocks.json", record_event=lambda e: None)
    killed.set(["0"], LockedClocks(1005, 1005), 600, "a", "")
    killed._closed = True  # SIGKILL: no restore runs; stop only its lease thread
    killed._kick()
    assert gpus[0].locked_clocks() == LockedClocks(1005, 1005)
    fresh = ClockManager(gpus, "simulated", state_path=tmp_path / "clocks.json", record_event=events.append)
    try:
        assert [s.uuid for s in fresh.recover()] == ["SIM-n-0"]
        assert gpus[0].locked_clocks() is None
        assert [(e["kind"], e["old_sm_min_mhz"], e["new_sm_min_mhz"]) for e in events] == [("startup-restore", 1005, None)]
        assert not (tmp_path / "clocks.json").exists()
    finally:
        fresh.close()


def test_malformed_state_file_is_one_line_with_the_fix(tmp_path):
    (tmp_path / "clocks.json").write_text(json.dumps({"gpus": {"SIM-n-0": {"original_clocks": [1, 2]}}}))
    m = ClockManager([SimulatedGPU(0, node="n")], "simulated", state_path=tmp_path / "clocks.json",
                     record_event=lambda e: None)
    try:
        with pytest.raises(Exception, match="malformed.*llmwatts clocks get.*nvidia-smi -q -d CLOCK"):
            m.recover()
    finally:
        m.close()


# ---------------------------------------------------------------------------------------------------
# The simulated clock model (docs/clocks.md)
# ---------------------------------------------------------------------------------------------------


def test_a_locked_clock_slows_steps_and_cuts_power(fake_clock):
    g = SimulatedGPU(0, node="n", profile="h100-700w", clock_ns=fake_clock, sleep=lambda s: None)
    g.set_load(1)
    full = g.sample()
    assert (full.sm_clock_mhz, full.mem_clock_mhz, g.slowdown()) == (1980, 2619, 1.0)
    assert clock_event_names(full.clock_event_reasons) == []
    g.set_locked_clocks(LockedClocks(1185, 1185))
    locked = g.sample()
    assert locked.sm_clock_mhz == 1185 and clock_event_names(locked.clock_event_reasons) == ["applications_clocks"]
    assert locked.power_mw < 0.6 * full.power_mw
    assert g.slowdown() == pytest.approx(0.3 / (1185 / 1980) + 0.7)
    # A cap below what the lock draws still binds: the cap overrides the lock, as on a real GPU.
    g.set_load(64)
    g.set_power_limit_mw(200_000)
    capped = g.sample()
    assert capped.sm_clock_mhz < 1185 and clock_event_names(capped.clock_event_reasons) == ["sw_power_cap"]
    g.set_load(0)
    assert clock_event_names(g.sample().clock_event_reasons) == ["idle"]


def test_predicted_clock_table_saves_energy_at_a_time_cost():
    rows = predicted_clock_table("h100-700w", n_sequences=1)
    assert rows[0]["lock_mhz"] == 1980 and rows[0]["energy_change_pct"] == 0
    assert all(b["time_change_pct"] > a["time_change_pct"] for a, b in zip(rows, rows[1:]))
    assert -36 < min(r["energy_change_pct"] for r in rows) < -28  # Ma et al. 2026: up to 32% of decode energy


# ---------------------------------------------------------------------------------------------------
# The RPCs on a real server
# ---------------------------------------------------------------------------------------------------


def test_rpcs_need_the_token_refuse_unsupported_clocks_and_record_who_and_why(tmp_path, monkeypatch):
    from tests.conftest import start_server

    server, port = start_server(tmp_path, control_token="clock-test-token", sim_gpus=2)
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            control = pb_grpc.ControlStub(channel)
            got = control.GetClocks(pb.GetClocksRequest(), timeout=10)  # reading needs no token
            assert [g.sm_max_mhz for g in got.gpus] == [1410, 1410] and got.backend == "simulated"
            request = pb.SetLockedClocksRequest(sm_min_mhz=1005, sm_max_mhz=1005, lease_s=60, reason="study s1")
            for method in (control.SetLockedClocks, control.ResetClocks):
                with pytest.raises(grpc.RpcError) as err:
                    method(request if method is control.SetLockedClocks else pb.ResetClocksRequest(), timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            token = [("authorization", "Bearer clock-test-token")]
            with pytest.raises(grpc.RpcError) as err:
                control.SetLockedClocks(pb.SetLockedClocksRequest(sm_min_mhz=1000, sm_max_mhz=1000), timeout=10,
                                        metadata=token)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert LADDER in err.value.details()
            locked = control.SetLockedClocks(request, timeout=10, metadata=token)
            assert [(g.locked_sm_min_mhz, g.sm_mhz) for g in locked.gpus] == [(1005, 1005), (1005, 1005)]
            control.ResetClocks(pb.ResetClocksRequest(selector=pb.GpuSelector(gpus=["0"]), reason="half"),
                                timeout=10, metadata=token)
    finally:
        server.stop(5)
    with sqlite3.connect(tmp_path / "server.db") as conn:
        rows = conn.execute("select kind, gpu_uuid, new_sm_max_mhz, who, reason from clock_events order by id").fetchall()
    kinds = [(r[0], r[1][-1], r[2], r[4]) for r in rows]
    assert kinds == [("set", "0", 1005, "study s1"), ("set", "1", 1005, "study s1"), ("reset", "0", None, "half"),
                     ("restore", "1", None, "server stopping")]
    assert all("token=" in r[3] for r in rows[:3])


def test_a_db_of_an_older_server_gains_the_new_telemetry_columns(tmp_path):
    """Guards against a server failing every telemetry write on a DB made before the clock columns."""
    from llmwatts.server.store import open_db

    with sqlite3.connect(tmp_path / "old.db") as conn:
        conn.execute("create table telemetry (server_id TEXT NOT NULL, ts_ns INTEGER NOT NULL, gpu_uuid TEXT NOT NULL, "
                     "sm_clock_mhz INTEGER) STRICT")
    db = open_db(tmp_path / "old.db")
    db["telemetry"].insert({"server_id": "s", "ts_ns": 1, "gpu_uuid": "g", "mem_clock_mhz": 1215, "clock_event_reasons": 4})
    assert db.execute("select mem_clock_mhz, clock_event_reasons from telemetry").fetchall() == [(1215, 4)]
