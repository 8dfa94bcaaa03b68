"""The decode step's attention kernels over the KV cache: SDPA (the default), two batched matmuls (``bmm``)
and FlexAttention with a block mask (``flex``), and how each is compiled.

Prefill always attends with SDPA. ``bench/decode_attention.py`` times these same callables.
"""

import torch
import torch.nn.functional as F

from llmwatts.errors import InvalidArgument
from llmwatts.server.config import ATTENTIONS, KV_REFERENCE, check_kv_cache_name
from llmwatts.server.engine.fp8 import require_fp8_gpu
from llmwatts.server.engine.cache import BATCH_BUCKETS, CACHE_SLOTS, FLEX_KV_BLOCK

# Default attention window granularity: a decode step attends over the next multiple of this above the
# live slots. 16 ran 0.5-1.7% faster than 32 (and 32 1-2% faster than 64) at batch 64-320 on an H100
# (docs/performance.md), at twice the graph captures per batch bucket.
WINDOW_SLOTS = 16
FLEX_Q_BLOCK = 128


def attend_bmm(q, k, v, mask, scale: float):
    """Attention as two batched matmuls around an fp32 softmax (an alternative to SDPA for decode, where
    T = 1). q: [B, H, T, D], k, v: [B, H, W, D], mask: [B, 1, T, W] additive -> [B, H, T, D]."""
    scores = torch.matmul(q * scale, k.transpose(-1, -2)) + mask  # scaled first: no fp16 overflow
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def attend_flex(q, k, v, block_mask, scale: float):
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


def attend_sdpa(q, k, v, mask, scale: float):
    """SDPA with an additive mask. q: [B, Hq, T, D], k, v: [B, Hkv, W, D], mask: [B, 1, T, W]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def attend_fp8_cache(q, k, v, mask, scale: float, kernel: bool):
    """Attention over an fp8 KV window (``--kv-cache fp8``): with ``kernel`` (a decode step on an FP8 GPU)
    the Triton kernel that reads the e4m3 bytes (``fp8_attention.py``); otherwise (prefill, the CPU
    reference) SDPA over the window widened to q's dtype: the same values, read at twice the bytes."""
    if kernel and q.shape[2] == 1:
        from llmwatts.server.engine import fp8_attention

        return fp8_attention.launch(q, k, v, mask, scale)
    return attend_sdpa(q, k.to(q.dtype), v.to(q.dtype), mask, scale)


def check_kv_cache(kv_cache: str, device: torch.device, attention: str) -> None:
    """InvalidArgument (one line) unless the engine can keep its KV cache as ``kv_cache`` on ``device``:
    ``fp8`` needs an FP8 GPU (compute capability 8.9+), Triton and the sdpa decode attention (the
    kernel replaces it); ``fp8-reference`` (tests) runs anywhere, widening the cache in every step."""
    check_kv_cache_name(kv_cache)
    if kv_cache in ("fp16", KV_REFERENCE):
        return
    if attention != "sdpa":
        raise InvalidArgument(f"--kv-cache fp8 decodes with its own kernel, not {attention}: unset "
                              f"LLMWATTS_FAST_ATTENTION or use --kv-cache fp16")
    require_fp8_gpu(device, "--kv-cache")
    try:
        import llmwatts.server.engine.fp8_attention  # noqa: F401
    except ImportError as e:
        raise InvalidArgument(f"--kv-cache fp8 needs Triton ({str(e)[:120]}): use --kv-cache fp16") from e


def inductor_options() -> dict:
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
        return attend_sdpa
    if attention == "bmm":
        return torch.compile(attend_bmm, dynamic=True, fullgraph=True, options=inductor_options())
    allow_recompiles()
    return torch.compile(attend_flex, dynamic=False, fullgraph=True)


def allow_recompiles() -> None:
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
