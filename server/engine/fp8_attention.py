"""Decode attention over an fp8 KV cache (``--kv-cache fp8``): a Triton flash-decoding kernel that reads the
cache's e4m3 bytes and widens them in registers.

At batch 64 a decode step's attention reads the whole KV window of every row (32 layers x K and V x 64 rows
x ~300 slots x 4096 values): with fp16 caches and fp8 weights that read is ~40% of the step on an H100
(docs/performance.md). An fp8 cache halves it. SDPA takes no fp8 operands (and widening the window to
fp16 first would write and read it again), so decode (one query token a row) runs this kernel instead:

- grid (rows x query heads, splits): each program walks its head's keys in blocks of ``block_n`` with an
  online softmax in base 2, the additive mask added to the scores (0 or -inf: padding and slots past a
  row's own); ``q . k`` and ``p . v`` run on the tensor cores with q repeated over the 16 rows of an MMA,
  keys, values and p in q's dtype, fp32 accumulation (``dot``, the default: on an H200 at 64 rows 0.63x
  SDPA's time over an fp16 cache, docs/performance.md), or as fp32 products summed across the block on
  the CUDA cores (``cores``: 0.83x; ``LLMWATTS_KV_KERNEL`` picks);
- with fewer than ``MIN_PROGRAMS`` (row, head) pairs (small batches) the window is split, each split
  writing its unnormalised output, running max and sum (fp32), and a second kernel combines them;
- GQA: query head h reads KV head ``h // (Hq / Hkv)``.

The cache holds ``k`` and ``v`` themselves rounded to e4m3 (unit scale, as vLLM's fp8 cache does without
calibrated scales: llama's keys and values sit far inside e4m3's +-448). Prefill, and every path off a CUDA
GPU, attend with SDPA over the window widened to the model's dtype (``reference``): the same maths, which
the CPU tests compare the kernel against under Triton's interpreter.
"""

import os

import torch
import triton
import triton.language as tl

from llmwatts.errors import InvalidArgument

LOG2E = 1.4426950408889634
MIN_PROGRAMS = 264   # (row, head) pairs below this split the window (~2 per SM on an H100's 132)
BLOCK_N = 64         # keys per block
NUM_WARPS = 4
NUM_STAGES = 3
KERNELS = ("dot", "cores")  # LLMWATTS_KV_KERNEL: q . k and p . v on the tensor cores or the CUDA cores


def kernel_from_env() -> str:
    kernel = os.environ.get("LLMWATTS_KV_KERNEL", "dot")
    if kernel not in KERNELS:
        raise InvalidArgument(f"LLMWATTS_KV_KERNEL={kernel[:40]!r}: use one of {', '.join(KERNELS)}")
    return kernel


KERNEL = kernel_from_env()


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_ptr, stat_ptr,
                   H, W, chunk, group, qk_scale,
                   stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   stride_mb, stride_ob, stride_oh,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                   STAGES: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // H
    h = pid % H
    kvh = h // group
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q_raw = tl.load(q_ptr + b * stride_qb + h * stride_qh + d, mask=dmask, other=0.0)
    q = q_raw.to(tl.float32) * qk_scale
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    start = split * chunk
    end = tl.minimum(start + chunk, W)
    if DOT:  # tensor cores: q repeated over 16 rows (an MMA's least), keys and values widened to q's dtype
        r = tl.arange(0, 16)
        q16 = tl.broadcast_to(q_raw[None, :], (16, BLOCK_D))
        m_r = tl.full((16,), -1.0e30, tl.float32)
        l_r = tl.zeros((16,), dtype=tl.float32)
        acc2 = tl.zeros((16, BLOCK_D), dtype=tl.float32)
        for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            tile = nmask[:, None] & dmask[None, :]
            k = tl.load(k_base + n[:, None] * stride_kn + d[None, :], mask=tile, other=0.0).to(q_raw.dtype)
            add = tl.load(mask_ptr + b * stride_mb + n, mask=nmask, other=float("-inf")).to(tl.float32)
            if IEEE:
                s2 = tl.dot(q16, tl.trans(k), input_precision="ieee")
            else:
                s2 = tl.dot(q16, tl.trans(k))
            s2 = s2 * qk_scale + add[None, :] * 1.4426950408889634
            m_new = tl.maximum(m_r, tl.max(s2, axis=1))
            alpha = tl.exp2(m_r - m_new)
            p2 = tl.exp2(s2 - m_new[:, None])
            v = tl.load(v_base + n[:, None] * stride_vn + d[None, :], mask=tile, other=0.0).to(q_raw.dtype)
            l_r = l_r * alpha + tl.sum(p2, axis=1)
            if IEEE:
                acc2 = acc2 * alpha[:, None] + tl.dot(p2.to(q_raw.dtype), v, input_precision="ieee")
            else:
                acc2 = acc2 * alpha[:, None] + tl.dot(p2.to(q_raw.dtype), v)
            m_r = m_new
        first = r == 0  # every row holds the same result: row 0's
        acc = tl.sum(tl.where(first[:, None], acc2, 0.0), axis=0)
        m_i = tl.sum(tl.where(first, m_r, 0.0), axis=0)
        l_i = tl.sum(tl.where(first, l_r, 0.0), axis=0)
    else:  # CUDA cores: q . k and p . v as fp32 products summed across the block
        m_i = -1.0e30  # finite: a block (or a split) wholly masked leaves exp2(-inf - m_i) = 0, not NaN
        l_i = 0.0
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for n0 in tl.range(start, end, BLOCK_N, num_stages=STAGES):  # keys in flight while the last are summed
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            tile = nmask[:, None] & dmask[None, :]
            k = tl.load(k_base + n[:, None] * stride_kn + d[None, :], mask=tile, other=0.0).to(tl.float32)
            add = tl.load(mask_ptr + b * stride_mb + n, mask=nmask, other=float("-inf")).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) + add * 1.4426950408889634
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new)
            v = tl.load(v_base + n[:, None] * stride_vn + d[None, :], mask=tile, other=0.0).to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new
    if SPLIT:
        row = pid * tl.num_programs(1) + split
        tl.store(part_ptr + row * BLOCK_D + d, acc)
        tl.store(stat_ptr + row * 2, m_i)
        tl.store(stat_ptr + row * 2 + 1, l_i)
    else:
        out = acc / l_i
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _combine_kernel(part_ptr, stat_ptr, out_ptr, H, S, stride_ob, stride_oh,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    s = tl.arange(0, BLOCK_S)
    smask = s < S
    d = tl.arange(0, BLOCK_D)
    m = tl.load(stat_ptr + (pid * S + s) * 2, mask=smask, other=-1.0e30)
    l = tl.load(stat_ptr + (pid * S + s) * 2 + 1, mask=smask, other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))
    part = tl.load(part_ptr + (pid * S + s[:, None]) * BLOCK_D + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def splits_for(rows: int, heads: int, window: int, block_n: int = BLOCK_N, min_programs: int = MIN_PROGRAMS) -> int:
    """How many pieces each (row, head)'s window is split into: enough programs to fill the GPU, each
    piece at least one block."""
    want = -(-min_programs // (rows * heads))
    return max(1, min(want, -(-window // block_n)))


def check_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> None:
    """ValueError unless the shapes are a decode step's: q [B, Hq, 1, D], k and v [B, Hkv, W, D] with Hkv
    dividing Hq and unit stride along D, mask [B, 1, 1, W] additive."""
    b, hq, t, d = q.shape
    if t != 1 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or hq % k.shape[1]:
        raise ValueError(f"decode attention wants q [B, Hq, 1, D] and k, v [B, Hkv, W, D] with Hkv dividing "
                         f"Hq: got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if mask.shape != (b, 1, 1, k.shape[2]):
        raise ValueError(f"decode attention wants a mask [B, 1, 1, W] = {(b, 1, 1, k.shape[2])}, got "
                         f"{tuple(mask.shape)}")
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1 or mask.stride(3) != 1:
        raise ValueError("decode attention wants q, k, v and the mask contiguous along their last dimension")


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           splits: int | None = None, block_n: int = BLOCK_N, kernel: str | None = None) -> torch.Tensor:
    """Attention of q [B, Hq, 1, D] over k, v [B, Hkv, W, D] (fp8 or any float dtype) with the additive
    ``mask`` [B, 1, 1, W] -> [B, Hq, 1, D] in q's dtype. ``splits``: None picks ``splits_for``'s;
    ``kernel``: "dot" or "cores" (None: ``KERNEL``; "dot" needs D of at least 16)."""
    check_operands(q, k, v, mask)
    b, hq, _, d = q.shape
    window = k.shape[2]
    splits = splits or splits_for(b, hq, window, block_n)
    chunk = -(-(-(-window // splits)) // block_n) * block_n  # each split's keys, whole blocks
    splits = -(-window // chunk)
    block_d = triton.next_power_of_2(d)
    dot = (kernel or KERNEL) == "dot" and block_d >= 16
    out = torch.empty_like(q)
    part = stat = out  # unused unless split
    if splits > 1:
        part = torch.empty((b * hq * splits, block_d), device=q.device, dtype=torch.float32)
        stat = torch.empty((b * hq * splits, 2), device=q.device, dtype=torch.float32)
    _decode_kernel[(b * hq, splits)](
        q, k, v, mask, out, part, stat, hq, window, chunk, hq // k.shape[1], scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0), out.stride(0), out.stride(1),
        D=d, BLOCK_D=block_d, BLOCK_N=block_n, SPLIT=splits > 1, STAGES=NUM_STAGES, DOT=dot,
        IEEE=q.dtype == torch.float32, num_warps=NUM_WARPS)
    if splits > 1:
        _combine_kernel[(b * hq,)](part, stat, out, hq, splits, out.stride(0), out.stride(1),
                                   D=d, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits), num_warps=4)
    return out
