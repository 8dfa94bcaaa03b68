"""GenerateStream's text and chunks (server/streaming.py): exact text from a short decode window, and
coalesced chunks that keep every token's step and server time."""

import queue
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmwatts.server.work import Done, Failed, Result, Step, Work
from llmwatts.server.engine import Sampling
from llmwatts.server.streaming import ChunkStream, IncrementalText, held_token_ids
from llmwatts.server.tokenizer import llama_like_tokenizer
from llmwatts.v1 import llmwatts_pb2 as pb

TOKENIZER = None


def tokenizer():
    global TOKENIZER
    if TOKENIZER is None:
        TOKENIZER = llama_like_tokenizer()
    return TOKENIZER


def pieces(ids: list[int], cuts: list[int]) -> str:
    tok = tokenizer()
    text = IncrementalText(tok, held_token_ids(tok))
    out, at = [], 0
    for n in cuts:
        out.append(text.push(ids[at:at + n]))
        at += n
    out.append(text.push(ids[at:]))
    out.append(text.finish())
    return "".join(out)


# Token ids as a random-weight model emits them: specials (0-2), byte-fallback tokens (3-258, LLaMA's
# layout), "▁"-led and plain learned tokens; weighted so byte runs and specials between them are common.
ANY_ID = st.one_of(st.integers(0, 2), st.integers(3, 258), st.integers(3, 258), st.integers(259, 31999),
                   st.sampled_from([0x20 + 3, 0xE2 + 3, 0x82 + 3, 0xAC + 3, 0xF0 + 3, 0x9F + 3]))
SLOW = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SLOW
@given(ids=st.lists(ANY_ID, max_size=40), cuts=st.lists(st.integers(0, 5), max_size=20))
def test_incremental_text_is_exactly_the_full_decode_for_any_tokens(ids, cuts):
    """Guards against streamed text that differs from the completion's (byte-fallback runs cut in two,
    a leading space lost when a window starts after special tokens)."""
    assert pieces(ids, cuts) == tokenizer().decode(ids, skip_special_tokens=True)


@SLOW
@given(text=st.text(max_size=60), cuts=st.lists(st.integers(0, 4), max_size=20))
def test_incremental_text_is_exactly_the_full_decode_for_real_text(text, cuts):
    """Text that tokenizes through byte fallback (emoji, accents) and spaces, streamed in pieces."""
    ids = tokenizer()(text)["input_ids"]
    assert pieces(ids, cuts) == tokenizer().decode(ids, skip_special_tokens=True)


def test_incremental_text_decodes_a_short_window_not_the_whole_sequence():
    """Guards against the old per-step full decode (quadratic in the sequence's length)."""
    tok = tokenizer()
    lengths = []

    class Counting:
        all_special_ids = tok.all_special_ids

        def decode(self, ids, **kw):
            lengths.append(len(ids))
            return tok.decode(ids, **kw)

    text = IncrementalText(Counting(), held_token_ids(tok))
    ids = tok("the quick brown fox jumps over the lazy dog " * 20)["input_ids"]
    out = "".join(text.push([i]) for i in ids) + text.finish()
    assert out == tok.decode(ids, skip_special_tokens=True)
    assert max(lengths) <= 3


def work(n_rows: int, max_new: int) -> Work:
    return Work("r1", "run", [[1, 5]] * n_rows, max_new, Sampling(greedy=True), True, time.time_ns())


def result(tokens: list[list[int]]) -> Result:
    now = time.time_ns()
    return Result("b", now, len(tokens[0]), tokens, ["length"] * len(tokens), [2] * len(tokens), now, now, now,
                  1.0, True)


def stream(interval_ms: float) -> ChunkStream:
    def response(request, r):
        return pb.GenerateResponse(request_id=request.request_id, batch_id=r.batch_id)

    def failed(work, event):
        raise event.error

    return ChunkStream(tokenizer(), 2, interval_ms, response, failed)


def test_steps_pending_together_go_out_as_one_chunk_with_each_tokens_step_and_time():
    """Guards against a chunk per decode step per request (what held 64 streamed users to half of unary's
    tokens/s): steps already waiting are sent together, each token with its own server time."""
    w = work(2, max_new=5)
    ids = tokenizer()("one two three four five")["input_ids"][1:6]
    w.events.put(Step(0, [[ids[0]], [ids[0]]], 1000))
    chunks = stream(10_000).chunks(pb.GenerateRequest(request_id="r1", prompts=["a", "b"]), w, lambda: True)
    first = next(chunks)
    assert (first.first_step, first.step) == (0, 0) and first.deltas[0].token_server_ns == [1000]
    for k in range(1, 5):  # four more steps arrive while the stream is busy elsewhere
        w.events.put(Step(k, [[ids[k]], [ids[k]] if k < 3 else []], 1000 + k))
    t0 = time.perf_counter()
    second = next(chunks)  # every row complete: sent at once, not after the 10 s interval
    assert time.perf_counter() - t0 < 5
    assert (second.first_step, second.step) == (1, 4)
    assert list(second.deltas[0].token_ids) == ids[1:] and list(second.deltas[0].token_server_ns) == [1001, 1002, 1003, 1004]
    assert list(second.deltas[1].token_server_ns) == [1001, 1002]
    w.events.put(Done(result([ids, ids[:3]])))
    final = next(chunks)
    assert final.done and final.final.batch_id == "b"
    assert first.deltas[0].text + second.deltas[0].text == tokenizer().decode(ids, skip_special_tokens=True)
    with pytest.raises(StopIteration):
        next(chunks)


def test_interval_zero_sends_a_chunk_a_step():
    w = work(1, max_new=3)
    for k in range(3):
        w.events.put(Step(k, [[300 + k]], 10 + k))
    w.events.put(Done(result([[300, 301, 302]])))
    # (the first wait takes all four events at once; with no interval the steps still coalesce, as pending)
    chunks = list(stream(0).chunks(pb.GenerateRequest(request_id="r1", prompts=["a"]), w, lambda: True))
    assert chunks[-1].done
    assert [t for c in chunks[:-1] for t in c.deltas[0].token_server_ns] == [10, 11, 12]


def test_a_stream_whose_client_left_ends_without_a_chunk(monkeypatch):
    monkeypatch.setattr("llmwatts.server.streaming.POLL_S", 0.01)
    w = work(1, max_new=3)
    assert list(stream(50).chunks(pb.GenerateRequest(request_id="r1", prompts=["a"]), w, lambda: False)) == []


def test_an_engine_error_reaches_the_failure_handler():
    w = work(1, max_new=3)
    w.events.put(Failed(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        list(stream(50).chunks(pb.GenerateRequest(request_id="r1", prompts=["a"]), w, lambda: True))
