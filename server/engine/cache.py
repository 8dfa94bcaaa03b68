"""The engine's static KV caches: one ``Workspace`` per batch bucket (the caches and the decode step's
static inputs and outputs), sized and evicted least recently used against the GPU's free memory.

Cache layout: a batch is left-padded to width ``S``; slot ``j`` of the cache holds column ``j`` of the
padded batch, so prefill fills slots ``0..S-1`` and decode step ``t`` writes slot ``S+t-1`` for every
sequence at once (a continuous batch: each row its own slot, ``row_slot``).
"""

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

# Batches are padded up to one of these sizes, so a handful of graphs serve every batch size.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)
# Cache length granularity, in slots (tokens).
CACHE_SLOTS = 64
# Head-room kept free when sizing a new cache against the GPU's free memory.
CACHE_HEADROOM_BYTES = 2 << 30
# KV block size of the flex decode attention's block mask (divides CACHE_SLOTS): the kernel skips whole
# blocks past the slot.
FLEX_KV_BLOCK = 64


FP8 = torch.float8_e4m3fn  # the dtype of an fp8 KV cache (``--kv-cache fp8``, config.KV_CACHES)


def stored(cache: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cache, value) to write ``value`` into ``cache`` with an index op, in the cache's dtype. An fp8
    cache is written as its bytes (uint8 views) when run eagerly (``index_copy_`` has no fp8 kernel on
    CPU); compiled, inductor stores the fp8 values itself (a view would make it copy the whole cache)."""
    value = value.to(cache.dtype)
    if cache.dtype == FP8 and not torch.compiler.is_compiling():
        return cache.view(torch.uint8), value.view(torch.uint8)
    return cache, value


def bucket(n: int) -> int:
    """The batch bucket ``n`` rows run in."""
    for b in BATCH_BUCKETS:
        if b >= n:
            return b
    return n


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


@dataclass
class Workspace:
    """Static buffers for one batch bucket: the KV cache and the decode step's inputs and outputs."""

    batch: int
    cache_len: int
    k: list[torch.Tensor]           # per layer [B, Hkv, L, D]
    v: list[torch.Tensor]
    tok: torch.Tensor               # [B] the token each sequence feeds into the next step
    out: torch.Tensor               # [B] the token the last step produced
    pos: torch.Tensor               # [B] its position id
    slot: torch.Tensor              # [1] the cache slot the next step writes (a static batch)
    key_valid: torch.Tensor         # [B, L] slot j holds a real token of sequence b (not padding)
    temperature: torch.Tensor       # [1] fp32
    top_p: torch.Tensor             # [1] fp32
    key: torch.Tensor               # [B] long: each row's sampling-noise key (``sampling.row_keys``)
    flex_blocks: torch.Tensor | None = None   # [B, 1, 1] int32: cache blocks the flex decode reads
    flex_indices: torch.Tensor | None = None  # [B, 1, 1, L / FLEX_KV_BLOCK] int32: 0, 1, 2, ...
    graphs: dict = field(default_factory=dict)   # (window, greedy, per_row) or ("join", rows, width, greedy) -> graph
    pool: object = None
    last_used: float = 0.0
    # A continuous batch (``ContinuousSession``): each row's own next slot, and 1 on rows a request holds.
    row_slot: torch.Tensor | None = None      # [B] long
    live: torch.Tensor | None = None          # [B] long
    views: dict = field(default_factory=dict)  # n -> this workspace's first n rows (``Workspaces.rows_view``)
    joins: dict = field(default_factory=dict)  # tokens -> JoinBuffers of graphed (packed) joins
    join_store: tuple | None = None            # the memory behind every JoinBuffers (``prefill.join_buffers``)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class ScatterCaches:
    """The per-layer (k, v) caches ``FastEngine.forward`` writes, for a prefill of workspace rows that are not
    adjacent (a continuous batch's joiners): each layer writes one scratch pair [n, Hkv, S, D], copied
    into its rows of the workspace's caches when the next layer takes the scratch (and by ``flush`` after
    the last layer). One layer's scratch, not a copy of every layer's cache."""

    def __init__(self, ws: Workspace, rows: torch.Tensor, width: int, scratch: tuple | None = None):
        self.ws, self.rows, self.width = ws, rows, width
        shape = (len(rows), ws.k[0].shape[1], width, ws.k[0].shape[3])
        self.scratch = scratch or (ws.k[0].new_empty(shape), ws.v[0].new_empty(shape))
        self.written: int | None = None  # the layer whose scratch is not copied yet

    def __iter__(self):
        for layer in range(len(self.ws.k)):
            self.flush()
            self.written = layer
            yield self.scratch

    def flush(self) -> None:
        if self.written is None:
            return
        self.copy(self.ws.k[self.written], self.scratch[0])
        self.copy(self.ws.v[self.written], self.scratch[1])
        self.written = None

    def copy(self, cache: torch.Tensor, scratch: torch.Tensor) -> None:
        # (an index_put: it writes only the rows' slots, where index_copy_ into this strided view could
        # copy it whole)
        cache, scratch = stored(cache, scratch)
        cache[self.rows, :, :self.width] = scratch


class PackedCaches(ScatterCaches):
    """The per-layer (k, v) caches ``FastEngine.forward`` writes for a packed join (one row of several
    prompts end to end, ``prefill.join_packed``): each layer writes one scratch pair [1, Hkv, T, D], and
    token ``t``'s K/V is copied to row ``rows[t]``, slot ``slots[t]`` of the workspace's caches when the
    next layer takes the scratch (and by ``flush`` after the last layer)."""

    def __init__(self, ws: Workspace, rows: torch.Tensor, slots: torch.Tensor, scratch: tuple):
        self.ws, self.rows, self.slots, self.scratch = ws, rows, slots, scratch
        self.written: int | None = None

    def copy(self, cache: torch.Tensor, scratch: torch.Tensor) -> None:
        # [1, Hkv, T, D] -> [T, Hkv, D]: the shape of cache[rows, :, slots] (two index tensors, a slice between)
        cache, scratch = stored(cache, scratch)
        cache[self.rows, :, self.slots] = scratch[0].transpose(0, 1)


def rows_view(ws: Workspace, n: int, mark_dynamic: bool) -> Workspace:
    """The first ``n`` rows of ``ws`` as a workspace of their own: views of its tensors (a step on it
    writes ``ws``), with their own graphs. Cached on ``ws``."""
    if n == ws.batch:
        return ws
    view = ws.views.get(n)
    if view is None:
        view = Workspace(
            batch=n, cache_len=ws.cache_len, k=[t[:n] for t in ws.k], v=[t[:n] for t in ws.v], tok=ws.tok[:n],
            out=ws.out[:n], pos=ws.pos[:n], slot=ws.slot, key_valid=ws.key_valid[:n], temperature=ws.temperature,
            top_p=ws.top_p, key=ws.key[:n], pool=ws.pool, row_slot=ws.row_slot[:n], live=ws.live[:n])
        if mark_dynamic:  # as ``Workspaces.get`` marks the whole caches: one compile per bucket, any length
            from torch._dynamo import mark_dynamic as mark

            for t in view.k + view.v:
                mark(t, 2)
        ws.views[n] = view
    return view


class Workspaces:
    """The engine's workspaces, one per batch bucket, least recently used evicted when a new one (or a
    prefill's activations) would not fit in free GPU memory.

    Sharded (``min_over_ranks``: the ranks' minimum of a number), every rank must keep the same caches, or
    one rank re-captures a graph (warm-up steps with all-reduces) while another replays, and their
    collectives pair up wrongly. So the ranks decide on the smallest free memory among them, and evict in
    the same (LRU) order."""

    def __init__(self, *, device: torch.device, dtype: torch.dtype, layers: int, kv_heads: int, head_dim: int,
                 hidden: int, intermediate: int, context_length: int, prefill_tokens: int, graphs: bool,
                 flex: bool, mark_dynamic: bool, min_over_ranks: Callable[[int], int] | None = None,
                 kv_dtype: torch.dtype | None = None):
        self.device, self.dtype, self.layers = device, dtype, layers
        self.kv_dtype = kv_dtype or dtype  # the caches' (fp8 with ``--kv-cache fp8``)
        self.kv_heads, self.head_dim, self.hidden, self.intermediate = kv_heads, head_dim, hidden, intermediate
        self.context_length, self.prefill_tokens = context_length, prefill_tokens
        self.graphs, self.flex = graphs, flex
        # The compiled layer functions take the caches: their length dimension is marked dynamic, so one
        # compile serves a bucket at any length (flex's compile reads the whole cache and wants it static).
        # The engine turns it off if its compile fails.
        self.mark_dynamic = mark_dynamic
        self.min_over_ranks = min_over_ranks
        self.by_batch: dict[int, Workspace] = {}

    def prefill_rows(self, width: int) -> int:
        """Rows of a ``width``-token left-padded batch that one prefill chunk runs at once."""
        return max(1, self.prefill_tokens // width)

    def get(self, batch: int, needed_slots: int, prefill_width: int = 1) -> Workspace:
        """The workspace of bucket ``batch`` with at least ``needed_slots`` cache slots (reused, or made
        after evicting others), with room left for a prefill of ``prefill_width`` tokens a row."""
        cache_len = min(round_up(needed_slots, CACHE_SLOTS), round_up(self.context_length, CACHE_SLOTS))
        elem = torch.empty((), dtype=self.dtype).element_size()
        kv_elem = torch.empty((), dtype=self.kv_dtype).element_size()
        # Prefill's activations come on top of the caches: per token of a chunk about 8 hidden-sized and
        # 4 intermediate-sized tensors at once (q/k/v, gate/up, SiLU·up, fp32 norm temporaries), plus the
        # chunk's [rows, 1, S, S] mask with its bool temporaries. Checked on every batch, a reused cache's too.
        rows = min(batch, self.prefill_rows(prefill_width))
        prefill = rows * prefill_width * ((8 * self.hidden + 4 * self.intermediate) * elem + 4 * prefill_width)
        ws = self.by_batch.get(batch)
        if ws is not None and ws.cache_len >= cache_len:
            ws.last_used = time.monotonic()
            self._make_room(prefill, keep=batch)
            return ws
        if ws is not None:
            del self.by_batch[batch]
        shape = (batch, self.kv_heads, cache_len, self.head_dim)
        need = 2 * self.layers * batch * self.kv_heads * cache_len * self.head_dim * kv_elem
        self._make_room(need + prefill)
        dev = self.device
        ws = Workspace(
            batch=batch, cache_len=cache_len,
            k=[torch.zeros(shape, device=dev, dtype=self.kv_dtype) for _ in range(self.layers)],
            v=[torch.zeros(shape, device=dev, dtype=self.kv_dtype) for _ in range(self.layers)],
            tok=torch.zeros(batch, dtype=torch.long, device=dev), out=torch.zeros(batch, dtype=torch.long, device=dev),
            pos=torch.zeros(batch, dtype=torch.long, device=dev), slot=torch.zeros(1, dtype=torch.long, device=dev),
            key_valid=torch.zeros(batch, cache_len, dtype=torch.bool, device=dev),
            temperature=torch.ones(1, device=dev), top_p=torch.ones(1, device=dev),
            key=torch.zeros(batch, dtype=torch.long, device=dev),
            pool=torch.cuda.graph_pool_handle() if self.graphs else None, last_used=time.monotonic(),
        )
        if self.flex:
            ws.flex_blocks = torch.zeros(batch, 1, 1, dtype=torch.int32, device=dev)
            ws.flex_indices = torch.arange(cache_len // FLEX_KV_BLOCK, dtype=torch.int32, device=dev).expand(
                batch, 1, 1, -1).contiguous()
        if self.mark_dynamic:
            from torch._dynamo import mark_dynamic

            for t in ws.k + ws.v:
                mark_dynamic(t, 2)
        self.by_batch[batch] = ws
        return ws

    def rows_view(self, ws: Workspace, n: int) -> Workspace:
        """The first ``n`` rows of ``ws`` (``rows_view``), length marked dynamic as ``get`` marks it."""
        return rows_view(ws, n, self.mark_dynamic)

    def release(self) -> None:
        self.by_batch.clear()

    def _make_room(self, need_bytes: int, keep: int | None = None) -> None:
        """Evict least recently used caches (and their graphs), never ``keep``'s, until ``need_bytes`` fit."""
        if self.device.type != "cuda":
            return
        while True:
            candidates = [w for w in self.by_batch.values() if w.batch != keep]
            free, _ = torch.cuda.mem_get_info(self.device)
            if self.min_over_ranks is not None:
                free = self.min_over_ranks(free)
            if free >= need_bytes + CACHE_HEADROOM_BYTES or not candidates:
                return
            oldest = min(candidates, key=lambda w: w.last_used)
            del self.by_batch[oldest.batch]
            torch.cuda.empty_cache()
