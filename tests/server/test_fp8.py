"""FP8 weights (``--weights fp8``, issue 20): the engines' tokens against a dequantized-weights reference, the
refusal where there is no FP8 GPU, and no full-precision copy of the model while a preset quantizes.

On CPU the fp8 matmul runs its reference path (``fp8-reference``: the same product from the dequantized
operands), so in fp32 its greedy tokens must equal, exactly, those of the plain model whose weights are
replaced by their dequantized fp8 values and whose projections' inputs are fake-quantized per token (the
tensor-wise maths, chosen here; the weight-only default's are checked in test_fp8_gemv.py).
"""

import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from llmwatts.errors import InvalidArgument
from llmwatts.server import models
from llmwatts.server.engine import BatchSpec, EagerEngine, FastEngine, Sampling, fp8

GREEDY = Sampling(greedy=True)
E4M3_MAX = 448.0


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 32000, (n,), generator=g).tolist() for n in lengths]


def fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    """x's values after a per-row e4m3 round trip (written here, apart from server/engine/fp8.py)."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
    return ((x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def reference_model():
    """The plain tiny model, each projection's weight replaced by its fp8 round trip and its input
    fake-quantized per token: the arithmetic an fp8 matmul stands for, in fp32."""
    ref = models.load_model("tiny", "cpu", "float32")
    for name, module in list(ref.model.named_modules()):
        if name.rpartition(".")[2] in models.PROJECTIONS:
            module.weight = torch.nn.Parameter(fake_quant_rows(module.weight.detach()), requires_grad=False)
            module.register_forward_pre_hook(lambda m, args: (fake_quant_rows(args[0]),))
    return ref


def test_fp8_tokens_equal_the_dequantized_weights_reference_exactly(monkeypatch):
    """With LLMWATTS_FP8_GEMM=tensorwise: The fast engine's fp8 layers (fused q/k/v and gate/up, per-channel scales stacked with them) and the
    eager engine's ``Fp8Linear`` modules give the reference's greedy tokens, across padding and rows."""
    monkeypatch.setattr(fp8, "GEMM", "tensorwise")
    fp8_model = models.load_model("tiny", "cpu", "float32", weights_precision="fp8-reference")
    layer = fp8_model.model.model.layers[0]
    assert layer.self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    assert layer.fused_projections.wqkv.dtype == torch.float8_e4m3fn
    assert layer.fused_projections.sqkv.shape == (layer.fused_projections.wqkv.shape[0],)
    ref = reference_model()
    spec = BatchSpec(prompts([5, 17, 1, 11]), [8, 3, 12, 6], GREEDY, ignore_eos=True)
    want = EagerEngine(ref.model, 0, None, ref.device).generate(spec).tokens
    fast = FastEngine(fp8_model.model, 0, None, fp8_model.device)
    assert {l.mode for l in fast.layers} == {"plain"}
    assert fast.generate(spec).tokens == want
    assert EagerEngine(fp8_model.model, 0, None, fp8_model.device).generate(spec).tokens == want
    plain = models.load_model("tiny", "cpu", "float32")
    assert FastEngine(plain.model, 0, None, plain.device).generate(spec).tokens != want  # fp8 changes something


def test_fp8_is_refused_in_one_line_without_an_fp8_gpu(tmp_path):
    """No silent fallback: ``--weights fp8`` on a CPU (or a GPU older than Ada/Hopper) is one clear line."""
    with pytest.raises(InvalidArgument, match=r"^--weights fp8 needs an FP8 GPU .* use --weights fp16$"):
        models.load_model("tiny", "cpu", "float32", weights_precision="fp8")
    run = subprocess.run([sys.executable, "-m", "llmwatts.cli", "serve", "--model", "tiny", "--device", "cpu",
                          "--weights", "fp8", "--port", "0", "--db", str(tmp_path / "s.db")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and "FP8 GPU" in lines[0] and "Traceback" not in run.stderr


class LiveFloatBytes(TorchDispatchMode):
    """The peak bytes of full-precision (floating, not fp8) storages alive, over every op: each storage an
    op makes is held here and counted while anything else still holds it (its use count)."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, torch.UntypedStorage] = {}
        self.peak = 0

    def live(self) -> int:
        for key in [k for k, s in self.storages.items() if torch._C._storage_Use_Count(s._cdata) <= 1]:
            del self.storages[key]  # only we hold it: freed
        return sum(s.nbytes() for s in self.storages.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float8_e4m3fn
                    and not t.is_meta):
                storage = t.untyped_storage()
                self.storages.setdefault(storage.data_ptr(), storage)
        self.peak = max(self.peak, self.live())
        return out


def test_a_preset_quantizes_at_load_without_a_full_precision_copy():
    """Each projection is quantized as it is drawn: while a preset loads with fp8 weights, the
    full-precision memory alive never exceeds what stays (embeddings, norms, scales) plus about one
    projection; quantizing a loaded fp32 model would hold every projection in fp32 at once."""
    config = models.preset_config("tiny")
    proj_bytes = [4 * r * c for r, c in [(config.hidden_size, config.hidden_size)] * 4
                  + [(config.intermediate_size, config.hidden_size)] * 3] * config.num_hidden_layers
    with LiveFloatBytes() as meter:
        loaded = models.load_model("tiny", "cpu", "float32", weights_precision="fp8-reference")
        kept = meter.live()
    kept_params = sum(p.numel() * p.element_size() for p in loaded.model.parameters()
                      if p.dtype != torch.float8_e4m3fn)
    assert kept >= kept_params  # the meter sees what the model holds
    # Beyond what stays: one projection being quantized, and two of ``tiled_normal``'s fp32 tiles (the
    # embedding's, 1024 x 128; an old one lives until the next is drawn): less than all projections.
    tiles = 2 * 4 * 1024 * config.hidden_size
    assert meter.peak - kept <= max(proj_bytes) + tiles < sum(proj_bytes)
    with LiveFloatBytes() as whole:  # the measure can fail: load in fp32, then quantize
        plain = models.load_model("tiny", "cpu", "float32")
        models.quantize_projections(plain.model)
        del plain
    assert whole.peak - kept >= sum(proj_bytes)


def test_fp8_on_the_tensor_parallel_path_gives_the_unsharded_tokens():
    """A FairScale-sharded fp8 rank (world 1 here): the engine's tp path on its slices, with row-parallel
    scales maxed over the ranks, gives the unsharded fp8 model's tokens; eager is refused there."""
    from llmwatts.server.host import make_engine
    from llmwatts.server.tp import load_sharded
    from tests.server.test_fast_engine import one_rank_model_parallel

    with one_rank_model_parallel():
        loaded, _ = load_sharded("tiny", torch.device("cpu"), torch.float32, 0, 0, 1, "fp8-reference")
        fast = make_engine("fast", loaded)
        assert {layer.mode for layer in fast.layers} == {"tp"}
        whole = models.load_model("tiny", "cpu", "float32", weights_precision="fp8-reference")
        spec = BatchSpec(prompts([5, 12]), [6, 6], GREEDY, ignore_eos=True)
        assert fast.generate(spec).tokens == EagerEngine(whole.model, 0, None, whole.device).generate(spec).tokens
        with pytest.raises(InvalidArgument, match="needs --engine fast"):
            make_engine("eager", loaded)


def test_the_gpu_gemm_choice_is_checked(monkeypatch):
    """LLMWATTS_FP8_GEMM picks _scaled_mm's kernel for the bench's A/B (docs/performance.md): a mistyped
    value is refused in one line, not silently run with the default."""
    from llmwatts.errors import InvalidArgument
    from llmwatts.server.engine import fp8

    for gemm in ("tensorwise", "rowwise", "weightonly"):
        monkeypatch.setenv("LLMWATTS_FP8_GEMM", gemm)
        assert fp8.gemm_from_env() == gemm
    monkeypatch.delenv("LLMWATTS_FP8_GEMM")
    assert fp8.gemm_from_env() == "weightonly"  # the default since the H100 bench of 2026-12-06
    monkeypatch.setenv("LLMWATTS_FP8_GEMM", "row-wise")
    with pytest.raises(InvalidArgument, match=r"^LLMWATTS_FP8_GEMM='row-wise': use one of "
                                              r"tensorwise, rowwise, weightonly$"):
        fp8.gemm_from_env()
