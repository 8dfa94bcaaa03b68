"""PowerCapManager on real simulated GPUs: validation, leases, rollback, persistence, recovery."""

import json
import math
import threading
import time

import pytest

from llmwatts.errors import InvalidArgument, ReadOnlyPowerError
from llmwatts.server.gpu import SimulatedGPU
from llmwatts.server.power import PowerCapManager, caps_reply


class FailingGPU(SimulatedGPU):
    """A simulated GPU whose setter fails, as a GPU of another rank that died mid-call would."""

    def set_power_limit_mw(self, limit_mw):
        if limit_mw != self.power_limit_mw():
            raise RuntimeError("rank 1 went away")
        super().set_power_limit_mw(limit_mw)


@pytest.fixture
def make_manager(manager_of):
    return manager_of(PowerCapManager, "caps.json")


def caps_w(manager):
    return [s.cap_w for s in manager.get([])]


def test_get_reports_constraints_and_reply(make_manager):
    m = make_manager()
    statuses = m.get([])
    assert [(s.uuid, s.cap_w, s.default_w, s.min_w, s.max_w, s.enforced_w, s.lease_end_ns, s.simulated) for s in statuses] == [
        ("SIM-n-0", 250.0, 250.0, 100.0, 250.0, 250.0, 0, True),
        ("SIM-n-1", 250.0, 250.0, 100.0, 250.0, 250.0, 0, True),
    ]
    reply = caps_reply(statuses, "simulated")
    assert reply.backend == "simulated" and [g.uuid for g in reply.gpus] == ["SIM-n-0", "SIM-n-1"]
    assert reply.gpus[1].index == 1 and reply.gpus[1].max_w == 250.0


def test_selectors(make_manager):
    m = make_manager()
    assert [s.uuid for s in m.get(["1"])] == ["SIM-n-1"]
    assert [s.uuid for s in m.get(["0:1"])] == ["SIM-n-1"]
    assert [s.uuid for s in m.get(["SIM-n-0", "0"])] == ["SIM-n-0"]
    with pytest.raises(InvalidArgument, match=r"no GPU '7'.*0:0 \(SIM-n-0\).*0:1 \(SIM-n-1\)"):
        m.get(["7"])
    with pytest.raises(InvalidArgument, match="no GPU '1:0'"):
        m.get(["1:0"])


def test_bare_index_ambiguous_across_ranks(make_manager):
    m = make_manager([SimulatedGPU(0, node="a", rank=0), SimulatedGPU(0, node="b", rank=1)])
    with pytest.raises(InvalidArgument, match="ambiguous"):
        m.get(["0"])
    assert [s.rank for s in m.get(["1:0"])] == [1]


def test_set_changes_caps_records_events_and_persists(make_manager, events, tmp_path):
    m = make_manager()
    before_ns = time.time_ns()
    statuses = m.set(["1"], 175, 60, who="alice", reason="sweep")
    assert [s.cap_w for s in statuses] == [175.0]
    assert caps_w(m) == [250.0, 175.0]
    assert statuses[0].lease_end_ns >= before_ns + 59 * 10**9
    assert [{k: e[k] for k in ("gpu_uuid", "kind", "old_cap_w", "new_cap_w", "who", "reason", "node", "rank")} for e in events] == [
        {"gpu_uuid": "SIM-n-1", "kind": "set", "old_cap_w": 250.0, "new_cap_w": 175.0, "who": "alice",
         "reason": "sweep", "node": "n", "rank": 0},
    ]
    assert events[0]["ts_ns"] >= before_ns
    state = json.loads((tmp_path / "caps.json").read_text())
    assert state["gpus"]["SIM-n-1"]["original_mw"] == 250_000
    # reset restores the original, records it, clears the state file
    m.reset([], who="alice", reason="done")
    assert caps_w(m) == [250.0, 250.0]
    assert [(e["kind"], e["gpu_uuid"], e["new_cap_w"]) for e in events[1:]] == [("reset", "SIM-n-1", 250.0)]
    assert not (tmp_path / "caps.json").exists()


def test_setting_again_keeps_the_original_and_renews_the_lease(make_manager, events):
    m = make_manager()
    first = m.set(["0"], 200, 30, "a", "")[0]
    second = m.set(["0"], 150, 60, "a", "")[0]
    assert second.lease_end_ns > first.lease_end_ns and second.cap_w == 150.0
    m.reset(["0"], "a", "")
    assert caps_w(m)[0] == 250.0  # the original, not the 200 W in between


@pytest.mark.parametrize("cap_w", [math.nan, math.inf, -math.inf, -5, 0, 99.9, 250.5, 1e9])
def test_invalid_caps_refused_and_nothing_changes(make_manager, events, tmp_path, cap_w):
    m = make_manager()
    with pytest.raises(InvalidArgument, match=r"\[100, 250\] W"):
        m.set([], cap_w, 60, "a", "")
    assert caps_w(m) == [250.0, 250.0] and events == [] and not (tmp_path / "caps.json").exists()


@pytest.mark.parametrize("lease_s", [-1, math.nan, math.inf, 86401])
def test_invalid_leases_refused(make_manager, events, lease_s):
    m = make_manager()
    with pytest.raises(InvalidArgument, match="lease_s"):
        m.set([], 175, lease_s, "a", "")
    assert caps_w(m) == [250.0, 250.0] and events == []


def test_zero_lease_means_default(make_manager):
    m = make_manager(default_lease_s=123.0)
    now_ns = time.time_ns()
    (status,) = m.set(["0"], 175, 0, "a", "")
    assert abs(status.lease_end_ns - now_ns - 123 * 10**9) < 5 * 10**9


def test_lease_expiry_restores(make_manager, events, tmp_path):
    m = make_manager()
    m.set([], 150, 0.2, "a", "short")
    assert caps_w(m) == [150.0, 150.0]
    deadline = time.monotonic() + 5
    while caps_w(m) != [250.0, 250.0] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert caps_w(m) == [250.0, 250.0]
    assert [e["kind"] for e in events if e["kind"] != "set"] == ["lease-expiry", "lease-expiry"]
    assert all(s.lease_end_ns == 0 for s in m.get([]))
    assert not (tmp_path / "caps.json").exists()


def test_partial_failure_rolls_back(make_manager, events, tmp_path):
    gpus = [SimulatedGPU(0, node="n"), SimulatedGPU(1, node="n"), FailingGPU(2, node="n")]
    m = make_manager(gpus)
    m.set(["1"], 200, 60, "a", "earlier")  # an existing lease must survive the rollback
    events.clear()
    with pytest.raises(RuntimeError, match="went away"):
        m.set([], 175, 60, "a", "")
    assert caps_w(m) == [250.0, 200.0, 250.0]
    assert events == []
    state = json.loads((tmp_path / "caps.json").read_text())
    assert list(state["gpus"]) == ["SIM-n-1"] and state["gpus"]["SIM-n-1"]["original_mw"] == 250_000


def test_readonly_backend_refuses(make_manager, events):
    m = make_manager(backend="nvml-readonly")
    with pytest.raises(ReadOnlyPowerError, match="read-only"):
        m.set([], 175, 60, "a", "")
    assert caps_w(m) == [250.0, 250.0] and events == []


def test_restore_all_is_idempotent_and_thread_safe(make_manager, events, tmp_path):
    m = make_manager()
    m.set([], 175, 60, "a", "")
    threads = [threading.Thread(target=m.restore_all) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m.restore_all()
    assert caps_w(m) == [250.0, 250.0]
    assert sorted(e["kind"] for e in events) == ["restore", "restore", "set", "set"]
    assert not (tmp_path / "caps.json").exists()


def test_recover_restores_what_a_killed_manager_left(tmp_path, events):
    gpus = [SimulatedGPU(i, node="n") for i in range(2)]
    killed = PowerCapManager(gpus, "simulated", state_path=tmp_path / "caps.json", record_event=lambda e: None)
    killed.set(["1"], 150, 600, "a", "")
    killed._closed = True  # SIGKILL: no restore runs; stop only its lease thread
    killed._kick()
    assert gpus[1].power_limit_mw() == 150_000 and (tmp_path / "caps.json").exists()

    # A foreign entry (another node's GPU) must survive for its owner.
    state = json.loads((tmp_path / "caps.json").read_text())
    state["gpus"]["GPU-elsewhere"] = {"original_mw": 300_000, "lease_end_ns": 0, "node": "m", "rank": 1, "index": 0, "pid": 1}
    (tmp_path / "caps.json").write_text(json.dumps(state))

    fresh = PowerCapManager(gpus, "simulated", state_path=tmp_path / "caps.json", record_event=events.append)
    try:
        restored = fresh.recover()
        assert [s.uuid for s in restored] == ["SIM-n-1"]
        assert gpus[1].power_limit_mw() == 250_000
        assert [(e["kind"], e["gpu_uuid"], e["old_cap_w"], e["new_cap_w"]) for e in events] == [
            ("startup-restore", "SIM-n-1", 150.0, 250.0)]
        assert list(json.loads((tmp_path / "caps.json").read_text())["gpus"]) == ["GPU-elsewhere"]
    finally:
        fresh.close()


def test_recover_without_state_file_does_nothing(make_manager, events):
    assert make_manager().recover() == [] and events == []


def test_record_event_failure_does_not_block_restore(tmp_path):
    def broken(event):
        raise OSError("disk full")

    gpus = [SimulatedGPU(0, node="n")]
    m = PowerCapManager(gpus, "simulated", state_path=tmp_path / "caps.json", record_event=broken)
    m.set([], 175, 60, "a", "")
    m.close()
    assert gpus[0].power_limit_mw() == 250_000


def test_set_after_close_is_refused(make_manager):
    # Guards against a cap set while the server stops: no lease thread would ever restore it.
    from llmwatts.errors import FailedPrecondition

    m = make_manager()
    m.close()
    with pytest.raises(FailedPrecondition, match="stopping"):
        m.set([], 175, 60, "a", "")
    assert caps_w(m) == [250.0, 250.0]
