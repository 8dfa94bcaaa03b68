"""The fast engine: a static KV cache, separate prefill and decode, and a decode step replayed as a CUDA graph.

Modelled on gpt-fast's ``generate.py``: prefill runs once per batch; every decode step is one fixed-shape
function (embed → 32 layers → sample) that on CUDA is captured once per (batch bucket, attention window,
greedy?) and replayed, so a step costs one graph launch instead of ~1,000 kernel launches. The per-layer
element-wise work (RMSNorm, rotary, SiLU·mul, residuals) and the K/V cache writes are fused by
``torch.compile`` on CUDA; matmuls stay cuBLAS and attention is SDPA over the cache window.

The engine runs the loaded transformers model's own parameters and modules (embedding, rotary, final
norm, lm_head); it only replaces the decoder layers' forward, with the same operations in the same
order as ``LlamaDecoderLayer``, except that q/k/v and gate/up each run as one matmul over their stacked
weights (the modules' weights become views of the stacked tensor: no extra memory). Greedy tokens on CPU
in fp32 equal ``EagerEngine``'s (tests/server/test_fast_engine.py). A sharded model (``server/tp.py``:
FairScale column-parallel q/k/v/gate/up, row-parallel o/down) runs the same compiled functions on each
rank's slices, with the two all-reduces per layer between them; they are captured into the CUDA graph
with the rest (docs/performance.md). Layers of any other make call their own modules, uncompiled.

Cache layout: a batch is left-padded to width ``S``; slot ``j`` of the cache holds column ``j`` of
the padded batch, so prefill fills slots ``0..S-1`` and decode step ``t`` writes slot ``S+t-1`` for
every sequence at once. Each sequence masks its own padding (``key_valid``) and gets its own positions
(``len_i + t``), exactly as ``generate`` derives them from the attention mask. Attention reads only
the window ``[0, W)`` of the cache, ``W`` the next multiple of ``window_slots`` (``WINDOW_SLOTS``, 16)
above the live slots, so a short batch does not pay for the whole cache.
"""

import logging
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmwatts.server.config import ATTENTION_ENV, ATTENTIONS
from llmwatts.server.engine import (BatchOutput, BatchSpec, PaceCallback, Sampling, SequenceTracker, StepCallback,
                                    left_pad)

log = logging.getLogger(__name__)

# Batches are padded up to one of these sizes, so a handful of graphs serve every batch size.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512)
# Cache length granularity, in slots (tokens).
CACHE_SLOTS = 64
# Default attention window granularity: a decode step attends over the next multiple of this above the
# live slots. 16 ran 0.5-1.7% faster than 32 (and 32 1-2% faster than 64) at batch 64-320 on an H100
# (docs/performance.md), at twice the graph captures per batch bucket.
WINDOW_SLOTS = 16
# KV block size of the flex decode attention's block mask (divides CACHE_SLOTS): the kernel skips whole
# blocks past the slot.
FLEX_KV_BLOCK = 64
FLEX_Q_BLOCK = 128
# Head-room kept free when sizing a new cache against the GPU's free memory.
CACHE_HEADROOM_BYTES = 2 << 30
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


def _bucket(n: int) -> int:
    for b in BATCH_BUCKETS:
        if b >= n:
            return b
    return n


def warm_up(engine, max_batch_size: int, token: int, continuous: bool = False, cache_slots: int = 0) -> int:
    """Run every batch bucket up to ``max_batch_size`` once (a one-token prompt, two new tokens), and with
    ``continuous`` a session over every row prefix, so that their compiles (seconds each on a GPU; one per
    bucket) happen now and not in the first requests that meet them (``llmwatts serve --warmup``). With
    ``continuous`` and ``cache_slots`` (the sessions' cache length) the session also captures its decode
    step for every row prefix and attention window (``ContinuousSession.capture_steps``): a continuous
    batch meets them in no particular order, and each first meeting would stall every live row. Other
    graphs are still captured at first use. Only ``engine.generate`` and ``engine.session``: a sharded
    engine runs it on every rank. -> the runs."""
    greedy = Sampling(greedy=True)
    sizes = sorted({min(_bucket(n), max_batch_size) for n in range(1, max_batch_size + 1)})
    for n in sizes:
        engine.generate(BatchSpec([[token]] * n, [2] * n, greedy, ignore_eos=True))
    if not continuous:
        return len(sizes)
    session = engine.session(max_batch_size, max(cache_slots, 3), greedy, ignore_eos=True)
    for n in sizes:  # n prompts fill rows 0 .. n-1: the steps run over row prefix bucket(n)
        session.admit({"warm-up": BatchSpec([[token]] * n, [2] * n, greedy, ignore_eos=True)})
        while session.busy:
            session.step()
        session.pop("warm-up")
    if cache_slots:
        session.capture_steps()
    return 2 * len(sizes)


def _step_buffers(n: int, device: torch.device) -> list[tuple[torch.Tensor, "torch.cuda.Event | None"]]:
    """Two (host buffer [n], event) pairs, pinned on CUDA: step ``t``'s tokens are copied into pair
    ``t % 2`` without blocking while step ``t + 1`` is queued, and the event says when they arrived."""
    cuda = device.type == "cuda"
    return [(torch.empty(n, dtype=torch.long, pin_memory=cuda), torch.cuda.Event() if cuda else None)
            for _ in range(2)]


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


# ---------------------------------------------------------------------------------------------------
# The decoder layer, split around attention. Same ops, same order as transformers' LlamaRMSNorm,
# apply_rotary_pos_emb, LlamaMLP and LlamaDecoderLayer (fp32 results are bit-identical).

def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos, sin: [B, 1, T, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def _pre_attention(h, cos, sin, ln_w, eps: float, wqkv, bqkv, n_q: int, n_kv: int, head_dim: int,
                   kc, vc, slots, per_row: bool = False):
    """h: [B, T, E] -> q: [B, Hq, T, D] (rotary applied); k (rotary applied) and v are written into the
    caches ``kc``, ``vc`` [B, Hkv, L, D] at ``slots`` (``_rope_into_cache``). One matmul for q, k and v (``wqkv``: their
    weights stacked), split afterwards. Compiled, inductor fuses the cache writes with the rotary's
    kernels and writes the caches in place (no copy kernels; on an H100 two Triton kernels: both rotaries
    with the k write, and the v write)."""
    b, t, _ = h.shape
    x = _rms_norm(h, ln_w, eps)
    q, k, v = F.linear(x, wqkv, bqkv).split((n_q, n_kv, n_kv), dim=-1)
    q = q.reshape(b, t, -1, head_dim).transpose(1, 2)
    k = k.reshape(b, t, -1, head_dim).transpose(1, 2)
    v = v.reshape(b, t, -1, head_dim).transpose(1, 2)
    return _rope_into_cache(q, k, v, cos, sin, kc, vc, slots, per_row)


def _rope_into_cache(q, k, v, cos, sin, kc, vc, slots, per_row: bool = False):
    """Rotary on q and k; k and v written into the caches ``kc``, ``vc`` -> q. ``slots``: [T], the same
    slots for every row; or with ``per_row`` (a decode step, T = 1, of a continuous batch) [B], each
    row's own slot."""
    if per_row:
        rows = torch.arange(kc.shape[0], device=kc.device)
        kc[rows, :, slots] = _rope(k, cos, sin)[:, :, 0]
        vc[rows, :, slots] = v[:, :, 0]
    else:
        kc.index_copy_(2, slots, _rope(k, cos, sin))
        vc.index_copy_(2, slots, v)
    return _rope(q, cos, sin)


def _swiglu(x, wgu, bgu, n_inter: int, wd, bd):
    """x: [B, T, E] -> down(silu(gate(x)) * up(x)), gate and up as one matmul (``wgu``: stacked)."""
    gate, up = F.linear(x, wgu, bgu).split((n_inter, n_inter), dim=-1)
    return F.linear(F.silu(gate) * up, wd, bd)


def _post_attention(h, attn, wo, bo, ln_w, eps: float, wgu, bgu, n_inter: int, wd, bd):
    """h: [B, T, E], attn: [B, Hq, T, D] -> the layer's output [B, T, E]."""
    b, t, _ = h.shape
    h = h + F.linear(attn.transpose(1, 2).reshape(b, t, -1).contiguous(), wo, bo)
    return h + _swiglu(_rms_norm(h, ln_w, eps), wgu, bgu, n_inter, wd, bd)


def _mlp_partial(h, o, ln_w, eps: float, wgu, bgu, n_inter: int, wd):
    """Tensor-parallel half of ``_post_attention`` after o's all-reduce: h: [B, T, E], o: [B, T, E] (summed
    over ranks) -> (h + o, this rank's partial down projection [B, T, E], to be all-reduced)."""
    h = h + o
    return h, _swiglu(_rms_norm(h, ln_w, eps), wgu, bgu, n_inter, wd, None)


def _attend_bmm(q, k, v, mask, scale: float):
    """Attention as two batched matmuls around an fp32 softmax (an alternative to SDPA for decode, where
    T = 1). q: [B, H, T, D], k, v: [B, H, W, D], mask: [B, 1, T, W] additive -> [B, H, T, D]."""
    scores = torch.matmul(q * scale, k.transpose(-1, -2)) + mask  # scaled first: no fp16 overflow
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def _attend_flex(q, k, v, block_mask, scale: float):
    """Decode attention with FlexAttention (``attention="flex"``): compiled on CUDA into a split-KV
    flash-decoding kernel that reads only the cache blocks the block mask lists (those up to the slot
    being written), masking padding and the block's tail element-wise. q: [B, H, 1, D], k, v: the whole
    cache [B, Hkv, L, D] -> [B, H, 1, D]."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def flex_block_mask(valid: torch.Tensor, slot: torch.Tensor, blocks: torch.Tensor, indices: torch.Tensor):
    """The flex decode step's BlockMask over a cache of ``valid.shape[1]`` slots: blocks
    ``0 .. slot // FLEX_KV_BLOCK`` of every row, and inside them only real tokens (not padding) up to the
    slot. ``valid`` [B, L] bool, ``slot`` [1]; ``blocks`` [B, 1, 1] and ``indices`` [B, 1, 1, L / FLEX_KV_BLOCK]
    (0, 1, 2, ...) are int32 buffers. All static tensors, so a CUDA graph captured once serves every step."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks.copy_((slot // FLEX_KV_BLOCK + 1).to(torch.int32).view(1, 1, 1).expand_as(blocks))

    def visible(b, h, q_idx, kv_idx):
        return valid[b, kv_idx] & (kv_idx <= slot[0])

    return BlockMask.from_kv_blocks(blocks, indices, BLOCK_SIZE=(FLEX_Q_BLOCK, FLEX_KV_BLOCK), mask_mod=visible,
                                    seq_lengths=(1, valid.shape[1]))


def _attend_sdpa(q, k, v, mask, scale: float):
    """SDPA with an additive mask. q: [B, Hq, T, D], k, v: [B, Hkv, W, D], mask: [B, 1, T, W]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _inductor_options() -> dict:
    # Rounding fused fp16 intermediates as eager does keeps argmax agreement with eager high on near-tied
    # logits (random weights).
    import torch._inductor.config as inductor_config

    return {"emulate_precision_casts": True} if hasattr(inductor_config, "emulate_precision_casts") else {}


def compiled_decode_attention(attention: str):
    """The decode attention the engine runs on CUDA when it compiles (``bench/decode_attention.py`` times
    these same callables): SDPA as it is (one fused kernel already), bmm compiled like the layers, flex
    compiled with static shapes (its decode kernel needs a static batch and head count: one compile per
    batch bucket and cache length, so dynamo may recompile more than its default 8 times)."""
    if attention == "sdpa":
        return _attend_sdpa
    if attention == "bmm":
        return torch.compile(_attend_bmm, dynamic=True, fullgraph=True, options=_inductor_options())
    _allow_recompiles()
    return torch.compile(_attend_flex, dynamic=False, fullgraph=True)


def _allow_recompiles() -> None:
    """Static-shape compiles recompile per batch bucket (and flex per cache length too): more than dynamo's
    default limit of 8 per function, past which it would silently run the function uncompiled."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 8 * len(BATCH_BUCKETS))


def check_decode_options(attention: str, window_slots: int) -> None:
    """ValueError unless ``attention`` is a decode attention and ``window_slots`` divides the cache rounding."""
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}: use one of {', '.join(ATTENTIONS)}")
    if window_slots <= 0 or CACHE_SLOTS % window_slots:
        raise ValueError(f"window_slots must divide {CACHE_SLOTS}, got {window_slots}")


def _stack(owner: torch.nn.Module, linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack the weights (and biases) of ``linears`` along the output dimension into one tensor and
    re-point each module's weight at its rows of it: one matmul instead of several, no extra memory.
    The stack is kept on ``owner``, so a second engine on the same model reuses it instead of copying."""
    kept = getattr(owner, "_llmwatts_stacked", None)
    if kept is not None and kept[0].data_ptr() == linears[0].weight.data_ptr():
        return kept
    fused = torch.cat([m.weight.detach() for m in linears])
    biases = [m.bias for m in linears]
    fused_bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach() if b is not None else torch.zeros(m.weight.shape[0], dtype=fused.dtype, device=fused.device)
         for m, b in zip(linears, biases)])
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(fused[row:row + n], requires_grad=False)
        if m.bias is not None:
            m.bias = torch.nn.Parameter(fused_bias[row:row + n], requires_grad=False)
        row += n
    owner._llmwatts_stacked = (fused, fused_bias)
    return fused, fused_bias


class _Layer:
    """One decoder layer, in one of three modes:

    - ``plain``: every projection is an ``nn.Linear``; the layer runs as two (compilable) functions of
      its tensors, with q/k/v and gate/up each stacked into one matmul;
    - ``tp``: FairScale's column-parallel q/k/v/gate/up and row-parallel o/down (``server/tp.py``); the
      same functions on this rank's slices, with the two all-reduces a row-parallel layer does
      (after o and after down) made explicitly between them;
    - ``module``: anything else; the layer calls its modules, uncompiled.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = m = module
        a, mlp = m.self_attn, m.mlp
        self.head_dim = a.head_dim
        self.eps1, self.eps2 = m.input_layernorm.variance_epsilon, m.post_attention_layernorm.variance_epsilon
        self.mode = _mode(m)
        if self.mode == "module":
            return
        self.n_q, self.n_kv = a.q_proj.weight.shape[0], a.k_proj.weight.shape[0]
        self.n_inter = mlp.gate_proj.weight.shape[0]
        self.wqkv, self.bqkv = _stack(a, (a.q_proj, a.k_proj, a.v_proj))
        self.wgu, self.bgu = _stack(mlp, (mlp.gate_proj, mlp.up_proj))
        self.wo, self.bo, self.wd, self.bd = a.o_proj.weight, a.o_proj.bias, mlp.down_proj.weight, mlp.down_proj.bias

    @property
    def n_kv_heads(self) -> int | None:
        return None if self.mode == "module" else self.n_kv // self.head_dim

    def pre(self, fn, h, cos, sin, kc, vc, slots, per_row: bool = False):
        """q [B, Hq, T, D]; k and v go into the caches ``kc``, ``vc`` at ``slots``."""
        m = self.module
        if self.mode == "module":
            a = m.self_attn
            b, t, _ = h.shape
            x = m.input_layernorm(h)
            q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
            return _rope_into_cache(q, k, v, cos, sin, kc, vc, slots, per_row)
        return fn(h, cos, sin, m.input_layernorm.weight, self.eps1, self.wqkv, self.bqkv, self.n_q, self.n_kv,
                  self.head_dim, kc, vc, slots, per_row)

    def post(self, fns, h, attn):
        m = self.module
        post_fn, mlp_fn = fns
        if self.mode == "plain":
            return post_fn(h, attn, self.wo, self.bo, m.post_attention_layernorm.weight, self.eps2,
                           self.wgu, self.bgu, self.n_inter, self.wd, self.bd)
        b, t, _ = h.shape
        flat = attn.transpose(1, 2).reshape(b, t, -1).contiguous()             # [B, T, Hq_local * D]
        if self.mode == "module":
            h = h + m.self_attn.o_proj(flat)
            return h + m.mlp(m.post_attention_layernorm(h))
        # What RowParallelLinear.forward does: the local matmul, the all-reduce, then the bias.
        o = _all_reduce(F.linear(flat, self.wo))
        if self.bo is not None:
            o = o + self.bo
        h, down = mlp_fn(h, o, m.post_attention_layernorm.weight, self.eps2, self.wgu, self.bgu, self.n_inter,
                         self.wd)
        down = _all_reduce(down)
        return h + (down if self.bd is None else down + self.bd)


def _model_parallel_world() -> int:
    try:
        from fairscale.nn.model_parallel.initialize import get_model_parallel_world_size, model_parallel_is_initialized
    except ImportError:
        return 1
    return get_model_parallel_world_size() if model_parallel_is_initialized() else 1


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    from fairscale.nn.model_parallel.mappings import reduce_from_model_parallel_region

    return reduce_from_model_parallel_region(x)


def _mode(layer: torch.nn.Module) -> str:
    a, mlp = layer.self_attn, layer.mlp
    act = getattr(mlp, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")
    if not (silu and type(layer.input_layernorm).__name__.endswith("RMSNorm")
            and type(layer.post_attention_layernorm).__name__.endswith("RMSNorm")):
        return "module"
    column = (a.q_proj, a.k_proj, a.v_proj, mlp.gate_proj, mlp.up_proj)
    row = (a.o_proj, mlp.down_proj)
    if all(type(p) is torch.nn.Linear for p in column + row):
        return "plain"
    try:
        from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear
    except ImportError:
        return "module"
    if all(type(p) is ColumnParallelLinear and not p.gather_output for p in column) and \
            all(type(p) is RowParallelLinear and p.input_is_parallel for p in row):
        return "tp"
    return "module"


# ---------------------------------------------------------------------------------------------------
# Sampling on the device: no host syncs.

def _sample(logits: torch.Tensor, greedy: bool, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits: [B, V] fp32 -> token ids [B]. Temperature then nucleus (top-p) filtering, as generate's
    warpers do with top_k=0; the draw is argmax(p / Exp(1)) (gpt-fast), an exact categorical sample."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, sorted_ids = probs.sort(dim=-1, descending=True)
    outside = (sorted_p.cumsum(dim=-1) - sorted_p) > top_p  # the first token always stays
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    draw = (sorted_p / torch.empty_like(sorted_p).exponential_(1)).argmax(dim=-1, keepdim=True)
    return sorted_ids.gather(-1, draw).squeeze(-1)


@dataclass
class _Workspace:
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
    flex_blocks: torch.Tensor | None = None   # [B, 1, 1] int32: cache blocks the flex decode reads
    flex_indices: torch.Tensor | None = None  # [B, 1, 1, L / FLEX_KV_BLOCK] int32: 0, 1, 2, ...
    graphs: dict = field(default_factory=dict)   # (window, greedy, per_row) or ("join", rows, width, greedy) -> graph
    pool: object = None
    last_used: float = 0.0
    # A continuous batch (``ContinuousSession``): each row's own next slot, and 1 on rows a request holds.
    row_slot: torch.Tensor | None = None      # [B] long
    live: torch.Tensor | None = None          # [B] long
    views: dict = field(default_factory=dict)  # n -> this workspace's first n rows (``_rows_view``)
    joins: dict = field(default_factory=dict)  # (rows, width) -> _JoinBuffers of graphed joins
    join_store: tuple | None = None            # the memory behind every _JoinBuffers (``_join_buffers``)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class _JoinBuffers:
    """Static inputs and outputs of a graphed join prefill: ``rows`` prompts right-padded to ``width``."""

    ids: torch.Tensor       # [rows, width] long
    lengths: torch.Tensor   # [rows] long: each prompt's real tokens
    index: torch.Tensor     # [rows] long: the workspace row each prompt fills
    scratch: tuple          # one layer's (k, v), each [rows, Hkv, width, D] (``_ScatterCaches``)
    first: torch.Tensor     # [rows] long: the first sampled token per prompt


class FastEngine:
    """Static-cache, CUDA-graph decode engine (``--engine fast``); same interface as ``EagerEngine``.

    ``compile`` (torch.compile of the layer's fused element-wise parts) and ``cuda_graphs`` default to
    on for CUDA and off elsewhere; ``LLMWATTS_FAST_COMPILE=0`` turns compile off for debugging.
    """

    name = "fast"

    def __init__(self, model: torch.nn.Module, pad_token_id: int, eos_token_id: int | None,
                 device: torch.device, context_length: int = 2048, *, compile: bool | None = None,
                 cuda_graphs: bool | None = None, attention: str | None = None, window_slots: int = WINDOW_SLOTS,
                 prefill_tokens: int = PREFILL_TOKENS, join_tokens: int = JOIN_GRAPH_TOKENS):
        self.model, self.pad_id, self.eos_id = model, pad_token_id, eos_token_id
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be positive, got {prefill_tokens}")
        if join_tokens < 0:
            raise ValueError(f"join_tokens must be 0 (off) or positive, got {join_tokens}")
        self.prefill_tokens, self.join_tokens = prefill_tokens, join_tokens
        self.captures, self.capture_s = 0, 0.0  # CUDA graphs captured so far, and the seconds it took
        self.device = torch.device(device)
        self.context_length = context_length
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        if compile is None:
            compile = on_cuda and os.environ.get("LLMWATTS_FAST_COMPILE", "1") != "0"
        inner = model.model
        self.embed, self.rotary, self.norm, self.lm_head = inner.embed_tokens, inner.rotary_emb, inner.norm, model.lm_head
        self.layers = [_Layer(layer) for layer in inner.layers]
        self.scale = self.layers[0].module.self_attn.scaling
        self.dtype = self.embed.weight.dtype
        # Decode attention: SDPA over the cache window, two batched matmuls (``bmm``), or FlexAttention
        # over the whole cache with a block mask (``flex``: one graph per batch bucket, no windows); the
        # bench measures all three. Prefill always uses SDPA.
        self.attention = attention or os.environ.get(ATTENTION_ENV, "sdpa")
        # Attention window granularity: finer reads fewer stale slots per step but captures more graphs.
        check_decode_options(self.attention, window_slots)
        self.window_slots = window_slots
        decode_attend = {"sdpa": _attend_sdpa, "bmm": _attend_bmm, "flex": _attend_flex}[self.attention]
        self.fns = self.eager_fns = (_pre_attention, _post_attention, _mlp_partial, decode_attend)
        self.compiled = bool(compile) and all(l.mode != "module" for l in self.layers)
        self._sharded = _model_parallel_world() > 1  # ranks run in lockstep and must stay so
        if self.compiled:
            # Static shapes: one compile per batch bucket, so inductor tunes its kernels for that batch.
            # (With dynamic=True one compile served every bucket, but its kernels kept the launch configs
            # tuned at the first batch size: 2.2x the fused kernels' time at batch 64, 3.3x at 256 on an
            # H100, docs/performance.md.) The caches' length is marked dynamic (``_workspace``), so a
            # longer cache for the same bucket does not compile again.
            _allow_recompiles()
            layer_fns = [torch.compile(fn, dynamic=False, fullgraph=True, options=_inductor_options())
                         for fn in self.eager_fns[:3]]
            self.fns = (*layer_fns, compiled_decode_attention(self.attention))
        self._workspaces: dict[int, _Workspace] = {}
        self._pinned = None

    # -- public -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, batch: BatchSpec, on_step: StepCallback | None = None,
                 pace: PaceCallback | None = None) -> BatchOutput:
        tracker = SequenceTracker(batch, self.eos_id)
        n = len(batch.prompts)
        width = max(len(p) for p in batch.prompts)
        max_new = max(batch.max_new_tokens)
        if width + max_new > self.context_length:
            raise ValueError(f"prompt ({width} tokens) + max_new_tokens ({max_new}) exceeds the model's "
                             f"context of {self.context_length} tokens")
        s = batch.sampling
        if s.seed is not None:
            torch.manual_seed(s.seed)
        ws = self._workspace(_bucket(n), width + max_new, prefill_width=width)
        ws.temperature.fill_(s.temperature)
        ws.top_p.fill_(s.top_p)
        started = time.perf_counter()
        first = self._prefill(ws, batch.prompts, s.greedy)
        host = self._host_buffers(ws.batch)

        def emit(ids: list[int]) -> None:
            nonlocal started
            if tracker.all_done:
                return
            if pace is not None:
                pace(time.perf_counter() - started)
            deltas = tracker.step(ids[:n])
            if on_step is not None:
                on_step(tracker.steps - 1, deltas)
            started = time.perf_counter()

        emit(first.tolist())
        pending = None  # (event, pinned buffer) of the step in flight: its copy overlaps the next step
        for t in range(1, max_new):
            if tracker.all_done:
                break
            self._decode_step(ws, width + t, s.greedy)
            buf, event = host[t % 2]
            if self.device.type == "cuda":
                buf.copy_(ws.out, non_blocking=True)
                event.record()
            else:
                buf.copy_(ws.out)
            if pending is not None:
                self._emit_pending(pending, emit)
            pending = (buf, event)
        if pending is not None:
            self._emit_pending(pending, emit)
        return tracker.output()

    def session(self, rows: int, cache_slots: int, sampling: Sampling, ignore_eos: bool,
                prefill_width: int = 1) -> "ContinuousSession":
        """A continuous batch of up to ``rows`` sequences of at most ``cache_slots`` tokens each."""
        return ContinuousSession(self, rows, cache_slots, sampling, ignore_eos, prefill_width)

    @torch.inference_mode()
    def teacher_forced_argmax(self, ids: list[int]) -> list[int]:
        """Argmax next token after each prefix of ``ids`` through the decode path (prefill of the first
        token, then one graphed step per token fed in): ``len(ids)`` predictions, for agreement checks."""
        ws = self._workspace(1, len(ids) + 1)
        out = [int(self._prefill(ws, [ids[:1]], True)[0])]
        forced = torch.tensor(ids, dtype=torch.long, device=self.device)
        for t in range(1, len(ids)):
            ws.tok.copy_(forced[t:t + 1])
            self._decode_step(ws, 1 + t, True)
            out.append(int(ws.out[0]))
        return out

    def release(self) -> None:
        """Drop every cache and graph (frees GPU memory; the next batch rebuilds what it needs)."""
        self._workspaces.clear()
        self._pinned = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- internals ----------------------------------------------------------------------------------

    def _emit_pending(self, pending, emit) -> None:
        buf, event = pending
        if event is not None and self.device.type == "cuda":
            event.synchronize()  # the one host sync per step: this step's tokens, for streaming
        emit(buf.tolist())

    def _host_buffers(self, batch: int):
        if self._pinned is None or self._pinned[0][0].numel() != batch:
            self._pinned = _step_buffers(batch, self.device)
        return self._pinned

    def _workspace(self, batch: int, needed_slots: int, prefill_width: int = 1) -> _Workspace:
        cache_len = min(_round_up(needed_slots, CACHE_SLOTS), _round_up(self.context_length, CACHE_SLOTS))
        elem = self.embed.weight.element_size()
        hidden, inter = self.embed.weight.shape[-1], self.layers[0].module.mlp.gate_proj.weight.shape[0]
        # Prefill's activations come on top of the caches: per token of a chunk about 8 hidden-sized and
        # 4 intermediate-sized tensors at once (q/k/v, gate/up, SiLU·up, fp32 norm temporaries), plus the
        # chunk's [rows, 1, S, S] mask with its bool temporaries. Checked on every batch, a reused cache's too.
        rows = min(batch, self._prefill_rows(prefill_width))
        prefill = rows * prefill_width * ((8 * hidden + 4 * inter) * elem + 4 * prefill_width)
        ws = self._workspaces.get(batch)
        if ws is not None and ws.cache_len >= cache_len:
            ws.last_used = time.monotonic()
            self._make_room(prefill, keep=batch)
            return ws
        if ws is not None:
            del self._workspaces[batch]
        a = self.layers[0].module.self_attn
        n_kv = self.layers[0].n_kv_heads
        if n_kv is None:  # module mode: ask the module (a sharded k_proj knows its local width)
            probe = a.k_proj(torch.zeros(1, 1, self.embed.weight.shape[-1], device=self.device, dtype=self.dtype))
            n_kv = probe.shape[-1] // a.head_dim
        shape = (batch, n_kv, cache_len, a.head_dim)
        need = 2 * len(self.layers) * batch * n_kv * cache_len * a.head_dim * elem
        self._make_room(need + prefill)
        dev = self.device
        ws = _Workspace(
            batch=batch, cache_len=cache_len,
            k=[torch.zeros(shape, device=dev, dtype=self.dtype) for _ in self.layers],
            v=[torch.zeros(shape, device=dev, dtype=self.dtype) for _ in self.layers],
            tok=torch.zeros(batch, dtype=torch.long, device=dev), out=torch.zeros(batch, dtype=torch.long, device=dev),
            pos=torch.zeros(batch, dtype=torch.long, device=dev), slot=torch.zeros(1, dtype=torch.long, device=dev),
            key_valid=torch.zeros(batch, cache_len, dtype=torch.bool, device=dev),
            temperature=torch.ones(1, device=dev), top_p=torch.ones(1, device=dev),
            pool=torch.cuda.graph_pool_handle() if self.cuda_graphs else None, last_used=time.monotonic(),
        )
        if self.attention == "flex":
            ws.flex_blocks = torch.zeros(batch, 1, 1, dtype=torch.int32, device=dev)
            ws.flex_indices = torch.arange(cache_len // FLEX_KV_BLOCK, dtype=torch.int32, device=dev).expand(
                batch, 1, 1, -1).contiguous()
        if self.compiled and self.attention != "flex":
            # The compiled layer functions take the caches: one compile per bucket, whatever the length.
            # (flex's compile reads the whole cache and wants every size static.)
            from torch._dynamo import mark_dynamic

            for t in ws.k + ws.v:
                mark_dynamic(t, 2)
        self._workspaces[batch] = ws
        return ws

    def _make_room(self, need_bytes: int, keep: int | None = None) -> None:
        """Evict least recently used caches (and their graphs), never ``keep``'s, until ``need_bytes`` fit.

        Sharded: every rank must keep the same caches, or one rank re-captures a graph (warm-up steps with
        all-reduces) while another replays, and their collectives pair up wrongly. So the ranks decide on
        the smallest free memory among them, and evict in the same (LRU) order."""
        if self.device.type != "cuda":
            return
        while True:
            candidates = [w for w in self._workspaces.values() if w.batch != keep]
            free, _ = torch.cuda.mem_get_info(self.device)
            if self._sharded:
                free = self._min_over_ranks(free)
            if free >= need_bytes + CACHE_HEADROOM_BYTES or not candidates:
                return
            oldest = min(candidates, key=lambda w: w.last_used)
            del self._workspaces[oldest.batch]
            torch.cuda.empty_cache()

    def _min_over_ranks(self, value: int) -> int:
        import torch.distributed as dist
        from fairscale.nn.model_parallel.initialize import get_model_parallel_group

        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=get_model_parallel_group())
        return int(t.item())

    def _prefill_rows(self, width: int) -> int:
        """Rows of a ``width``-token left-padded batch that one prefill chunk runs at once."""
        return max(1, self.prefill_tokens // width)

    def _prefill(self, ws: _Workspace, prompts: list[list[int]], greedy: bool,
                 rows: list[int] | None = None) -> torch.Tensor:
        """Run the left-padded prompts through the model, fill cache slots [0, S), set up the decode
        state; returns the first sampled token per row [B]. Rows run in chunks of ``prefill_tokens``
        (every row's result is its own: the chunks only bound the activations' memory).

        A static batch (``rows`` None) fills every row of the workspace, filler rows past the prompts.
        A continuous batch's join fills only ``rows`` (one per prompt, in any order: rows that are not
        adjacent go through ``_ScatterCaches``) and sets their own slots (``row_slot``) and live flags; the
        other rows keep what they hold."""
        static = rows is None
        width = max(len(p) for p in prompts)
        b = ws.batch if static else len(prompts)
        rows = list(range(b)) if static else list(rows)
        ids, ones = left_pad(list(prompts) + [[self.pad_id]] * (b - len(prompts)), self.pad_id, self.device)
        lengths = ones.sum(-1)                                     # ids: [B, S], filler rows one pad token
        col = torch.arange(width, device=self.device)
        real = col[None, :] >= (width - lengths)[:, None]                      # [B, S]
        # Positions as generate derives them from the mask: cumsum - 1 on real tokens, 1 on padding.
        positions = (real.long().cumsum(-1) - 1).masked_fill(~real, 1)
        slots = torch.arange(ws.cache_len, device=self.device)
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        ws.key_valid.index_copy_(0, index, slots[None, :] >= (width - lengths)[:, None])
        # Causal over real keys; a padding row also sees itself, so no softmax row is empty (NaN-free).
        causal = (col[None, :] <= col[:, None])[None, None]                          # [1, 1, S, S]
        own = torch.eye(width, dtype=torch.bool, device=self.device)[None, None]
        logits = []
        step = self._prefill_rows(width)
        for r in range(0, b, step):
            chunk = slice(r, r + step)
            mask = self._additive((real[chunk, None, None, :] & causal) | own)    # [rows, 1, S, S]
            mine = rows[chunk]
            if mine == list(range(mine[0], mine[-1] + 1)):  # adjacent rows: views, written in place
                caches = [(k[mine[0]:mine[-1] + 1], v[mine[0]:mine[-1] + 1]) for k, v in zip(ws.k, ws.v)]
            else:
                caches = _ScatterCaches(ws, index[chunk], width)
            logits.append(self._forward(caches, ids[chunk], positions[chunk], mask, col, width, compiled=False))
            if isinstance(caches, _ScatterCaches):
                caches.flush()
        first = _sample(torch.cat(logits), greedy, ws.temperature, ws.top_p)
        ws.tok.index_copy_(0, index, first)
        ws.pos.index_copy_(0, index, lengths)
        if static:
            ws.slot.fill_(width)
        else:
            ws.row_slot.index_fill_(0, index, width)
            ws.live.index_fill_(0, index, 1)
        return first.cpu()

    def _join_shape(self, ws: _Workspace, rows: int, width: int) -> tuple[int, int] | None:
        """The static shape (rows, width) a join of ``rows`` prompts of at most ``width`` tokens runs in, or
        None: too large for a graphed join (``JOIN_GRAPH_TOKENS``), it runs the eager prefill."""
        shape = (_pow2(rows), max(JOIN_MIN_WIDTH, _pow2(width)))
        if shape[0] > ws.batch or shape[1] > ws.cache_len or shape[0] * shape[1] > self.join_tokens:
            return None
        return shape

    def _join_shapes(self, ws: _Workspace) -> list[tuple[int, int]]:
        """Every shape ``_join_shape`` can give on ``ws``."""
        shapes, rows = [], 1
        while rows <= ws.batch:
            width = JOIN_MIN_WIDTH
            while self._join_shape(ws, rows, width) == (rows, width):
                shapes.append((rows, width))
                width *= 2
            rows *= 2
        return shapes

    def _capture_joins(self, ws: _Workspace, greedy: bool) -> None:
        """Capture the graphed join of every shape, into rows 0.. of ``ws`` (only while no row is live: the
        warm-up runs write those rows)."""
        todo = [shape for shape in self._join_shapes(ws) if ("join", *shape, greedy) not in ws.graphs]
        t0 = time.perf_counter()
        for rows, width in todo:
            jb = self._join_buffers(ws, rows, width)
            jb.ids.fill_(self.pad_id)
            jb.lengths.fill_(1)
            jb.index.copy_(torch.arange(rows))
            self._join_graph(ws, jb, greedy)
        if todo:
            log.info("captured %d join graphs (up to %d tokens) in %.1f s", len(todo), self.join_tokens,
                     time.perf_counter() - t0)

    def _join_prefill(self, ws: _Workspace, prompts: list[list[int]], greedy: bool, rows: list[int],
                      shape: tuple[int, int]) -> torch.Tensor:
        """A continuous batch's join from static buffers of ``shape`` (``_join_shape``), replayed as a
        captured graph on CUDA. -> the first sampled token per prompt [n]."""
        n = len(prompts)
        jb = self._join_buffers(ws, *shape)
        fill = shape[0] - n  # filler rows repeat the last prompt into its row: the same values written twice
        padded = list(prompts) + [prompts[-1]] * fill
        ids = torch.full(shape, self.pad_id, dtype=torch.long)
        for i, p in enumerate(padded):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        jb.ids.copy_(ids)
        jb.lengths.copy_(torch.tensor([len(p) for p in padded], dtype=torch.long))
        jb.index.copy_(torch.tensor(list(rows) + [rows[-1]] * fill, dtype=torch.long))
        if self.cuda_graphs:
            self._join_graph(ws, jb, greedy).replay()
        else:
            self._join_body(ws, jb, greedy)
        return jb.first[:n].cpu()

    def _join_graph(self, ws: _Workspace, jb: _JoinBuffers, greedy: bool):
        return self._graph(ws, ("join", *jb.ids.shape, greedy), lambda: self._join_body(ws, jb, greedy))

    def _join_buffers(self, ws: _Workspace, rows: int, width: int) -> _JoinBuffers:
        """Static buffers of joins of ``rows`` prompts of ``width``: views of one store per workspace, sized
        for ``join_tokens`` tokens (every shape's graph reads the same memory, each through its views)."""
        jb = ws.joins.get((rows, width))
        if jb is None:
            k, dev = ws.k[0], self.device
            if ws.join_store is not None and ws.join_store[0].numel() < self.join_tokens:  # (join_tokens grew)
                ws.joins.clear()
                ws.graphs = {key: g for key, g in ws.graphs.items() if key[0] != "join"}
                ws.join_store = None
            if ws.join_store is None:
                per_token = k.shape[1] * k.shape[3]
                ws.join_store = (torch.zeros(self.join_tokens, dtype=torch.long, device=dev),
                                 k.new_empty(self.join_tokens * per_token), k.new_empty(self.join_tokens * per_token),
                                 *(torch.zeros(ws.batch, dtype=torch.long, device=dev) for _ in range(3)))
            ids, kf, vf, lengths, index, first = ws.join_store
            shape = (rows, k.shape[1], width, k.shape[3])
            n = rows * k.shape[1] * width * k.shape[3]
            jb = ws.joins[(rows, width)] = _JoinBuffers(
                ids=ids[:rows * width].view(rows, width), lengths=lengths[:rows], index=index[:rows],
                scratch=(kf[:n].view(shape), vf[:n].view(shape)), first=first[:rows])
        return jb

    def _join_body(self, ws: _Workspace, jb: _JoinBuffers, greedy: bool) -> None:
        """What a graphed join runs: the prompts right-padded (row ``i`` real in columns [0, len_i)), their
        K/V into slots [0, width) of their rows (slots from len_i on hold padding that no step attends to
        before it overwrites them), the first token sampled after each prompt's last real token, and each
        row set to decode from slot len_i, position len_i."""
        rows, width = jb.ids.shape
        col = torch.arange(width, device=self.device)
        real = col[None, :] < jb.lengths[:, None]                                       # [B, S]
        causal = (col[None, :] <= col[:, None])[None, None]
        own = torch.eye(width, dtype=torch.bool, device=self.device)[None, None]      # padding sees itself
        mask = self._additive((real[:, None, None, :] & causal) | own)
        caches = _ScatterCaches(ws, jb.index, width, scratch=jb.scratch)
        logits = self._forward(caches, jb.ids, col.expand(rows, width), mask, col, width, compiled=False,
                               last=jb.lengths - 1)
        caches.flush()
        first = _sample(logits, greedy, ws.temperature, ws.top_p)
        jb.first.copy_(first)
        ws.key_valid.index_fill_(0, jb.index, True)  # every slot up to the row's own slot is its own token
        ws.tok.index_copy_(0, jb.index, first)
        ws.pos.index_copy_(0, jb.index, jb.lengths)
        ws.row_slot.index_copy_(0, jb.index, jb.lengths)
        ws.live.index_fill_(0, jb.index, 1)

    def _forward(self, caches, ids, positions, mask, slots, window: int, compiled: bool,
                 decode: bool = False, per_row: bool = False, last: torch.Tensor | None = None) -> torch.Tensor:
        """ids, positions: [B, T]; mask: [B, 1, T, window] additive (decode with flex: a BlockMask over the
        whole cache); writes k, v at ``slots`` [T] (``per_row``: [B], T = 1) into ``caches`` (per layer a
        (k, v) pair of [B, Hkv, L, D]) -> logits [B, V] fp32. Prefill (even of one-token prompts) always
        attends with SDPA; ``decode`` picks the engine's decode attention. The logits are those after the
        last column, or after column ``last`` [B] of each row."""
        pre, post, mlp, attend = self.fns if compiled else self.eager_fns
        h = self.embed(ids)                                                     # [B, T, E]
        cos, sin = self.rotary(h, positions)                                    # [B, T, D]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for layer, (kc, vc) in zip(self.layers, caches):
            q = layer.pre(pre, h, cos, sin, kc, vc, slots, per_row)            # q: [B, Hq, T, D]
            kw, vw = kc[:, :, :window], vc[:, :, :window]                       # k: [B, Hkv, W, D]
            if decode and (self.attention != "bmm" or kw.shape[1] == q.shape[1]):  # bmm has no GQA: SDPA
                attn = attend(q, kw, vw, mask, self.scale)
            else:
                attn = _attend_sdpa(q, kw, vw, mask, self.scale)
            h = layer.post((post, mlp), h, attn)
        h = h[:, -1:, :] if last is None else h[torch.arange(h.shape[0], device=h.device), last][:, None, :]
        return self.lm_head(self.norm(h))[:, -1].float()

    def _additive(self, keep: torch.Tensor) -> torch.Tensor:
        # Once per step, not once per layer: SDPA would convert a bool mask like this in every layer.
        return torch.zeros(keep.shape, dtype=self.dtype, device=keep.device).masked_fill_(~keep, float("-inf"))

    def _decode_body(self, ws: _Workspace, window: int, greedy: bool, per_row: bool = False) -> None:
        """One decode step on the workspace's static buffers (this is what a CUDA graph captures). A
        static batch writes one slot for every row; a continuous one (``per_row``) each row's own slot,
        and advances only live rows (an idle row rewrites its slot 0 and attends to it alone)."""
        slot = ws.row_slot if per_row else ws.slot
        if self.attention == "flex":
            mask = flex_block_mask(ws.key_valid, ws.slot, ws.flex_blocks, ws.flex_indices)
        else:
            cols = torch.arange(window, device=self.device)
            upto = cols[None, :] <= (slot[:, None] if per_row else slot)
            mask = self._additive((ws.key_valid[:, :window] & upto)[:, None, None, :])  # [B, 1, 1, W]
        logits = self._forward(zip(ws.k, ws.v), ws.tok[:, None], ws.pos[:, None], mask, slot, window,
                               compiled=self.compiled, decode=True, per_row=per_row)
        nxt = _sample(logits, greedy, ws.temperature, ws.top_p)
        ws.out.copy_(nxt)
        ws.tok.copy_(nxt)
        if per_row:
            ws.pos.add_(ws.live)
            ws.row_slot.add_(ws.live)
        else:
            ws.pos.add_(1)
            ws.slot.add_(1)

    def _window(self, ws: _Workspace, live_slots: int) -> int:
        """The cache slots a decode step with ``live_slots`` live slots attends over. flex reads the blocks up
        to the slot by itself: one window (the whole cache), one graph."""
        return ws.cache_len if self.attention == "flex" else min(_round_up(live_slots, self.window_slots), ws.cache_len)

    def _decode_step(self, ws: _Workspace, live_slots: int, greedy: bool, per_row: bool = False) -> None:
        window = self._window(ws, live_slots)
        if not self.cuda_graphs:
            self._decode_body(ws, window, greedy, per_row)
            return
        self._step_graph(ws, window, greedy, per_row).replay()

    def _step_graph(self, ws: _Workspace, window: int, greedy: bool, per_row: bool):
        return self._graph(ws, (window, greedy, per_row), lambda: self._decode_body(ws, window, greedy, per_row),
                           state=(ws.tok, ws.out, ws.pos, ws.row_slot if per_row else ws.slot), compiled=True)

    def _graph(self, ws: _Workspace, key: tuple, body, state: tuple = (), compiled: bool = False):
        """``ws.graphs[key]``, captured from ``body`` the first time: warm up (compiles, autotunes), then
        capture. The warm-up writes what the coming replay writes anyway (a decode step's cache slots, a
        join's rows); ``state`` (the step's inputs) and the RNG are restored afterwards. ``compiled``: the
        body runs the compiled layer functions, and a compiler failure falls back to the uncompiled ones."""
        graph = ws.graphs.get(key)
        if graph is not None:
            return graph
        t0 = time.perf_counter()
        saved = [t.clone() for t in state]
        rng = torch.cuda.get_rng_state(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                try:
                    body()
                except Exception:
                    if not (compiled and self.compiled) or self._sharded:
                        # Sharded, a fallback on one rank alone would re-issue collectives the others do
                        # not: fail the batch (every rank sees it) rather than desynchronise the ranks.
                        raise
                    # A compiler failure must not take the server down: fall back to uncompiled layers.
                    log.exception("torch.compile of the decode step failed; running it uncompiled")
                    self.compiled = False
                    body()
                for t, v in zip(state, saved):
                    t.copy_(v)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.set_rng_state(rng, self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=ws.pool):
            body()
        ws.graphs[key] = graph
        seconds = time.perf_counter() - t0
        self.captures += 1
        self.capture_s += seconds
        log.info("captured a graph of the batch-%d workspace: %s in %.0f ms", ws.batch, key, 1000 * seconds)
        return graph


class _ScatterCaches:
    """The per-layer (k, v) caches ``_forward`` writes, for a prefill of workspace rows that are not
    adjacent (a continuous batch's joiners): each layer writes one scratch pair [n, Hkv, S, D], copied
    into its rows of the workspace's caches when the next layer takes the scratch (and by ``flush`` after
    the last layer). One layer's scratch, not a copy of every layer's cache."""

    def __init__(self, ws: _Workspace, rows: torch.Tensor, width: int, scratch: tuple | None = None):
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
        w = self.width  # (an index_put: it writes only the rows' slots, where index_copy_ into this
        self.ws.k[self.written][self.rows, :, :w] = self.scratch[0]  # strided view could copy it whole)
        self.ws.v[self.written][self.rows, :, :w] = self.scratch[1]
        self.written = None


def _rows_view(ws: _Workspace, n: int, mark_dynamic: bool) -> _Workspace:
    """The first ``n`` rows of ``ws`` as a workspace of their own: views of its tensors (a step on it
    writes ``ws``), with their own graphs. Cached on ``ws``."""
    if n == ws.batch:
        return ws
    view = ws.views.get(n)
    if view is None:
        view = _Workspace(
            batch=n, cache_len=ws.cache_len, k=[t[:n] for t in ws.k], v=[t[:n] for t in ws.v], tok=ws.tok[:n],
            out=ws.out[:n], pos=ws.pos[:n], slot=ws.slot, key_valid=ws.key_valid[:n], temperature=ws.temperature,
            top_p=ws.top_p, pool=ws.pool, row_slot=ws.row_slot[:n], live=ws.live[:n])
        if mark_dynamic:  # as ``_workspace`` marks the whole caches: one compile per bucket, any length
            from torch._dynamo import mark_dynamic as mark

            for t in view.k + view.v:
                mark(t, 2)
        ws.views[n] = view
    return view


class ContinuousSession:
    """Continuous batching on one workspace: requests join free rows and leave between decode steps.

    Joining requests' prompts are prefilled into the lowest free rows (together: one prefill, left-padded
    to their widest) and then decode with every other live row: each row writes its own
    cache slot (``row_slot``) and attends over its own slots only, so rows that joined at different steps
    share every step. A row is freed the step its sequence ends (EOS or its limit); the next request
    takes it. A step runs over rows ``0 .. bucket(highest live row)``, so a half-empty session does not
    pay for its empty top rows. Sampling settings live in the step's graph: one setting per session.

    ``admit`` and ``step`` return, per request key, what each of its sequences gained (``SequenceTracker``
    deltas); ``done(key)`` says when all of them ended and ``pop(key)`` hands over its ``BatchOutput``.
    Single process only (a sharded engine would have to broadcast every join and step to its ranks).
    """

    @torch.inference_mode()
    def __init__(self, engine: "FastEngine", rows: int, cache_slots: int, sampling: Sampling,
                 ignore_eos: bool, prefill_width: int = 1):
        if engine.attention == "flex":
            raise ValueError("continuous batching runs with the sdpa or bmm decode attention, not flex")
        if rows < 1:
            raise ValueError(f"a continuous batch needs at least one row, got {rows}")
        self.engine, self.rows, self.sampling, self.ignore_eos = engine, rows, sampling, ignore_eos
        cache_slots = min(cache_slots, engine.context_length)
        ws = self.ws = engine._workspace(_bucket(rows), cache_slots, prefill_width=prefill_width)
        dev = engine.device
        if ws.row_slot is None:
            ws.row_slot = torch.zeros(ws.batch, dtype=torch.long, device=dev)
            ws.live = torch.zeros(ws.batch, dtype=torch.long, device=dev)
        ws.temperature.fill_(sampling.temperature)
        ws.top_p.fill_(sampling.top_p)
        if engine.cuda_graphs and engine.join_tokens:
            engine._capture_joins(ws, sampling.greedy)  # (before a row is live: they write rows 0..)
        self._idle(torch.arange(ws.batch, device=dev))
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        self.owner: list[tuple[object, int] | None] = [None] * rows  # row -> (request key, sequence index)
        self.slot = [0] * rows                                         # host copy of the live rows' slots
        self.trackers: dict[object, SequenceTracker] = {}
        self.rows_of: dict[object, list[int | None]] = {}             # key -> row per sequence (None: ended)
        self.steps = 0                                                 # steps launched
        self.last_ran: dict[object, int] = {}  # key -> its sequences that ran the step ``step`` took
        self._host = _step_buffers(ws.batch, dev)
        self._pending = None  # (host buffer, event, [(row, key, sequence)]) of the step launched last

    @property
    def cache_slots(self) -> int:
        return self.ws.cache_len

    @property
    def free_rows(self) -> int:
        return sum(o is None for o in self.owner)

    @property
    def live_rows(self) -> int:
        return self.rows - self.free_rows

    def fits(self, batch: BatchSpec) -> bool:
        """Whether ``batch`` could ever join this session: same sampling, and room in the cache (now or
        once rows free up) for its prompt, its new tokens and the one step a row runs past its end."""
        width = max(len(p) for p in batch.prompts)
        return (batch.sampling == self.sampling and batch.ignore_eos == self.ignore_eos
                and len(batch.prompts) <= self.rows and width + max(batch.max_new_tokens) <= self.cache_slots)

    def can_admit(self, batches: list[BatchSpec]) -> bool:
        """Whether ``batches`` can join now, together: free rows for all their prompts, and room in the
        cache for their longest response after their widest prompt (one prefill left-pads to it)."""
        if not batches:
            return True
        width = max(len(p) for b in batches for p in b.prompts)
        return (all(self.fits(b) for b in batches) and sum(len(b.prompts) for b in batches) <= self.free_rows
                and width + max(n for b in batches for n in b.max_new_tokens) <= self.cache_slots)

    @torch.inference_mode()
    def admit(self, joins: dict) -> dict[object, list[list[int]]]:
        """Prefill every request of ``joins`` (key -> BatchSpec) into free rows, in one prefill; their first
        token per sequence (as deltas), per key."""
        if any(key in self.trackers for key in joins):
            raise ValueError(f"a request of {sorted(map(str, joins))} is already in this batch")
        if not joins or not self.can_admit(list(joins.values())):
            raise ValueError("these requests cannot join now: check can_admit first")
        prompts = [p for spec in joins.values() for p in spec.prompts]
        free = [r for r, o in enumerate(self.owner) if o is None][:len(prompts)]
        width = max(len(p) for p in prompts)
        shape = self.engine._join_shape(self.ws, len(prompts), width)
        if shape is not None:  # right-padded: each row decodes from its own prompt's length
            first = self.engine._join_prefill(self.ws, prompts, self.sampling.greedy, free, shape).tolist()
            starts = [len(p) for p in prompts]
        else:  # a large join: the eager prefill, left-padded to its widest prompt
            first = self.engine._prefill(self.ws, prompts, self.sampling.greedy, rows=free).tolist()
            starts = [width] * len(prompts)
        out, at = {}, 0
        for key, spec in joins.items():
            rows = free[at:at + len(spec.prompts)]
            tracker = self.trackers[key] = SequenceTracker(spec, self.engine.eos_id)
            self.rows_of[key] = list(rows)
            for i, r in enumerate(rows):
                self.owner[r] = (key, i)
                self.slot[r] = starts[at + i]
            out[key] = tracker.step(first[at:at + len(spec.prompts)])
            self._free_ended(key)
            at += len(spec.prompts)
        return out

    @torch.inference_mode()
    def capture_steps(self) -> int:
        """Capture the decode step of every row prefix and every attention window up to the cache length
        now, while no row is live, instead of at the first step that meets each one: a capture takes
        about as long as tens of decode steps, and every live row waits for it. -> graphs captured (0
        without CUDA graphs)."""
        if self.live_rows or self._pending is not None:
            raise ValueError("capture_steps runs before any request joins (its warm-up runs write rows 0..)")
        if not self.engine.cuda_graphs:
            return 0
        eng, before = self.engine, self.engine.captures
        windows = sorted({eng._window(self.ws, n) for n in range(1, self.ws.cache_len + 1)})
        for prefix in sorted({_bucket(n) for n in range(1, self.rows + 1)}):
            view = self._view(prefix)
            for window in windows:
                eng._step_graph(view, window, self.sampling.greedy, per_row=True)
        return eng.captures - before

    @property
    def busy(self) -> bool:
        """Rows are live, or a launched step's tokens are still to be taken (``step``)."""
        return self.live_rows > 0 or self._pending is not None

    @torch.inference_mode()
    def step(self) -> dict[object, list[list[int]]]:
        """Launch a decode step of every live row, then take the tokens of the step launched before it (on
        CUDA their copy to the host overlapped this step, as in ``FastEngine.generate``: the GPU does not
        wait for the host's bookkeeping) -> per request key, each of its sequences' gain in that step;
        ``last_ran`` says how many of its sequences ran it. A sequence that ended in a step has already
        run the next one when that is found out: its row's token there is dropped (the cache has the
        slot to spare, ``fits``)."""
        live = [r for r, o in enumerate(self.owner) if o is not None]
        launched = None
        if live:
            view = self._view(_bucket(live[-1] + 1))
            self.engine._decode_step(view, max(self.slot[r] for r in live) + 1, self.sampling.greedy,
                                     per_row=True)
            buf, event = self._host[self.steps % 2]
            buf[:view.batch].copy_(view.out, non_blocking=event is not None)
            if event is not None:
                event.record()
            self.steps += 1
            for r in live:
                self.slot[r] += 1
            launched = (buf, event, [(r, *self.owner[r]) for r in live])
        taken, self._pending = self._pending, launched
        return self._take(taken) if taken is not None else {}

    def _view(self, rows: int) -> _Workspace:
        """The session's first ``rows`` rows, the workspace a step over them runs on (its own graphs)."""
        return _rows_view(self.ws, rows, mark_dynamic=self.engine.compiled and self.engine.attention != "flex")

    def _take(self, pending) -> dict[object, list[list[int]]]:
        buf, event, ran = pending
        if event is not None:
            event.synchronize()  # the one host sync per step
        ids = buf.tolist()
        per_key: dict[object, dict[int, int]] = {}
        for r, key, i in ran:
            if key in self.trackers:  # (a request popped since: the step ran past its end)
                per_key.setdefault(key, {})[i] = ids[r]
        out, self.last_ran = {}, {}
        for key, tokens in per_key.items():
            tracker = self.trackers[key]
            self.last_ran[key] = sum(1 for i in tokens if tracker.finish[i] is None)
            if not self.last_ran[key]:
                continue
            out[key] = tracker.step([tokens.get(i, 0) for i in range(len(tracker.finish))])
            self._free_ended(key)
        return out

    def done(self, key) -> bool:
        return self.trackers[key].all_done

    def pop(self, key) -> BatchOutput:
        """The ended request's output; forgets it."""
        if not self.done(key):
            raise ValueError(f"request {key!r} has not ended")
        del self.rows_of[key]
        return self.trackers.pop(key).output()

    def _free_ended(self, key) -> None:
        """Free the rows of ``key``'s sequences that just ended: idle, slot 0, attending to slot 0 only."""
        rows, finish = self.rows_of[key], self.trackers[key].finish
        ended = [r for i, r in enumerate(rows) if r is not None and finish[i] is not None]
        if not ended:
            return
        for r in ended:
            i = self.owner[r][1]
            rows[i] = None
            self.owner[r] = None
            self.slot[r] = 0
        self._idle(torch.tensor(ended, dtype=torch.long, device=self.engine.device))

    def _idle(self, rows: torch.Tensor) -> None:
        """Make ``rows`` idle: not live, slot 0, attending to their slot 0 alone (no empty softmax row)."""
        ws = self.ws
        ws.live.index_fill_(0, rows, 0)
        ws.row_slot.index_fill_(0, rows, 0)
        ws.key_valid.index_fill_(0, rows, False)
        ws.key_valid[rows, 0] = True
