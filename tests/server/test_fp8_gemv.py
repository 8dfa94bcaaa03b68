"""The weight-only fp8 GEMV (``LLMWATTS_FP8_GEMM=weightonly``, issue 20): its Triton kernel against the
dequantized-weight product, run on CPU by Triton's interpreter; which product ``fp8.linear`` routes each
shape to; and the engines' tokens with the weight-only maths against a reference model written here.

The kernel runs in a child process with ``TRITON_INTERPRET=1`` (numpy on the CPU; Triton reads it when it
is imported, and nothing else in the test process should run interpreted), through the launch code the
GPU uses (``fp8_gemv.launch``). Two interpreter limits shape the checks: it rounds fp32 to bf16 by
truncation (the GPU rounds to nearest: one bf16 ulp either way), and its ``tl.dot`` miscomputes bf16
operands (Triton 3.9), so bf16 runs only the one-row (CUDA-core) configurations here; the GPU bench
(``bench/fp8_gemv.py``) checks every path's error on the card.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from llmwatts.errors import InvalidArgument
from llmwatts.server import models
from llmwatts.server.engine import BatchSpec, EagerEngine, FastEngine, Sampling, fp8
from conftest import interpreted_child, triton_module  # tests/server/conftest.py (the interpreter child imports it too)

fp8_gemv, needs_triton = triton_module("fp8_gemv")

# (M, N, K): N and K off the block sizes, K off every block_k (masked K), several M blocks, M = 1..16.
SHAPES = [(m, 40, 384) for m in range(1, 17)] + [(1, 33, 200), (3, 70, 1000), (16, 17, 96), (20, 48, 256),
                                                 (40, 24, 128)]
# (block_m, block_n, block_k, split_k[, num_warps, num_stages, swap]); None: fp8_gemv.pick_config's choice.
# Swapped (y^T = w . x^T): its transposed store's masks, split K, and x rows padded to 16 and to 64.
CONFIGS = [None, (1, 16, 128, 3), (16, 32, 64, 2), (32, 16, 256, 1), (16, 64, 64, 2, 4, 3, True),
           (64, 32, 128, 1, 4, 3, True)]
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -20}


def operands(m, n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    # Rows of very different magnitudes: a scale applied to the wrong axis cannot hide.
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 0, n)[:, None]
    w_q, scale = fp8.quantize_weight(w)
    return x, w_q, scale


def interpreted_gemv(x, w_q, scale, config=None):
    """The GPU's launch code with the kernel run by the interpreter (in the child: TRITON_INTERPRET=1)."""
    config = fp8_gemv.GemvConfig(*config) if config else fp8_gemv.pick_config(x.shape[0], w_q.shape[0], x.shape[1])
    return fp8_gemv.launch(x, w_q, scale, config, fp8_gemv._gemv_kernel)


def interpreter_checks() -> dict:
    """Run in the child: for every dtype, shape and config, y against x @ dequantize(w)^T in fp64 (bound:
    the output dtype's rounding), and split K at 1, 2, 3 and 5. -> {check: [failures]} and counts."""
    failures: dict[str, list] = {"product": [], "split_k": []}
    checked = 0
    for name, dtype in DTYPES.items():
        for i, (m, n, k) in enumerate(SHAPES):
            x, w_q, scale = operands(m, n, k, dtype, seed=i)
            ref = x.double() @ fp8.dequantize(w_q, scale, torch.float64).t()
            for config in CONFIGS:
                block_m = config[0] if config else fp8_gemv.pick_config(m, n, k).block_m
                if dtype == torch.bfloat16 and block_m > 1:
                    continue  # the interpreter's tl.dot miscomputes bf16 (module docstring)
                if block_m == 1 and m > 3 and config:
                    continue  # a program per row is slow to interpret, and pick_config uses it for one row
                y = interpreted_gemv(x, w_q, scale, config)
                err = (y.double() - ref).abs()
                bound = ULP[dtype] * ref.abs() + 1e-6 * ref.abs().max()
                checked += 1
                if y.shape != (m, n) or y.dtype != dtype or not (err <= bound).all():
                    failures["product"].append([name, m, n, k, config, str(y.dtype), float((err - bound).max())])
    x, w_q, scale = operands(2, 32, 640, torch.float32, seed=7)
    ys = [interpreted_gemv(x, w_q, scale, (1, 16, 64, s)) for s in (1, 2, 3, 5)]
    for s, y in zip((2, 3, 5), ys[1:]):
        if not torch.allclose(y, ys[0], rtol=1e-6, atol=1e-6):
            failures["split_k"].append([s, float((y - ys[0]).abs().max())])
    return {"failures": failures, "checked": checked}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """interpreter_checks() in a child process with TRITON_INTERPRET=1."""
    return interpreted_child(__file__)


@needs_triton
def test_the_gemv_equals_the_dequantized_weight_product(interpreted):
    """Guards against a kernel that skips or repeats a K chunk, drops a row or column at a block's edge,
    applies the scale per row of x instead of per output channel, or quantizes x: y equals
    x @ dequantize(w)^T in fp64 to within the output dtype's rounding, in fp16, fp32 and bf16, for every
    M from 1 to 16, N and K not multiples of the blocks, split K, and M over several blocks."""
    assert interpreted["checked"] >= 3 * len(SHAPES)
    assert interpreted["failures"]["product"] == []


@needs_triton
def test_split_k_partial_sums_are_summed_once(interpreted):
    """Guards against split-K programs writing over each other or a split counted twice: a K whose
    chunks do not divide evenly over the splits gives split 1's y at split 2, 3 and 5."""
    assert interpreted["failures"]["split_k"] == []


def compile_for_hopper(config, x_dtype: str, even_k: bool = True) -> dict:
    """The kernel compiled ahead of time for sm_90 (no GPU needed: Triton's wheel carries ptxas) with
    llama's alignment (pointers, N, K and strides multiples of 16) -> PTX and the cubin's resource use."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = fp8_gemv._gemv_kernel
    out = "fp32" if config.split_k > 1 else x_dtype
    pointers = {"x_ptr": f"*{x_dtype}", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "out_ptr": f"*{out}"}
    constexprs = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
                  "EVEN_K": even_k, "IEEE": x_dtype == "fp32", "STAGES": config.num_stages,
                  "SWAP": config.swap}
    names = kernel.arg_names
    signature = {a: pointers.get(a, "constexpr" if a in constexprs else "i32") for a in names}
    aligned = [(i,) for i, a in enumerate(names) if a in pointers or a in ("N", "K") or a.startswith("stride")]
    source = ASTSource(fn=kernel, signature=signature, attrs={i: [["tt.divisibility", 16]] for i in aligned},
                       constexprs={(names.index(a),): v for a, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    cubin = Path(tempfile.mkdtemp()) / "gemv.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    return {"ptx": compiled.asm["ptx"], "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "stack": int(re.search(r"STACK:(\d+)", usage).group(1))}


@needs_triton
def test_the_kernel_compiles_for_hopper_pipelined_and_without_spills():
    """Guards against a kernel that only the interpreter accepts, and against the one-row path losing its
    pipelining (Triton pipelines loads that feed no tl.dot only when the loop asks: without it one tile
    is in flight per program, too few bytes to keep HBM busy) or spilling registers: every config
    pick_config gives llama-7b's projections at M = 1 and 16 compiles for sm_90, copies its weight
    tiles with cp.async, uses the tensor cores above one row, and spills nothing in fp16 or bf16."""
    shapes = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]
    configs = {(fp8_gemv.pick_config(m, n, k), k % fp8_gemv.pick_config(m, n, k).block_k == 0)
               for m in (1, 16) for n, k in shapes}
    for (config, even_k), x_dtype in [(c, "fp16") for c in sorted(configs, key=str)] + [
            ((fp8_gemv.pick_config(m, 4096, 4096), True), "bf16") for m in (1, 16)]:
        built = compile_for_hopper(config, x_dtype, even_k)
        assert "cp.async" in built["ptx"], config
        assert ("mma.sync" in built["ptx"]) == (config.block_m > 1), config
        assert built["stack"] == 0 and built["registers"] <= 255, (config, built["stack"], built["registers"])
    assert compile_for_hopper(fp8_gemv.pick_config(16, 4096, 4096), "fp32")["registers"] > 0  # ieee dot builds


@needs_triton
def test_the_op_traces_as_one_node_with_its_output_shape():
    """Guards against the GEMV breaking the fast engine's ``torch.compile(fullgraph=True)``: exported by
    dynamo (strict), a function calling it holds the registered op as one node of the right shape and
    dtype (on the GPU the bench runs it compiled and inside a CUDA graph)."""

    class Projection(torch.nn.Module):
        def forward(self, x, w_q, scale):
            return torch.ops.llmwatts.fp8_gemv(x, w_q, scale) * 2

    x, w_q, scale = operands(3, 48, 256, torch.float16, seed=1)
    program = torch.export.export(Projection(), (x, w_q, scale), strict=True)
    calls = [n for n in program.graph.nodes if n.op == "call_function" and "fp8_gemv" in str(n.target)]
    assert len(calls) == 1
    out = calls[0].meta["val"]
    assert out.shape == (3, 48) and out.dtype == torch.float16


@needs_triton
def test_bad_operands_are_refused_in_one_line():
    x, w_q, scale = operands(2, 32, 64, torch.float16, seed=0)
    with pytest.raises(ValueError, match=r"want x \[M, K\], w_q \[N, K\], scale \[N\]$"):
        fp8_gemv.gemv(x, w_q[:, :32], scale)
    with pytest.raises(ValueError, match="want x fp16/bf16/fp32, w_q float8_e4m3fn, scale float32$"):
        fp8_gemv.gemv(x, w_q.float(), scale)


def test_weightonly_routes_decode_rows_to_the_gemv_and_prefill_to_tensorwise():
    """Guards against the weight-only choice reaching prefill's hundreds of rows (the GEMV is for decode's
    few) or a shape cuBLASLt refuses, and against CPU ever reaching a GPU kernel."""
    route, f16 = fp8.route, torch.float16
    assert [route("weightonly", True, m, 4096, 4096, f16) for m in (1, fp8.GEMV_MAX_ROWS)] == ["gemv"] * 2
    assert route("weightonly", True, fp8.GEMV_MAX_ROWS + 1, 4096, 4096, f16) == "tensorwise"
    assert route("weightonly", True, 1, 40, 200, f16) == "gemv"  # the GEMV takes any N, K
    assert route("weightonly", True, 64, 40, 200, f16) == "reference"  # _scaled_mm wants multiples of 16
    assert route("weightonly", False, 1, 4096, 4096, f16) == "reference-weightonly"
    assert route("weightonly", False, 17, 4096, 4096, f16) == "reference"
    for gemm in ("tensorwise", "rowwise"):
        assert route(gemm, True, 1, 4096, 4096, f16) == gemm
        assert route(gemm, False, 1, 4096, 4096, f16) == "reference"


def test_the_gemv_row_limit_is_checked(monkeypatch):
    """Guards against a mistyped LLMWATTS_FP8_GEMV_ROWS (the bench's A/B of larger decode batches) being
    run as something else: refused in one line."""
    monkeypatch.setenv("LLMWATTS_FP8_GEMV_ROWS", "64")
    assert fp8.gemv_rows_from_env() == 64
    monkeypatch.delenv("LLMWATTS_FP8_GEMV_ROWS")
    assert fp8.gemv_rows_from_env() == 16
    for bad in ("0", "-1", "sixteen", "16.5", "100000"):
        monkeypatch.setenv("LLMWATTS_FP8_GEMV_ROWS", bad)
        with pytest.raises(InvalidArgument, match=r"^LLMWATTS_FP8_GEMV_ROWS=.*: use a whole number of rows "
                                                  r"from 1 to 1024$"):
            fp8.gemv_rows_from_env()


def test_without_triton_the_default_falls_back_and_an_explicit_weightonly_refuses(monkeypatch):
    """Guards against the weight-only default breaking fp8 on a GPU whose torch has no Triton: the default
    runs tensor-wise instead; LLMWATTS_FP8_GEMM=weightonly, asked for by name, is refused in one line."""
    monkeypatch.setitem(sys.modules, "llmwatts.server.engine.fp8_gemv", None)  # import raises ImportError
    monkeypatch.delenv("LLMWATTS_FP8_GEMM", raising=False)
    monkeypatch.setattr(fp8, "GEMM", "weightonly")
    fp8.load_gemv()
    assert fp8.GEMM == "tensorwise"
    monkeypatch.setenv("LLMWATTS_FP8_GEMM", "weightonly")
    monkeypatch.setattr(fp8, "GEMM", "weightonly")
    with pytest.raises(InvalidArgument, match=r"^LLMWATTS_FP8_GEMM=weightonly needs Triton \(.*\); "
                                              r"use LLMWATTS_FP8_GEMM=tensorwise$"):
        fp8.load_gemv()


def weight_only_reference_model():
    """The plain tiny model with each projection's weight replaced by its fp8 round trip; a projection's
    input is fake-quantized per token only above GEMV_MAX_ROWS rows (prefill), as weightonly runs it."""
    from tests.server.test_fp8 import fake_quant_rows

    ref = models.load_model("tiny", "cpu", "float32")

    def quantize_prefill(module, args):
        x = args[0]
        return (fake_quant_rows(x),) if x.reshape(-1, x.shape[-1]).shape[0] > fp8.GEMV_MAX_ROWS else None

    for name, module in list(ref.model.named_modules()):
        if name.rpartition(".")[2] in models.PROJECTIONS:
            module.weight = torch.nn.Parameter(fake_quant_rows(module.weight.detach()), requires_grad=False)
            module.register_forward_pre_hook(quantize_prefill)
    return ref


def test_weightonly_tokens_equal_the_weight_only_reference(monkeypatch):
    """Guards against the weight-only decode still quantizing x (or prefill not doing so): with
    weightonly the engines' greedy tokens equal a reference whose decode steps use x as it is, and
    differ from the activation-quantized maths of the default."""
    from tests.server.test_fp8 import prompts

    monkeypatch.setattr(fp8, "GEMM", "weightonly")
    fp8_model = models.load_model("tiny", "cpu", "float32", weights_precision="fp8-reference")
    ref = weight_only_reference_model()
    spec = BatchSpec(prompts([5, 17, 1, 11]), [8, 3, 12, 6], Sampling(greedy=True), ignore_eos=True)
    want = EagerEngine(ref.model, 0, None, ref.device).generate(spec).tokens
    assert FastEngine(fp8_model.model, 0, None, fp8_model.device).generate(spec).tokens == want
    assert EagerEngine(fp8_model.model, 0, None, fp8_model.device).generate(spec).tokens == want
    monkeypatch.setattr(fp8, "GEMM", "tensorwise")
    assert FastEngine(fp8_model.model, 0, None, fp8_model.device).generate(spec).tokens != want


if __name__ == "__main__":  # the child of ``interpreted``
    print(json.dumps(interpreter_checks()))
