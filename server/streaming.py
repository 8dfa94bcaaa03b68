"""``GenerateStream``'s chunks: a request's batcher events turned into ``GenerateChunk`` messages.

The servicer (``service.py``) validates and submits the request; this module owns what goes on the wire
while it runs: the per-step token deltas, their text, and the final chunk.
"""

import time
from collections.abc import Callable, Iterable, Iterator

from llmwatts.server.batcher import Result
from llmwatts.v1 import llmwatts_pb2 as pb


def stream_chunks(request: pb.GenerateRequest, events: Iterable[tuple], tokenizer,
                  response: Callable[[pb.GenerateRequest, Result], pb.GenerateResponse]) -> Iterator[pb.GenerateChunk]:
    """The chunks of one streamed request, from its batcher ``events`` (``("step", step, deltas)`` then
    ``("done", Result)``); ``response`` builds the final ``GenerateResponse``."""
    n = len(request.prompts)
    tokens: list[list[int]] = [[] for _ in range(n)]
    texts = [""] * n
    for event in events:
        if event[0] == "step":
            _, step, deltas = event
            out = []
            for i, d in enumerate(deltas):
                if not d:
                    out.append(pb.TokenDelta(index=i))
                    continue
                tokens[i].extend(d)
                # Decode the whole sequence and send the new suffix: byte-fallback and leading
                # spaces decode right only in context.
                text = tokenizer.decode(tokens[i], skip_special_tokens=True)
                out.append(pb.TokenDelta(index=i, token_ids=d, text=text[len(texts[i]):]))
                texts[i] = text
            yield pb.GenerateChunk(request_id=request.request_id, step=step, deltas=out,
                                   server_ns=time.time_ns())
        else:
            final = response(request, event[1])
            yield pb.GenerateChunk(request_id=request.request_id, batch_id=final.batch_id,
                                   step=event[1].steps, server_ns=time.time_ns(), done=True, final=final)
