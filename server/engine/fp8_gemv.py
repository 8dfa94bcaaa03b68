"""Weight-only fp8 matmul for decode's few rows (``LLMWATTS_FP8_GEMM=weightonly``, ``fp8.linear``).

``y [M, N] = x [M, K] @ (w_q [N, K] e4m3 * scale [N])^T`` in x's dtype (fp16, bf16 or fp32), the weight
dequantized in registers and never quantizing x. A decode step is a weight read: at M = 1 the tensor-wise
``_scaled_mm`` path also pays for quantizing x (amax, divide, cast: small kernels beside the matmul) and
a bf16 round trip of the product; this kernel reads each weight byte once, with fp32 accumulation, and
rounds only y.

Two code paths, chosen per config (``block_m``): ``block_m == 1`` multiplies on the CUDA cores (one row
per program: decode at batch 1); ``block_m >= 16`` runs ``tl.dot`` on the tensor cores with x's rows
padded to the block (e4m3 converts exactly to fp16 and bf16; fp32 x multiplies in full fp32, not tf32).
Split-K (``split_k`` > 1) writes fp32 partial sums [split_k, M, N] that are summed and cast afterwards
(deterministic: no atomics). The kernel is a ``torch.library.triton_op``, so ``torch.compile``
(fullgraph) and CUDA-graph capture see through it.

Triton is imported by this module only: ``fp8.py`` imports it when the weight-only GEMM is selected and
the weights are on a GPU (Triton ships with CUDA builds of torch; CPU tests run it under
``TRITON_INTERPRET=1``).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

OP_NAME = "llmwatts::fp8_gemv"
MIN_PROGRAMS = 256  # fewer N (and M) blocks than this split K (~2 per SM on an H100's 132)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class GemvConfig:
    """A launch configuration. ``block_m``: 1 = CUDA cores, one row per program; 16/32/64 = tensor cores.
    ``block_k`` should divide K (no masks along K then); ``split_k``: programs along K."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def label(self) -> str:
        return (f"m{self.block_m}n{self.block_n}k{self.block_k}s{self.split_k}"
                f"w{self.num_warps}p{self.num_stages}")


@triton.jit(do_not_specialize=["split_k"])  # one compile for every split (the bench sweeps them)
def _gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, split_k, stride_xm, stride_wn, stride_os, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 IEEE: tl.constexpr, STAGES: tl.constexpr):
    # Grid (M blocks, N blocks, K splits): programs of one N block run side by side, sharing its weight
    # tiles in L2 when M spans several blocks.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    scale_n = s_ptr + rn
    # Each split owns whole BLOCK_K chunks of K: with EVEN_K no load is masked along K.
    chunks = tl.cdiv(tl.cdiv(K, BLOCK_K), split_k)
    k_start = pid_k * chunks * BLOCK_K
    k_end = tl.minimum(k_start + chunks * BLOCK_K, K)
    w_rows = w_ptr + rn[:, None] * stride_wn
    out = out_ptr + pid_k * stride_os
    if BLOCK_M == 1:  # one row (pid_m) per program, on the CUDA cores
        x_row = x_ptr + pid_m * stride_xm
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced once, after the loop
        # STAGES tiles in flight (cp.async through shared memory): Triton pipelines loads that feed no
        # tl.dot only when the loop asks (compiled for sm_90 without it: no cp.async, one tile in flight).
        for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
            k = k0 + rk
            if EVEN_K:
                xk = tl.load(x_row + k)
                wk = tl.load(w_rows + k[None, :], mask=n_mask[:, None], other=0.0)
            else:
                k_mask = k < k_end
                xk = tl.load(x_row + k, mask=k_mask, other=0.0)
                wk = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc2 += wk.to(tl.float32) * xk.to(tl.float32)[None, :]      # [BLOCK_N, BLOCK_K]
        y = tl.sum(acc2, axis=1) * tl.load(scale_n, mask=n_mask, other=0.0)  # [BLOCK_N]
        tl.store(out + pid_m * stride_om + rn, y.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:  # BLOCK_M rows (x padded with zeros) on the tensor cores
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < M
        x_rows = x_ptr + rm[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
            k = k0 + rk
            if EVEN_K:
                xk = tl.load(x_rows + k[None, :], mask=m_mask[:, None], other=0.0)
                wk = tl.load(w_rows + k[None, :], mask=n_mask[:, None], other=0.0)
            else:
                k_mask = k < k_end
                xk = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                wk = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            if IEEE:  # fp32 x: exact products, not tf32's
                acc = tl.dot(xk, tl.trans(wk.to(xk.dtype)), acc, input_precision="ieee")
            else:
                acc = tl.dot(xk, tl.trans(wk.to(xk.dtype)), acc)          # [BLOCK_M, BLOCK_N], fp32
        acc = acc * tl.load(scale_n, mask=n_mask, other=0.0)[None, :]
        tl.store(out + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


def block_k_for(k: int) -> int:
    """The largest of 512, 256, 128 that divides K (no masks along K), else 256."""
    return next((b for b in (512, 256, 128) if k % b == 0), 256)


def pick_config(m: int, n: int, k: int) -> GemvConfig:
    """The configuration used for an [M, K] x [N, K]^T product, from ``bench/fp8_gemv.py``'s sweep on an
    H100 (2026-12-06, docs/performance.md). One row: CUDA cores, 8 outputs x 512 K a step, 2 warps (best
    or within 1% of it on all four llama-7b projections: 2.0-2.8 TB/s). More rows: tensor cores, 32
    outputs a block (64 where N >= 16,384: gate/up 34.7 against 41.4 us at M = 16), and K split below
    ``MIN_PROGRAMS`` programs (down at M = 16: 23.0 against 37.0 us unsplit with 16 outputs a block)."""
    if m == 1:
        base = GemvConfig(block_m=1, block_n=8, block_k=block_k_for(k), num_warps=2, num_stages=3)
    else:
        block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
        wide = n >= 16384
        # 64 rows on 4 warps needs all 255 registers and spills (compiled for sm_90): 8 warps.
        base = GemvConfig(block_m=block_m, block_n=64 if wide else 32, block_k=min(256, block_k_for(k)),
                          num_warps=4 if block_m < 64 else 8, num_stages=3 if wide else 4)
    return with_split(base, m, n, k)


def with_split(config: GemvConfig, m: int, n: int, k: int, min_programs: int = MIN_PROGRAMS) -> GemvConfig:
    """``config`` with ``split_k`` doubled (from 1) while programs < ``min_programs`` and each split
    still has at least two K blocks."""
    programs = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    chunks = triton.cdiv(k, config.block_k)
    split = 1
    while programs * split < min_programs and chunks // (split * 2) >= 2:
        split *= 2
    return GemvConfig(config.block_m, config.block_n, config.block_k, split, config.num_warps,
                      config.num_stages)


def launch(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, config: GemvConfig, kernel) -> torch.Tensor:
    """Run ``kernel`` (``_gemv_kernel``, or it wrapped for torch.compile) for x [M, K], w_q [N, K] -> [M, N]."""
    m, k = x.shape
    n = w_q.shape[0]
    split = config.split_k
    if split == 1:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    else:
        out = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), split)
    kernel[grid](x, w_q, scale, out, m, n, k, split, x.stride(0), w_q.stride(0),
                 out.stride(0) if split > 1 else 0, out.stride(-2),
                 BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                 EVEN_K=k % config.block_k == 0, IEEE=x.dtype == torch.float32, STAGES=config.num_stages,
                 num_warps=config.num_warps, num_stages=config.num_stages)
    return out if split == 1 else out.sum(0).to(x.dtype)


def check_operands(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> None:
    """ValueError unless x [M, K] is fp16/bf16/fp32, w_q [N, K] e4m3 and scale [N] fp32 (the kernel's contract)."""
    if x.dim() != 2 or w_q.dim() != 2 or x.shape[1] != w_q.shape[1] or scale.shape != (w_q.shape[0],):
        raise ValueError(f"fp8 gemv: x {tuple(x.shape)}, w_q {tuple(w_q.shape)}, scale {tuple(scale.shape)}: "
                         f"want x [M, K], w_q [N, K], scale [N]")
    if x.dtype not in DTYPES or w_q.dtype != torch.float8_e4m3fn or scale.dtype != torch.float32:
        raise ValueError(f"fp8 gemv: x {x.dtype}, w_q {w_q.dtype}, scale {scale.dtype}: "
                         f"want x fp16/bf16/fp32, w_q float8_e4m3fn, scale float32")


@torch.library.triton_op(OP_NAME, mutates_args=())
def _gemv_op(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    config = pick_config(x.shape[0], w_q.shape[0], x.shape[1])
    return launch(x.contiguous(), w_q.contiguous(), scale, config, torch.library.wrap_triton(_gemv_kernel))


def gemv(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32) @ (w_q [N, K] e4m3 * scale [N] fp32)^T -> [M, N] in x's dtype, through the
    registered op (eager, ``torch.compile`` and CUDA graphs alike). Configuration: ``pick_config``."""
    check_operands(x, w_q, scale)
    return _gemv_op(x, w_q, scale)


def gemv_with(x: torch.Tensor, w_q: torch.Tensor, scale: torch.Tensor, config: GemvConfig) -> torch.Tensor:
    """``gemv`` with an explicit configuration, launched directly (eager only: the bench's sweep)."""
    check_operands(x, w_q, scale)
    return launch(x.contiguous(), w_q.contiguous(), scale, config, _gemv_kernel)
