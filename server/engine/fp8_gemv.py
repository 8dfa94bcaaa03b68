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

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from llmwatts.errors import InvalidArgument

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
    swap: bool = False  # tensor cores: y^T = w . x^T (the weight tile is the MMA's first operand)

    def label(self) -> str:
        return (f"m{self.block_m}n{self.block_n}k{self.block_k}s{self.split_k}"
                f"w{self.num_warps}p{self.num_stages}" + ("x" if self.swap else ""))


@triton.jit(do_not_specialize=["split_k"])  # one compile for every split (the bench sweeps them)
def _gemv_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, split_k, stride_xm, stride_wn, stride_os, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 IEEE: tl.constexpr, STAGES: tl.constexpr, SWAP: tl.constexpr):
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
        # SWAP: acc = w . x^T [BLOCK_N, BLOCK_M]; the converted weight tile is the MMA's first operand
        # (Hopper's wgmma takes it from registers, its 64-row M from the outputs), x^T the second.
        acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP else (BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=STAGES):
            k = k0 + rk
            if EVEN_K:
                xk = tl.load(x_rows + k[None, :], mask=m_mask[:, None], other=0.0)
                wk = tl.load(w_rows + k[None, :], mask=n_mask[:, None], other=0.0)
            else:
                k_mask = k < k_end
                xk = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                wk = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            a, b = (wk.to(xk.dtype), tl.trans(xk)) if SWAP else (xk, tl.trans(wk.to(xk.dtype)))
            if IEEE:  # fp32 x: exact products, not tf32's
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        scale = tl.load(scale_n, mask=n_mask, other=0.0)
        if SWAP:
            acc = acc * scale[:, None]
            tl.store(out + rm[None, :] * stride_om + rn[:, None], acc.to(out_ptr.dtype.element_ty),
                     mask=n_mask[:, None] & m_mask[None, :])
        else:
            acc = acc * scale[None, :]
            tl.store(out + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=m_mask[:, None] & n_mask[None, :])


TABLE_ENV = "LLMWATTS_FP8_GEMV_TABLE"
TABLE_MAX_BYTES = 1 << 20
TABLE_MAX_ENTRIES = 4096
# A config's fields and their allowed values (a table entry outside them is refused, never launched).
FIELD_VALUES = {"block_m": (1, 16, 32, 64, 128), "block_n": (8, 16, 32, 64, 128, 256),
                "block_k": (32, 64, 128, 256, 512), "split_k": tuple(range(1, 65)), "num_warps": (1, 2, 4, 8),
                "num_stages": tuple(range(1, 9)), "swap": (False, True)}


def config_from_dict(d: dict) -> GemvConfig:
    """A ``GemvConfig`` from its fields (a table entry), every field checked; ValueError names the first
    bad one. ``swap`` needs the tensor cores (``block_m`` >= 16)."""
    fields = {f.name for f in dataclasses.fields(GemvConfig)}
    unknown = sorted(set(d) - fields - {"m", "n", "k", "us"})  # us: the sweep's time, for people
    if unknown:
        raise ValueError(f"unknown field {unknown[0][:40]!r}")
    values = {}
    for field in dataclasses.fields(GemvConfig):  # a field left out takes the dataclass's default
        name = field.name
        v = d.get(name, None if field.default is dataclasses.MISSING else field.default)
        if v is None or type(v) is not type(FIELD_VALUES[name][0]) or v not in FIELD_VALUES[name]:
            raise ValueError(f"{name}={str(v)[:20]}: use one of {FIELD_VALUES[name][0]}..{FIELD_VALUES[name][-1]}"
                             if name in ("split_k", "num_stages") else
                             f"{name}={str(v)[:20]}: use one of {', '.join(map(str, FIELD_VALUES[name]))}")
        values[name] = v
    if values["swap"] and values["block_m"] == 1:
        raise ValueError("swap needs block_m >= 16 (the tensor cores)")
    return GemvConfig(**values)


def load_table(path: str | os.PathLike) -> dict[tuple[int, int, int], GemvConfig]:
    """A tuning table (``bench/fp8_gemv.py --write-table``: the sweep's fastest configuration per product
    on one card) -> {(M, N, K): config}. InvalidArgument in one line for a missing, oversized or malformed
    file, or any entry out of range."""
    path = Path(path)
    where = f"{TABLE_ENV}={str(path)[:200]}"
    try:
        if path.stat().st_size > TABLE_MAX_BYTES:
            raise InvalidArgument(f"{where}: over {TABLE_MAX_BYTES >> 20} MiB; a tuning table is a few KB")
        doc = json.loads(path.read_text())
    except OSError as e:
        raise InvalidArgument(f"{where}: cannot read it ({e.strerror or e}); write one with "
                              f"bench/fp8_gemv.py --write-table") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"{where}: not JSON ({str(e)[:80]})") from e
    entries = doc.get("configs") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or len(entries) > TABLE_MAX_ENTRIES:
        raise InvalidArgument(f"{where}: want {{\"configs\": [{{\"m\": .., \"n\": .., \"k\": .., \"block_m\": .., ...}}]}} "
                              f"with at most {TABLE_MAX_ENTRIES} entries")
    table = {}
    for i, entry in enumerate(entries):
        try:
            if not isinstance(entry, dict):
                raise ValueError("not an object")
            key = tuple(entry.get(d) for d in ("m", "n", "k"))
            if not all(type(v) is int and 1 <= v <= 1 << 20 for v in key):
                raise ValueError("m, n and k must be whole numbers from 1 to 1048576")
            table[key] = config_from_dict(entry)
        except ValueError as e:
            raise InvalidArgument(f"{where}: entry {i}: {e}") from None
    return table


def tuned() -> dict[tuple[int, int, int], GemvConfig]:
    """``$LLMWATTS_FP8_GEMV_TABLE``'s table (empty when unset), each path read once."""
    path = os.environ.get(TABLE_ENV)
    return _table_at(path) if path else {}


@functools.cache
def _table_at(path: str) -> dict[tuple[int, int, int], GemvConfig]:
    return load_table(path)


def block_k_for(k: int) -> int:
    """The largest of 512, 256, 128 that divides K (no masks along K), else 256."""
    return next((b for b in (512, 256, 128) if k % b == 0), 256)


def tile_rows(m: int) -> int:
    """A tensor-core tile's rows for ``m`` rows of x: 16, 32 or 64 (x padded with zeros up to it)."""
    return 16 if m <= 16 else (32 if m <= 32 else 64)


def pick_config(m: int, n: int, k: int) -> GemvConfig:
    """The configuration used for an [M, K] x [N, K]^T product, from ``bench/fp8_gemv.py``'s sweep on an
    H100 (2026-12-06, docs/performance.md). One row: CUDA cores, 8 outputs x 512 K a step, 2 warps (best
    or within 1% of it on all four llama-7b projections: 2.0-2.8 TB/s). More rows: tensor cores, 32
    outputs a block (64 where N >= 16,384: gate/up 34.7 against 41.4 us at M = 16), and K split below
    ``MIN_PROGRAMS`` programs (down at M = 16: 23.0 against 37.0 us unsplit with 16 outputs a block).
    A product in ``$LLMWATTS_FP8_GEMV_TABLE`` (exact M, N, K) takes the table's configuration instead."""
    config = tuned().get((m, n, k))
    if config is not None:
        return config
    if m == 1:
        base = GemvConfig(block_m=1, block_n=8, block_k=block_k_for(k), num_warps=2, num_stages=3)
    else:
        block_m = tile_rows(m)
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
    return dataclasses.replace(config, split_k=split)


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
                 SWAP=config.swap, num_warps=config.num_warps, num_stages=config.num_stages)
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
