"""``GenerateStream``'s chunks: a request's batcher events turned into ``GenerateChunk`` messages.

The servicer (``service.py``) validates and submits the request; this module owns what goes on the wire
while it runs. Two costs made a streamed request slower than a unary one (issue 20: 64 streamed users ran
about half the tokens/s of 64 unary ones on an H100), both paid on the interpreter lock the decode loop
needs too:

- **One chunk per decode step per request**: a thread woken, a message built, serialised and sent, ~5,000
  times a second at 64 rows. Steps that come faster than ``interval_s`` are coalesced: the servicer thread
  sleeps out the interval (the batcher's puts wake nobody meanwhile) and sends every step since its last
  chunk in one. The chunk with a request's first tokens, and the one that completes every sequence, go
  out at once, so time to first token and the end of the stream are not delayed. Each token keeps the
  server time of its own step (``TokenDelta.token_server_ns``): per-token timing stays exact to the step.
- **Decoding the whole sequence at every step** (quadratic in its length): ``IncrementalText`` decodes a
  short trailing window instead and gives exactly the text a full decode gives (tests/server/
  test_streaming.py checks that property on random token sequences, byte-fallback and specials included).
"""

import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from llmwatts.server.work import Done, Failed, Result, Step, Work
from llmwatts.v1 import llmwatts_pb2 as pb

DEFAULT_INTERVAL_MS = 50.0  # --stream-interval-ms: ~20 chunks a second a request at most (0: one a step)
POLL_S = 1.0  # how often a waiting stream checks that its client is still there


class IncrementalText:
    """The text of a growing token sequence, decoded a short window at a time.

    Exactly ``tokenizer.decode(all_tokens, skip_special_tokens=True)`` once ``finish`` has been called,
    summed over the pieces ``push`` and ``finish`` return. Why a window is enough (LLaMA's decoder:
    "▁" → space, byte-fallback, fuse, strip one leading space): the text splits exactly before an *anchor*, a
    token that is neither special nor a byte token (a run of byte tokens fuses into characters, and special
    tokens vanish, so byte runs may join across them). So text is released only up to the last anchor, and
    each window starts at the anchor before it: the window's leading-space strip then falls inside text
    already sent, in both decodes whose difference is the new piece. For other decoders (byte-level BPE) a
    piece that ends in U+FFFD (a character cut in half) is held back until the next token completes it.
    """

    def __init__(self, tokenizer, held_ids: frozenset[int]):
        self.tokenizer = tokenizer
        self.held_ids = held_ids  # byte-fallback and special ids: text is never cut after one
        self.tokens: list[int] = []
        self.start = 0  # window start: an anchor (or 0)
        self.sent = 0   # tokens whose text has been released
        self.sent_text = ""  # the window's text up to ``sent`` (to subtract from the next decode)

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the new text that is certain now (possibly "")."""
        self.tokens.extend(ids)
        end = len(self.tokens)
        while end > self.sent and self.tokens[end - 1] in self.held_ids:
            end -= 1
        return self._release(end, final=False)

    def finish(self) -> str:
        """The rest of the text (the held-back tail)."""
        return self._release(len(self.tokens), final=True)

    def _release(self, end: int, final: bool) -> str:
        if end <= self.sent:
            return ""
        text = self.tokenizer.decode(self.tokens[self.start:end], skip_special_tokens=True)
        if not text.startswith(self.sent_text) or (not final and text.endswith("\ufffd")):
            return ""  # (not for LLaMA's decoder; a decoder that rewrites earlier text waits for more)
        piece = text[len(self.sent_text):]
        self.sent = end
        if self.tokens[end - 1] in self.held_ids:  # (only when final)
            self.sent_text = text
        else:  # the next window starts at this anchor
            self.start = end - 1
            self.sent_text = self.tokenizer.decode(self.tokens[end - 1:end], skip_special_tokens=True)
        return piece


def held_token_ids(tokenizer) -> frozenset[int]:
    """Ids after which text is not cut: special tokens and byte-fallback tokens (``<0xNN>``)."""
    held = set(tokenizer.all_special_ids)
    for token, i in tokenizer.get_vocab().items():
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            held.add(i)
    return frozenset(held)


@dataclass
class _Pending:
    """Steps received but not yet sent, per sequence of the request."""

    first_step: int = -1
    last_step: int = -1
    ids: list = field(default_factory=list)   # per sequence: token ids
    ns: list = field(default_factory=list)    # per sequence: each token's server time


class ChunkStream:
    """Turns a streamed request's events into chunks. One per servicer; ``chunks`` runs per call."""

    def __init__(self, tokenizer, eos_token_id: int | None, interval_ms: float,
                 response: Callable[[pb.GenerateRequest, Result], pb.GenerateResponse],
                 failed: Callable[[Work, Failed], None]):
        """``response`` builds the final ``GenerateResponse``; ``failed`` handles a ``Failed`` event
        (records it and raises)."""
        self.tokenizer, self.eos_token_id = tokenizer, eos_token_id
        self.interval_s = interval_ms / 1000.0
        self.response, self.failed = response, failed
        self.held_ids = held_token_ids(tokenizer)

    def chunks(self, request: pb.GenerateRequest, work: Work, is_active: Callable[[], bool]) -> Iterator[pb.GenerateChunk]:
        n = len(work.prompts)
        texts = [IncrementalText(self.tokenizer, self.held_ids) for _ in range(n)]
        counts = [0] * n
        last = [None] * n
        ended = [False] * n
        pending = _Pending(ids=[[] for _ in range(n)], ns=[[] for _ in range(n)])
        sent_ns = None  # perf_counter_ns of the last chunk sent
        steps_sent = 0  # steps sent so far
        interval_ns = int(self.interval_s * 1e9)
        while True:
            if pending.last_step >= 0:  # coalescing: sleep out the interval, nobody is woken meanwhile
                left_ns = sent_ns + interval_ns - time.perf_counter_ns()
                if left_ns > 0:
                    time.sleep(left_ns / 1e9)
                events = _drain(work.events)
            else:
                events = _wait(work.events, is_active)
                if events is None:
                    return  # the client left
            for event in events:
                if isinstance(event, Step):
                    step, deltas, server_ns = event.step, event.deltas, event.server_ns
                    if pending.first_step < 0:
                        pending.first_step = step
                    pending.last_step = step
                    for i, d in enumerate(deltas):
                        if d:
                            pending.ids[i].extend(d)
                            pending.ns[i].extend([server_ns] * len(d))
                            counts[i] += len(d)
                            last[i] = d[-1]
                        elif counts[i]:  # a step without it: the sequence has ended
                            ended[i] = True
                elif isinstance(event, Done):
                    result: Result = event.result
                    if pending.last_step >= 0 or any(t.sent < len(t.tokens) for t in texts):
                        yield self._chunk(request, pending, texts, final=True, steps_sent=steps_sent)
                    final = self.response(request, result)
                    yield pb.GenerateChunk(request_id=request.request_id, batch_id=final.batch_id, step=result.steps,
                                           first_step=result.steps, server_ns=time.time_ns(), done=True, final=final)
                    return
                else:
                    self.failed(work, event)
            if pending.last_step < 0:
                continue
            complete = all(e or c >= work.max_new_tokens or (not work.ignore_eos and t == self.eos_token_id)
                           for e, c, t in zip(ended, counts, last))
            if sent_ns is None or complete or time.perf_counter_ns() - sent_ns >= interval_ns:
                yield self._chunk(request, pending, texts, final=False, steps_sent=steps_sent)
                steps_sent, sent_ns = pending.last_step + 1, time.perf_counter_ns()
                pending = _Pending(ids=[[] for _ in range(n)], ns=[[] for _ in range(n)])

    def _chunk(self, request, pending: _Pending, texts: list[IncrementalText], final: bool,
               steps_sent: int) -> pb.GenerateChunk:
        deltas = []
        for i, (ids, ns, text) in enumerate(zip(pending.ids, pending.ns, texts)):
            piece = text.push(ids) if ids else ""
            if final:
                piece += text.finish()
            deltas.append(pb.TokenDelta(index=i, token_ids=ids, text=piece, token_server_ns=ns))
        # (a final flush of held-back text alone carries no step: it repeats the last one sent)
        step = pending.last_step if pending.last_step >= 0 else steps_sent - 1
        return pb.GenerateChunk(request_id=request.request_id, step=max(step, 0),
                                first_step=max(pending.first_step if pending.first_step >= 0 else step, 0),
                                deltas=deltas, server_ns=time.time_ns())


def _drain(events: queue.SimpleQueue) -> list:
    out = []
    while True:
        try:
            out.append(events.get_nowait())
        except queue.Empty:
            return out


def _wait(events: queue.SimpleQueue, is_active: Callable[[], bool]) -> list | None:
    """Block for the next event, then take every one already there; None once the client has gone."""
    while True:
        try:
            first = events.get(timeout=POLL_S)
        except queue.Empty:
            if not is_active():  # cancelled or past its deadline: free this thread
                return None
            continue
        return [first] + _drain(events)
