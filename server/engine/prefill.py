"""Prefill: prompts through the model into the KV cache, the first token sampled after each.

A static batch's prefill fills every row of its workspace, left-padded, in row chunks. A continuous
batch's join fills only the free rows it takes; a join of up to ``join_tokens`` prompt tokens runs from
static buffers, its prompts packed into one row, replayed as a captured graph on CUDA (``join_packed``),
a larger one the eager prefill.
These functions drive a ``FastEngine`` (its ``forward``, ``additive`` and ``graph``).
"""

import logging
import time
from dataclasses import dataclass

import torch

from llmwatts.server.engine.batch import left_pad
from llmwatts.server.engine.cache import PackedCaches, ScatterCaches, Workspace
from llmwatts.server.engine.sampling import sample

log = logging.getLogger(__name__)

# Prefill runs over the batch's rows in chunks of at most this many prompt tokens (at least one row), so
# its activations (~150 KB a token for llama-7b: ~2.5 GB) do not grow with the batch: the caches, not
# prefill, decide the largest batch that fits (llama-7b on an 80 GB H100: 320 rows of 128 + 256 tokens,
# whose one-shot prefill ran out of memory).
PREFILL_TOKENS = 16384
# A continuous batch's join runs from static buffers, its prompts packed end to end into one row of at
# most JOIN_GRAPH_TOKENS tokens, the row padded to a
# multiple of JOIN_PACK_TOKENS: attention is causal within each prompt (block-diagonal), each token's K/V
# scattered into its own row and slot. On CUDA each length is captured once, as a session opens, and
# replayed: an uncaptured prefill launches ~40 kernels a layer, and for a few short prompts that launching,
# not the GPU, sets a join's time (llama-7b on an H200: 19-31 ms a join of ~1.7 prompts, 11 ms graphed;
# docs/performance.md). Packing pads a join by less than JOIN_PACK_TOKENS tokens; the earlier right-padded
# joins (rows and width rounded up to powers of two) did ~2x the work of their prompts at B = 64 and cost
# 8-10% more energy per token than eager joins. A join of more tokens runs eager (the left-padded
# prefill). 0 turns graphed joins off.
JOIN_PACK_TOKENS = 128
# At most this: a packed join's [T, T] mask (4096: 50 MB) and one graph captured per JOIN_PACK_TOKENS (32).
MAX_JOIN_TOKENS = 4096
JOIN_GRAPH_TOKENS = 2048  # B = 64 on an H100: as fast as 512 packed, and no join of a B/8 round runs eager


@dataclass
class JoinBuffers:
    """Static inputs and outputs of a graphed join: up to ``ws.batch`` prompts packed into one row of
    ``tokens`` (real tokens first, then padding)."""

    token: torch.Tensor     # [5, tokens] long: id, position in its prompt, prompt number (-1: padding),
                            # the workspace row and the slot its K/V goes to
    prompt: torch.Tensor    # [3, P] long: each prompt's length, its row, its last token's column
    scratch: tuple          # one layer's (k, v), each [1, Hkv, tokens, D] (``PackedCaches``)
    first: torch.Tensor     # [P] long: the first sampled token per prompt


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
    prompt, the slot each row decodes from next). A graphed join (``packable``) is packed: each row
    decodes from its own prompt's length; a larger one runs the eager prefill, left-padded to its widest."""
    if not packable(engine, ws, prompts):
        width = max(len(p) for p in prompts)
        return prefill(engine, ws, prompts, greedy, rows=rows, keys=keys).tolist(), [width] * len(prompts)
    set_keys(ws, torch.tensor(rows, dtype=torch.long, device=engine.device), keys)
    return join_packed(engine, ws, prompts, greedy, rows).tolist(), [len(p) for p in prompts]


def set_keys(ws: Workspace, index: torch.Tensor, keys: list[int] | None) -> None:
    """Rows ``index`` of ``ws`` sample with noise ``keys`` (None: leave them)."""
    if keys is not None:
        ws.key.index_copy_(0, index, torch.tensor(keys, dtype=torch.long).to(ws.key.device))


def pack_step(engine) -> int:
    """A packed join's length is a multiple of this: JOIN_PACK_TOKENS, or ``join_tokens`` if smaller."""
    return min(JOIN_PACK_TOKENS, engine.join_tokens)


def packable(engine, ws: Workspace, prompts: list[list[int]]) -> bool:
    """Whether ``prompts`` join as one packed join: graphed joins are on and they hold at most
    ``join_tokens`` tokens in all. (A larger join could run as several packs; at B = 256, where rounds of
    32 prompts hold ~4,000 tokens, that was not measured against one eager prefill, so it runs eager.)"""
    return bool(engine.join_tokens) and all(prompts) and sum(len(p) for p in prompts) <= engine.join_tokens


def join_lengths(engine, ws: Workspace) -> list[int]:
    """Every packed join length (tokens) of ``ws``: multiples of ``pack_step`` up to ``join_tokens``."""
    step = pack_step(engine)
    return list(range(step, -(-engine.join_tokens // step) * step + 1, step)) if step else []


def capture_joins(engine, ws: Workspace, greedy: bool) -> None:
    """Capture the graphed join of every length, into row 0 of ``ws`` (only while no row is live: the
    warm-up runs write it)."""
    todo = [t for t in join_lengths(engine, ws) if ("join", t, greedy) not in ws.graphs]
    t0 = time.perf_counter()
    for tokens in todo:
        jb = join_buffers(engine, ws, tokens)
        jb.token.zero_()
        jb.token[0].fill_(engine.pad_id)
        jb.token[4].copy_(torch.arange(tokens).clamp_(max=ws.cache_len - 1))
        jb.prompt.zero_()
        jb.prompt[0].fill_(1)
        join_graph(engine, ws, jb, greedy)
    if todo:
        log.info("captured %d join graphs (up to %d tokens) in %.1f s", len(todo), engine.join_tokens,
                 time.perf_counter() - t0)


def join_packed(engine, ws: Workspace, prompts: list[list[int]], greedy: bool, rows: list[int]) -> torch.Tensor:
    """One packed join of ``prompts`` (at most ``join_tokens`` tokens) into ``rows``, replayed as a
    captured graph on CUDA. -> the first sampled token per prompt [n]."""
    n, lengths = len(prompts), [len(p) for p in prompts]
    total, step = sum(lengths), pack_step(engine)
    tokens = -(-total // step) * step
    jb = join_buffers(engine, ws, tokens)
    pad, last_row, last_len = tokens - total, rows[-1], lengths[-1]
    token = torch.empty((5, tokens), dtype=torch.long)
    token[0] = torch.tensor([t for p in prompts for t in p] + [engine.pad_id] * pad, dtype=torch.long)
    token[1] = torch.tensor([j for m in lengths for j in range(m)] + [0] * pad, dtype=torch.long)
    token[2] = torch.tensor([i for i, m in enumerate(lengths) for _ in range(m)] + [-1] * pad, dtype=torch.long)
    token[3] = torch.tensor([r for r, m in zip(rows, lengths) for _ in range(m)] + [last_row] * pad,
                            dtype=torch.long)
    # The padding's K/V goes into the last prompt's row past its prompt: slots its decode overwrites
    # before any step attends to them (clamped into the cache: duplicates there are never read either).
    token[4] = torch.tensor([j for m in lengths for j in range(m)]
                            + [min(last_len + j, ws.cache_len - 1) for j in range(pad)], dtype=torch.long)
    fill = jb.prompt.shape[1] - n  # filler prompts repeat the last: the same values written twice
    ends = torch.tensor(lengths, dtype=torch.long).cumsum(0) - 1
    prompt = torch.stack([torch.tensor(lengths + [last_len] * fill), torch.tensor(list(rows) + [last_row] * fill),
                          torch.cat([ends, ends[-1:].expand(fill)])])
    jb.token.copy_(token)
    jb.prompt.copy_(prompt)
    if engine.cuda_graphs:
        join_graph(engine, ws, jb, greedy).replay()
    else:
        join_body(engine, ws, jb, greedy)
    return jb.first[:n].cpu()


def join_graph(engine, ws: Workspace, jb: JoinBuffers, greedy: bool):
    return engine.graph(ws, ("join", jb.token.shape[1], greedy), lambda: join_body(engine, ws, jb, greedy))


def join_buffers(engine, ws: Workspace, tokens: int) -> JoinBuffers:
    """Static buffers of packed joins of ``tokens``: views of one store per workspace, sized for the
    longest (every length's graph reads the same memory, each through its views)."""
    jb = ws.joins.get(tokens)
    if jb is None:
        k, dev = ws.k[0], engine.device
        longest = join_lengths(engine, ws)[-1]
        if ws.join_store is not None and ws.join_store[0].shape[1] < longest:  # (join_tokens grew)
            ws.joins.clear()
            ws.graphs = {key: g for key, g in ws.graphs.items() if key[0] != "join"}
            ws.join_store = None
        if ws.join_store is None:
            per_token = k.shape[1] * k.shape[3]
            ws.join_store = (torch.zeros((5, longest), dtype=torch.long, device=dev),
                             torch.zeros((3, ws.batch), dtype=torch.long, device=dev),
                             k.new_empty(longest * per_token), k.new_empty(longest * per_token),
                             torch.zeros(ws.batch, dtype=torch.long, device=dev))
        token, prompt, kf, vf, first = ws.join_store
        shape = (1, k.shape[1], tokens, k.shape[3])
        size = tokens * k.shape[1] * k.shape[3]
        jb = ws.joins[tokens] = JoinBuffers(token=token[:, :tokens], prompt=prompt,
                                            scratch=(kf[:size].view(shape), vf[:size].view(shape)), first=first)
    return jb


def join_body(engine, ws: Workspace, jb: JoinBuffers, greedy: bool) -> None:
    """What a graphed join runs: the packed prompts through the model in one row, each token attending
    causally within its own prompt (padding: within the padding), their K/V into their rows' slots
    [0, len_i) (the padding's past the last prompt, ``join_packed``), the first token sampled after each
    prompt's last token, and each row set to decode from slot len_i, position len_i."""
    tokens = jb.token.shape[1]
    ids, positions, seg, tok_row, tok_slot = jb.token
    lengths, index, last = jb.prompt
    col = torch.arange(tokens, device=engine.device)
    keep = (seg[None, :] == seg[:, None]) & (col[None, :] <= col[:, None])          # [T, T], diagonal set
    mask = engine.additive(keep)[None, None]
    caches = PackedCaches(ws, tok_row, tok_slot, jb.scratch)
    logits = engine.forward(caches, ids[None], positions[None], mask, col, tokens, compiled=False, last=last)
    caches.flush()
    first = sample(logits, greedy, ws.temperature, ws.top_p, ws.key[index], lengths - 1)
    jb.first.copy_(first)
    ws.key_valid.index_fill_(0, index, True)  # every slot up to the row's own slot is its own token
    ws.tok.index_copy_(0, index, first)
    ws.pos.index_copy_(0, index, lengths)
    ws.row_slot.index_copy_(0, index, lengths)
    ws.live.index_fill_(0, index, 1)
