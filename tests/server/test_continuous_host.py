"""The continuous server's host-side bookkeeping between decode steps (issue 20: it runs beside the decode
loop, so it is kept O(1) or O(changed) a step): the session's free-row count and ended keys, and the
segment's rows, checked against what they summarise."""

import queue

import pytest

from llmwatts.server.engine import BatchOutput, BatchSpec, FastEngine, Sampling
from llmwatts.server.models import load_model
from llmwatts.server.segment import Joined, Segment
from llmwatts.server.telemetry import EnergyReading
from llmwatts.server.work import Work
from tests.server.test_continuous import GREEDY, mixed_requests, prompts


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", "cpu", "float32")


def test_the_sessions_free_rows_and_ended_keys_follow_its_rows_at_every_step(tiny):
    """Guards the counters that replaced per-step scans (``free_rows`` was a sum over every row, ``done`` an
    all() per request per step): after every join and step they equal the scans, with rows freed at their
    length limits (one sequence of a request before its others) and by a cancelled request
    (``BatchSpec.stopped``)."""
    fast = FastEngine(tiny.model, tiny.tokenizer.pad_token_id, None, tiny.device, context_length=tiny.context_length)
    session = fast.session(4, 64, GREEDY, ignore_eos=True)
    requests = mixed_requests()
    stop_at = {"d": 3}  # d's call ends at its third step: its row frees then
    for key, spec in requests.items():
        spec.stopped = (lambda step, live, key=key: live if step >= stop_at.get(key, 10**9) else ())
    waiting, popped = list(requests), {}

    def check():
        assert session.free_rows == sum(o is None for o in session.owner)
        assert session.live_rows == session.rows - session.free_rows
        assert session.finished == {k for k in session.trackers if session.trackers[k].all_done}
        for tracker in session.trackers.values():
            assert tracker.n_finished == sum(f is not None for f in tracker.finish)

    while waiting or session.busy:
        joins = {}
        while waiting and session.can_admit([*joins.values(), requests[waiting[0]]]):
            key = waiting.pop(0)
            joins[key] = requests[key]
        if joins:
            session.admit(joins)
            check()
        session.step()
        check()
        for key in list(session.finished):
            popped[key] = session.pop(key)
            check()
    assert set(popped) == set(requests) and session.free_rows == 4 and not session.finished
    assert popped["d"].finish_reasons == ["cancelled"]


def test_a_session_shares_any_seed_but_no_other_sampling_setting(tiny):
    """Guards the sampling check that replaced ``dataclasses.replace(seed=None)`` in ``fits``."""
    fast = FastEngine(tiny.model, tiny.tokenizer.pad_token_id, None, tiny.device, context_length=tiny.context_length)
    base = Sampling(temperature=0.7, top_p=0.9, seed=1)
    session = fast.session(2, 64, base, ignore_eos=True)
    for sampling, fits in ((Sampling(temperature=0.7, top_p=0.9, seed=2), True), (Sampling(temperature=0.7, top_p=0.9), True),
                           (Sampling(temperature=0.8, top_p=0.9, seed=1), False),
                           (Sampling(temperature=0.7, top_p=0.8, seed=1), False), (GREEDY, False)):
        assert session.fits(BatchSpec(prompts([4]), [4], sampling, ignore_eos=True)) is fits, sampling


def work(rid: str) -> Work:
    return Work(rid, "run", [[5, 6, 7]], 4, GREEDY, True, 0, events=queue.SimpleQueue(), stream=False)


def test_a_segment_write_carries_its_running_requests_and_those_that_just_ended_once():
    """Guards the segment's ``running`` index (each write walked every request that ever joined a busy
    segment: thousands in a long closed loop): a write carries the ended requests given and every request
    still running, and an answered request never again."""
    start = EnergyReading(ts_ns=10, perf_s=0.0, samples={})
    segment = Segment("s", start, start)
    joined = {rid: Joined(work(rid), BatchSpec([[5, 6, 7]], [4], GREEDY, ignore_eos=True), 20) for rid in "abc"}
    for rid, j in joined.items():
        segment.join(rid, j)
    assert (segment.sequences, segment.prompt_tokens) == (3, 9)
    _, _, rows = segment.rows([], [], simulated=True)
    assert sorted((r.request_id, r.status) for r in rows) == [("a", "running"), ("b", "running"), ("c", "running")]
    joined["a"].output = BatchOutput([[1, 2, 3, 4]], ["length"], 30, [40], [4])
    joined["b"].output = BatchOutput([[1, 2]], ["length"], 30, [35], [2])  # ended, not yet handed to a write
    _, _, rows = segment.rows([joined["a"]], [], simulated=True)
    assert sorted((r.request_id, r.status) for r in rows) == [("a", "ok"), ("c", "running")]
    _, _, rows = segment.rows([joined["b"]], [], simulated=True)
    assert sorted((r.request_id, r.status) for r in rows) == [("b", "ok"), ("c", "running")]
    assert set(segment.running) == {"c"} and set(segment.works) == {"a", "b", "c"}
    batch, _, _ = segment.rows([], [], simulated=True)
    assert batch.n_requests == 3
