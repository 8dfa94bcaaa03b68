"""Prefill: prompts through the model into the KV cache, the first token sampled after each.

A static batch's prefill fills every row of its workspace, left-padded, in row chunks. A continuous
batch's join fills only the free rows it takes; a join of a few short prompts runs from static buffers,
right-padded, replayed as a captured graph on CUDA (``join_prefill``), a larger one the eager prefill.
These functions drive a ``FastEngine`` (its ``forward``, ``additive`` and ``graph``).
"""

import logging
import time
from dataclasses import dataclass

import torch

from llmwatts.server.engine.batch import left_pad
from llmwatts.server.engine.cache import ScatterCaches, Workspace, pow2
from llmwatts.server.engine.sampling import sample

log = logging.getLogger(__name__)

# Prefill runs over the batch's rows in chunks of at most this many prompt tokens (at least one row), so
# its activations (~150 KB a token for llama-7b: ~2.5 GB) do not grow with the batch: the caches, not
# prefill, decide the largest batch that fits (llama-7b on an 80 GB H100: 320 rows of 128 + 256 tokens,
# whose one-shot prefill ran out of memory).
PREFILL_TOKENS = 16384
# A continuous batch's join of a few prompts runs from static buffers: its rows padded to a power of two
# (filler rows repeat the last prompt into its row) and its prompts right-padded to a power of two of at
# least JOIN_MIN_WIDTH tokens, at most JOIN_GRAPH_TOKENS padded tokens in all. On CUDA each such shape is
# captured once, as a session opens (15 shapes at most), and replayed: an uncaptured prefill launches ~40
# kernels a layer, and for a few short prompts that launching, not the GPU, sets a join's time (llama-7b
# on an H200: 19-31 ms a join of ~1.7 prompts, 11 ms graphed; docs/performance.md). A larger join keeps
# the GPU busy while its kernels are launched, and padding would only add work: it runs the eager prefill.
# Right padding keeps a row's slots its own: it decodes from its prompt's length on, so the padding costs
# prefill work, never cache slots or a wider attention window for the rows beside it. 0 turns it off.
JOIN_MIN_WIDTH = 32
JOIN_GRAPH_TOKENS = 512


@dataclass
class JoinBuffers:
    """Static inputs and outputs of a graphed join prefill: ``rows`` prompts right-padded to ``width``."""

    ids: torch.Tensor       # [rows, width] long
    lengths: torch.Tensor   # [rows] long: each prompt's real tokens
    index: torch.Tensor     # [rows] long: the workspace row each prompt fills
    scratch: tuple          # one layer's (k, v), each [rows, Hkv, width, D] (``ScatterCaches``)
    first: torch.Tensor     # [rows] long: the first sampled token per prompt


def prefill(engine, ws: Workspace, prompts: list[list[int]], greedy: bool,
            rows: list[int] | None = None, keys: list[int] | None = None) -> torch.Tensor:
    """Run the left-padded prompts through the model, fill cache slots [0, S), set up the decode
    state; returns the first sampled token per row [B]. Rows run in chunks of ``prefill_tokens``
    (every row's result is its own: the chunks only bound the activations' memory).

    A static batch (``rows`` None) fills every row of the workspace, filler rows past the prompts.
    A continuous batch's join fills only ``rows`` (one per prompt, in any order: rows that are not
    adjacent go through ``ScatterCaches``) and sets their own slots (``row_slot``) and live flags; the
    other rows keep what they hold. ``keys``: the prompts' sampling-noise keys, into their rows first."""
    static = rows is None
    width = max(len(p) for p in prompts)
    b = ws.batch if static else len(prompts)
    rows = list(range(b)) if static else list(rows)
    ids, ones = left_pad(list(prompts) + [[engine.pad_id]] * (b - len(prompts)), engine.pad_id, engine.device)
    lengths = ones.sum(-1)                                     # ids: [B, S], filler rows one pad token
    col = torch.arange(width, device=engine.device)
    real = col[None, :] >= (width - lengths)[:, None]                      # [B, S]
    # Positions as generate derives them from the mask: cumsum - 1 on real tokens, 1 on padding.
    positions = (real.long().cumsum(-1) - 1).masked_fill(~real, 1)
    slots = torch.arange(ws.cache_len, device=engine.device)
    index = torch.tensor(rows, dtype=torch.long, device=engine.device)
    set_keys(ws, index[:len(prompts)], keys)
    ws.key_valid.index_copy_(0, index, slots[None, :] >= (width - lengths)[:, None])
    # Causal over real keys; a padding row also sees itself, so no softmax row is empty (NaN-free).
    causal = (col[None, :] <= col[:, None])[None, None]                          # [1, 1, S, S]
    own = torch.eye(width, dtype=torch.bool, device=engine.device)[None, None]
    logits = []
    step = engine.caches.prefill_rows(width)
    for r in range(0, b, step):
        chunk = slice(r, r + step)
        mask = engine.additive((real[chunk, None, None, :] & causal) | own)    # [rows, 1, S, S]
        mine = rows[chunk]
        if mine == list(range(mine[0], mine[-1] + 1)):  # adjacent rows: views, written in place
            caches = [(k[mine[0]:mine[-1] + 1], v[mine[0]:mine[-1] + 1]) for k, v in zip(ws.k, ws.v)]
        else:
            caches = ScatterCaches(ws, index[chunk], width)
        logits.append(engine.forward(caches, ids[chunk], positions[chunk], mask, col, width, compiled=False))
        if isinstance(caches, ScatterCaches):
            caches.flush()
    # The first token is sampled after each prompt's last position (``len - 1``), keyed by its row's key.
    first = sample(torch.cat(logits), greedy, ws.temperature, ws.top_p, ws.key[index], lengths - 1)
    ws.tok.index_copy_(0, index, first)
    ws.pos.index_copy_(0, index, lengths)
    if static:
        ws.slot.fill_(width)
    else:
        ws.row_slot.index_fill_(0, index, width)
        ws.live.index_fill_(0, index, 1)
    return first.cpu()


def join(engine, ws: Workspace, prompts: list[list[int]], greedy: bool, rows: list[int],
         keys: list[int] | None = None) -> tuple[list[int], list[int]]:
    """A continuous batch's join of ``prompts`` into the free ``rows`` of ``ws`` -> (the first token per
    prompt, the slot each row decodes from next). A graphed join (``join_shape``) is right-padded: each
    row decodes from its own prompt's length; a large one the eager prefill, left-padded to its widest."""
    width = max(len(p) for p in prompts)
    shape = join_shape(engine, ws, len(prompts), width)
    if shape is not None:
        set_keys(ws, torch.tensor(rows, dtype=torch.long, device=engine.device), keys)
        return join_prefill(engine, ws, prompts, greedy, rows, shape).tolist(), [len(p) for p in prompts]
    return prefill(engine, ws, prompts, greedy, rows=rows, keys=keys).tolist(), [width] * len(prompts)


def set_keys(ws: Workspace, index: torch.Tensor, keys: list[int] | None) -> None:
    """Rows ``index`` of ``ws`` sample with noise ``keys`` (None: leave them)."""
    if keys is not None:
        ws.key.index_copy_(0, index, torch.tensor(keys, dtype=torch.long).to(ws.key.device))


def join_shape(engine, ws: Workspace, rows: int, width: int) -> tuple[int, int] | None:
    """The static shape (rows, width) a join of ``rows`` prompts of at most ``width`` tokens runs in, or
    None: too large for a graphed join (``JOIN_GRAPH_TOKENS``), it runs the eager prefill."""
    shape = (pow2(rows), max(JOIN_MIN_WIDTH, pow2(width)))
    if shape[0] > ws.batch or shape[1] > ws.cache_len or shape[0] * shape[1] > engine.join_tokens:
        return None
    return shape


def join_shapes(engine, ws: Workspace) -> list[tuple[int, int]]:
    """Every shape ``join_shape`` can give on ``ws``."""
    shapes, rows = [], 1
    while rows <= ws.batch:
        width = JOIN_MIN_WIDTH
        while join_shape(engine, ws, rows, width) == (rows, width):
            shapes.append((rows, width))
            width *= 2
        rows *= 2
    return shapes


def capture_joins(engine, ws: Workspace, greedy: bool) -> None:
    """Capture the graphed join of every shape, into rows 0.. of ``ws`` (only while no row is live: the
    warm-up runs write those rows)."""
    todo = [shape for shape in join_shapes(engine, ws) if ("join", *shape, greedy) not in ws.graphs]
    t0 = time.perf_counter()
    for rows, width in todo:
        jb = join_buffers(engine, ws, rows, width)
        jb.ids.fill_(engine.pad_id)
        jb.lengths.fill_(1)
        jb.index.copy_(torch.arange(rows))
        join_graph(engine, ws, jb, greedy)
    if todo:
        log.info("captured %d join graphs (up to %d tokens) in %.1f s", len(todo), engine.join_tokens,
                 time.perf_counter() - t0)


def join_prefill(engine, ws: Workspace, prompts: list[list[int]], greedy: bool, rows: list[int],
                 shape: tuple[int, int]) -> torch.Tensor:
    """A continuous batch's join from static buffers of ``shape`` (``join_shape``), replayed as a
    captured graph on CUDA. -> the first sampled token per prompt [n]."""
    n = len(prompts)
    jb = join_buffers(engine, ws, *shape)
    fill = shape[0] - n  # filler rows repeat the last prompt into its row: the same values written twice
    padded = list(prompts) + [prompts[-1]] * fill
    ids = torch.full(shape, engine.pad_id, dtype=torch.long)
    for i, p in enumerate(padded):
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    jb.ids.copy_(ids)
    jb.lengths.copy_(torch.tensor([len(p) for p in padded], dtype=torch.long))
    jb.index.copy_(torch.tensor(list(rows) + [rows[-1]] * fill, dtype=torch.long))
    if engine.cuda_graphs:
        join_graph(engine, ws, jb, greedy).replay()
    else:
        join_body(engine, ws, jb, greedy)
    return jb.first[:n].cpu()


def join_graph(engine, ws: Workspace, jb: JoinBuffers, greedy: bool):
    return engine.graph(ws, ("join", *jb.ids.shape, greedy), lambda: join_body(engine, ws, jb, greedy))


def join_buffers(engine, ws: Workspace, rows: int, width: int) -> JoinBuffers:
    """Static buffers of joins of ``rows`` prompts of ``width``: views of one store per workspace, sized
    for ``join_tokens`` tokens (every shape's graph reads the same memory, each through its views)."""
    jb = ws.joins.get((rows, width))
    if jb is None:
        k, dev = ws.k[0], engine.device
        if ws.join_store is not None and ws.join_store[0].numel() < engine.join_tokens:  # (join_tokens grew)
            ws.joins.clear()
            ws.graphs = {key: g for key, g in ws.graphs.items() if key[0] != "join"}
            ws.join_store = None
        if ws.join_store is None:
            per_token = k.shape[1] * k.shape[3]
            ws.join_store = (torch.zeros(engine.join_tokens, dtype=torch.long, device=dev),
                             k.new_empty(engine.join_tokens * per_token), k.new_empty(engine.join_tokens * per_token),
                             *(torch.zeros(ws.batch, dtype=torch.long, device=dev) for _ in range(3)))
        ids, kf, vf, lengths, index, first = ws.join_store
        shape = (rows, k.shape[1], width, k.shape[3])
        n = rows * k.shape[1] * width * k.shape[3]
        jb = ws.joins[(rows, width)] = JoinBuffers(
            ids=ids[:rows * width].view(rows, width), lengths=lengths[:rows], index=index[:rows],
            scratch=(kf[:n].view(shape), vf[:n].view(shape)), first=first[:rows])
    return jb


def join_body(engine, ws: Workspace, jb: JoinBuffers, greedy: bool) -> None:
    """What a graphed join runs: the prompts right-padded (row ``i`` real in columns [0, len_i)), their
    K/V into slots [0, width) of their rows (slots from len_i on hold padding that no step attends to
    before it overwrites them), the first token sampled after each prompt's last real token, and each
    row set to decode from slot len_i, position len_i."""
    rows, width = jb.ids.shape
    col = torch.arange(width, device=engine.device)
    real = col[None, :] < jb.lengths[:, None]                                       # [B, S]
    causal = (col[None, :] <= col[:, None])[None, None]
    own = torch.eye(width, dtype=torch.bool, device=engine.device)[None, None]      # padding sees itself
    mask = engine.additive((real[:, None, None, :] & causal) | own)
    caches = ScatterCaches(ws, jb.index, width, scratch=jb.scratch)
    logits = engine.forward(caches, jb.ids, col.expand(rows, width), mask, col, width, compiled=False,
                            last=jb.lengths - 1)
    caches.flush()
    first = sample(logits, greedy, ws.temperature, ws.top_p, ws.key[jb.index], jb.lengths - 1)
    jb.first.copy_(first)
    ws.key_valid.index_fill_(0, jb.index, True)  # every slot up to the row's own slot is its own token
    ws.tok.index_copy_(0, jb.index, first)
    ws.pos.index_copy_(0, jb.index, jb.lengths)
    ws.row_slot.index_copy_(0, jb.index, jb.lengths)
    ws.live.index_fill_(0, jb.index, 1)
