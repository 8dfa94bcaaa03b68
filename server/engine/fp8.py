"""FP8 weights (``--weights fp8``): e4m3 with one fp32 scale per output channel, and the matmul over them.

A weight ``w`` [N, K] is stored as ``w_q = w / s`` in float8_e4m3fn with ``s = amax(|w|, row) / 448`` [N]
(per output channel). On an FP8 GPU (compute capability 8.9+: Ada, Hopper) a matmul of up to
``GEMV_MAX_ROWS`` rows (decode up to batch 16) runs by default a Triton kernel that dequantizes the weight
in registers and leaves x as it is (``fp8_gemv.py``: no activation quantization, fp32 accumulation, y
rounded once to x's dtype; on an H100 a llama-7b layer at one row took 80.7 us compiled against
tensor-wise 106.8 and fp16 153.0, docs/performance.md). Larger ones (prefill, big batches) quantize x per
row (per token, dynamically) and multiply the two fp8 operands with fp32 accumulation,
``y = (x_q @ w_q^T) * s_x * s_w``, by ``torch._scaled_mm``'s tensor-wise kernel with unit scales, the
bf16 product then scaled per row and channel in fp32 (an epilogue the compiled layers fuse).
``LLMWATTS_FP8_GEMM`` chooses: ``weightonly`` (the default), ``tensorwise`` (every size through
``_scaled_mm``, the previous default) or ``rowwise`` (``_scaled_mm``'s row-wise kernel, scales passed
in). Without Triton the default falls back to tensor-wise (one warning); an explicit ``weightonly``
refuses in one line. The reference path computes the same products from the dequantized operands in
the input's dtype (for weight-only rows, from the dequantized weight and x itself), which tests run on
CPU. Anything else refuses: FP8 weights on a GPU without FP8 would only be slower than fp16."""

import logging
import os

import torch
import torch.nn.functional as F

from llmwatts.errors import InvalidArgument

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0          # largest finite e4m3fn value
MIN_SCALE = 1e-12        # an all-zero row or token still divides by something
SCALED_MM_ALIGN = 16     # cuBLASLt fp8: every dimension a multiple of 16 (rows are padded up to it)
WEIGHTS = ("fp16", "fp8")  # what ``--weights`` takes; "fp16" is the model's own dtype (``--dtype``)
REFERENCE = "fp8-reference"  # the library's explicit CPU reference (tests): same maths, dequantized operands
GEMMS = ("tensorwise", "rowwise", "weightonly")  # the GPU path's kernel (LLMWATTS_FP8_GEMM)
DEFAULT_GEMM = "weightonly"
GEMV_ROWS_LIMIT = 1024   # LLMWATTS_FP8_GEMV_ROWS above this is refused (the kernel is for decode's few)
GEMV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # x dtypes the GEMV takes (fp8_gemv.DTYPES)


def gemm_from_env() -> str:
    gemm = os.environ.get("LLMWATTS_FP8_GEMM", DEFAULT_GEMM)
    if gemm not in GEMMS:
        raise InvalidArgument(f"LLMWATTS_FP8_GEMM={gemm[:40]!r}: use one of {', '.join(GEMMS)}")
    return gemm


def gemv_rows_from_env() -> int:
    """weightonly: products of up to this many rows run the Triton GEMV (``LLMWATTS_FP8_GEMV_ROWS``,
    default 16: decode up to batch 16; the bench's A/B of larger batches), larger ones tensor-wise."""
    raw = os.environ.get("LLMWATTS_FP8_GEMV_ROWS", "16")
    if not raw.isdigit() or not 1 <= int(raw) <= GEMV_ROWS_LIMIT:
        raise InvalidArgument(f"LLMWATTS_FP8_GEMV_ROWS={raw[:40]!r}: use a whole number of rows from 1 to "
                              f"{GEMV_ROWS_LIMIT}")
    return int(raw)


GEMM = gemm_from_env()
GEMV_MAX_ROWS = gemv_rows_from_env()


def require_fp8_gpu(device: torch.device, flag: str) -> None:
    """InvalidArgument (one line) unless ``device`` is an FP8 GPU (compute capability 8.9+), naming the
    ``flag`` (``--weights``, ``--kv-cache``) whose fp8 value needs one."""
    need = f"{flag} fp8 needs an FP8 GPU (compute capability 8.9+: Ada or Hopper)"
    if device.type != "cuda":
        raise InvalidArgument(f"{need}; device {device} has none: use {flag} fp16")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise InvalidArgument(f"{need}; {torch.cuda.get_device_name(device)} is {major}.{minor}: use {flag} fp16")


def check_fp8_device(device: torch.device, weights: str) -> None:
    """InvalidArgument (one line) unless ``weights`` can run on ``device``: ``fp8`` needs an FP8 GPU,
    ``fp8-reference`` runs anywhere (slowly: it dequantizes every weight in every matmul)."""
    if weights in ("fp16", "auto", REFERENCE):
        return
    if weights != "fp8":
        raise InvalidArgument(f"unknown weights {weights!r}: use {' or '.join(WEIGHTS)}")
    require_fp8_gpu(device, "--weights")
    if GEMM == "weightonly":
        load_gemv()


def load_gemv() -> None:
    """Register the weight-only GEMV (``torch.ops.llmwatts.fp8_gemv``) before anything is compiled: the
    one import of Triton (it ships with CUDA builds of torch). Without Triton: the default falls back to
    tensor-wise (a warning), an explicit ``LLMWATTS_FP8_GEMM=weightonly`` is refused in one line."""
    global GEMM
    try:
        import llmwatts.server.engine.fp8_gemv  # noqa: F401  (registers the op)
    except ImportError as e:
        if "LLMWATTS_FP8_GEMM" in os.environ:
            raise InvalidArgument(f"LLMWATTS_FP8_GEMM=weightonly needs Triton ({str(e)[:120]}); "
                                  f"use LLMWATTS_FP8_GEMM=tensorwise") from e
        log.warning("fp8 weights: no Triton (%s), so every matmul runs tensor-wise _scaled_mm", str(e)[:120])
        GEMM = "tensorwise"


def route(gemm: str, on_cuda: bool, rows: int, n: int, k: int, dtype: torch.dtype) -> str:
    """Which product ``linear`` runs for [rows, K] x [N, K]^T: ``gemv`` (Triton, weight-only),
    ``tensorwise`` or ``rowwise`` (``_scaled_mm``), or on CPU (or a shape cuBLASLt refuses) the reference:
    ``reference-weightonly`` (dequantized weight, x as it is) where the GPU would run the GEMV, else
    ``reference`` (x quantized per row too)."""
    gemv = gemm == "weightonly" and rows <= GEMV_MAX_ROWS and dtype in GEMV_DTYPES
    if on_cuda and gemv:
        return "gemv"
    if on_cuda and k % SCALED_MM_ALIGN == 0 and n % SCALED_MM_ALIGN == 0:
        return "rowwise" if gemm == "rowwise" else "tensorwise"
    return "reference-weightonly" if gemv else "reference"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., K] -> (x_q [..., K] fp8, scale [..., 1] fp32) with x ≈ x_q * scale, per row."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_weight(w: torch.Tensor, reduce_amax=None) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] -> (w_q [N, K] fp8, scale [N] fp32), one scale per output channel. ``reduce_amax`` (a
    rank's slice of a row-parallel weight: a max over the ranks) turns this slice's row maxima [N, 1] into
    the whole rows', so every rank quantizes with the scales of the unsharded weight."""
    amax = w.abs().amax(dim=-1, keepdim=True).float()
    if reduce_amax is not None:
        amax = reduce_amax(amax)
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale[:, 0]


def dequantize(w_q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values an fp8 weight stands for: w_q [N, K] * scale [N], in ``dtype``."""
    return (w_q.to(torch.float32) * scale[:, None]).to(dtype)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, w_scale: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for a plain weight (``w_scale`` None), else the fp8 matmul of x [..., K] and the fp8
    weight w [N, K] with its per-channel ``w_scale`` [N] -> [..., N] in x's dtype."""
    if w_scale is None:
        return F.linear(x, w, b)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)                                                     # [M, K]
    m, n = x2.shape[0], w.shape[0]
    path = route(GEMM, x.is_cuda, m, n, k, x.dtype)
    if path == "gemv":  # registered by ``load_gemv`` (fp8_gemv.py); an op, so compile and graphs see it
        y = torch.ops.llmwatts.fp8_gemv(x2, w, w_scale)
    elif path == "reference-weightonly":
        y = F.linear(x2, dequantize(w, w_scale, x.dtype))
    elif path != "reference":
        # Rows padded to 16 with zeros (a decode step's few rows: nothing next to the weight read).
        x_q, x_scale = quantize_rows(F.pad(x2, (0, 0, 0, -m % SCALED_MM_ALIGN)))
        if path == "rowwise":
            y = torch._scaled_mm(x_q, w.t(), scale_a=x_scale, scale_b=w_scale[None, :].float(),
                                 out_dtype=torch.bfloat16)[:m].to(x.dtype)    # row-wise scales: bf16 out
        else:  # unit scales (|sum| <= 448^2 K: bf16's range), then the scales in fp32
            one = torch.ones((), device=x.device, dtype=torch.float32)
            y = torch._scaled_mm(x_q, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)[:m]
            y = (y.float() * x_scale[:m] * w_scale[None, :].float()).to(x.dtype)
    else:  # the reference: the same product from the dequantized operands
        x_q, x_scale = quantize_rows(x2)
        y = F.linear((x_q.to(torch.float32) * x_scale).to(x.dtype), dequantize(w, w_scale, x.dtype))
    y = y.reshape(*lead, n)
    return y if b is None else y + b


class Fp8Linear(torch.nn.Module):
    """An ``nn.Linear`` with fp8 weights (``weight`` [N, K] float8_e4m3fn, ``scale`` [N] fp32): what the
    eager engine and module-mode layers call; the fast engine reads the same tensors."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.scale = torch.nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.scale)
