"""The fp8 KV cache (``--kv-cache fp8``, issue 20): its decode kernel against SDPA over the widened window
(run on CPU by Triton's interpreter, in a child process as test_fp8_gemv.py does), the kernel built for
Hopper, the fast engine's tokens against a reference model written here whose keys and values are
rounded to e4m3 where they enter the cache, a server that says so in its dtype, and the refusals.
"""

import json
import subprocess
import sys

import grpc
import pytest
import torch
import torch.nn.functional as F

from llmwatts.errors import InvalidArgument
from llmwatts.server import models
from llmwatts.server.engine import BatchSpec, EagerEngine, FastEngine, Sampling
from llmwatts.server.config import KV_CACHES
from llmwatts.server.engine.cache import FP8, stored
from llmwatts.server.engine.prefill import JOIN_GRAPH_TOKENS
from conftest import interpreted_child, triton_module  # tests/server/conftest.py (the interpreter child imports it too)

fp8_attention, needs_triton = triton_module("fp8_attention")
GREEDY = Sampling(greedy=True)

# (rows, query heads, KV heads, window, head dim, splits, cache dtype, q dtype, kept keys)
# kept: "random" (30% masked, key 0 kept), "first3" (only keys 0-2: later splits wholly masked), "all".
CASES = [
    (2, 4, 4, 70, 16, 1, "float8_e4m3fn", "float16", "random"),       # W off the block, one program a head
    (3, 4, 2, 130, 32, 3, "float8_e4m3fn", "float16", "random"),      # GQA 2:1, three splits
    (1, 8, 1, 200, 64, None, "float8_e4m3fn", "float16", "first3"),   # MQA, auto splits, masked splits
    (2, 2, 2, 64, 128, None, "float8_e4m3fn", "bfloat16", "all"),     # llama's head dim, bf16 q
    (1, 2, 1, 64, 128, 2, "float16", "float16", "random"),            # an fp16 cache through the same kernel
    (2, 2, 2, 5, 24, None, "float32", "float32", "random"),           # D off a power of two, W < one block
    (1, 1, 1, 1, 8, 1, "float8_e4m3fn", "float32", "all"),            # one key
]
ULP = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -20}


def case_operands(b, hq, hkv, w, d, cache, qdt, kept, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, 1, d, generator=g).to(getattr(torch, qdt))
    # Views of the window [0, w) of a longer cache, as the engine passes them; rows of different scales.
    scale = torch.logspace(-1, 0.5, b)[:, None, None, None]
    k = (torch.randn(b, hkv, w + 9, d, generator=g) * 2 * scale).to(getattr(torch, cache))[:, :, :w]
    v = (torch.randn(b, hkv, w + 9, d, generator=g) * scale).to(getattr(torch, cache))[:, :, :w]
    keep = {"random": torch.rand(b, w, generator=g) > 0.3, "all": torch.ones(b, w, dtype=torch.bool),
            "first3": torch.arange(w)[None, :].expand(b, w) < 3}[kept].clone()
    keep[:, 0] = True
    mask = torch.zeros(b, 1, 1, w, dtype=q.dtype).masked_fill_(~keep[:, None, None, :], float("-inf"))
    return q, k, v, mask


def reference(q, k, v, mask, scale):
    """SDPA in fp64 over the cache's values (each KV head shared by its query heads)."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask.double(), scale=scale)


def interpreter_checks() -> dict:
    """Run in the child, for both kernels: each case against ``reference`` (bound: the output dtype's
    rounding, and for the tensor-core kernel p's rounding to that dtype too), and one window split 1, 2,
    3 and 7 ways."""
    failures, split_failures, checked = [], [], 0
    for kernel in fp8_attention.KERNELS:
        for i, (b, hq, hkv, w, d, splits, cache, qdt, kept) in enumerate(CASES):
            if kernel == "dot" and qdt == "bfloat16":
                continue  # the interpreter's tl.dot miscomputes bf16 (test_fp8_gemv.py); the GPU bench checks it
            q, k, v, mask = case_operands(b, hq, hkv, w, d, cache, qdt, kept, seed=i)
            out = fp8_attention.launch(q, k, v, mask, d ** -0.5, splits, kernel=kernel)
            ref = reference(q, k, v, mask, d ** -0.5)
            err = (out.double() - ref).abs()
            bound = 2 * ULP[qdt] * ref.abs() + 1e-5 * ref.abs().max()
            if kernel == "dot":  # p is rounded to q's dtype for the p . v MMA (as flash attention does)
                bound = bound + ULP[qdt] * v.double().abs().max()
            checked += 1
            if out.shape != q.shape or out.dtype != q.dtype or not (err <= bound).all():
                failures.append([kernel, i, str(out.dtype), float((err - bound).max())])
        q, k, v, mask = case_operands(2, 2, 2, 300, 32, "float8_e4m3fn", "float32", "random", seed=99)
        outs = [fp8_attention.launch(q, k, v, mask, 0.2, s, kernel=kernel) for s in (1, 2, 3, 7)]
        split_failures += [[kernel, s, float((o - outs[0]).abs().max())] for s, o in zip((2, 3, 7), outs[1:])
                           if not torch.allclose(o, outs[0], rtol=1e-5, atol=1e-6)]
    return {"failures": failures, "split": split_failures, "checked": checked}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """interpreter_checks() in a child process with TRITON_INTERPRET=1."""
    return interpreted_child(__file__)


@needs_triton
def test_the_kernel_equals_sdpa_over_the_widened_window(interpreted):
    """Guards against a kernel that drops a key at a block's or split's edge, ignores the mask, reads the
    wrong KV head under GQA, returns NaN where a split is wholly masked, or loses precision: every case
    equals fp64 SDPA over the cache's values within two output ulps, fp8, fp16 and fp32 caches."""
    assert interpreted["checked"] == 2 * len(CASES) - 1
    assert interpreted["failures"] == []


@needs_triton
def test_a_split_window_combines_to_the_unsplit_result(interpreted):
    """Guards against splits overlapping, leaving a gap, or being combined with the wrong weights."""
    assert interpreted["split"] == []


@needs_triton
def test_the_kernel_compiles_for_hopper_pipelined_and_without_spills():
    """Guards against a kernel only the interpreter accepts and against losing its pipelining: built for
    sm_90 with llama's head dim, the fp8 kernel widens e4m3 in hardware (cvt from e4m3), copies its key
    and value blocks with cp.async, and spills nothing; the combine kernel builds too."""
    import re
    import tempfile
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(kernel, pointers, constexprs, options):
        names = kernel.arg_names
        signature = {a: pointers.get(a, "constexpr" if a in constexprs else "fp32" if a == "qk_scale" else "i32")
                     for a in names}
        aligned = [(i,) for i, a in enumerate(names) if a in pointers or a.startswith("stride")]
        source = ASTSource(fn=kernel, signature=signature, attrs={i: [["tt.divisibility", 16]] for i in aligned},
                           constexprs={(names.index(a),): v for a, v in constexprs.items()})
        built = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        cubin = Path(tempfile.mkdtemp()) / "k.cubin"
        cubin.write_bytes(built.asm["cubin"])
        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        return built.asm["ptx"], int(re.search(r"STACK:(\d+)", usage).group(1))

    for split in (False, True):
        for dot in (False, True):
            pointers = {"q_ptr": "*fp16", "k_ptr": "*fp8e4nv", "v_ptr": "*fp8e4nv", "mask_ptr": "*fp16",
                        "out_ptr": "*fp16", "part_ptr": "*fp32", "stat_ptr": "*fp32"}
            ptx, stack = build(fp8_attention._decode_kernel, pointers,
                               {"D": 128, "BLOCK_D": 128, "BLOCK_N": fp8_attention.BLOCK_N, "SPLIT": split,
                                "STAGES": fp8_attention.NUM_STAGES, "DOT": dot, "IEEE": False},
                               {"num_warps": fp8_attention.NUM_WARPS})
            assert "e4m3" in ptx and "cp.async" in ptx and stack == 0, (split, dot)
            assert ("mma" in ptx) == dot, (split, dot)
    _, stack = build(fp8_attention._combine_kernel, {"part_ptr": "*fp32", "stat_ptr": "*fp32", "out_ptr": "*fp16"},
                     {"D": 128, "BLOCK_D": 128, "BLOCK_S": 16}, {"num_warps": 4})
    assert stack == 0


@needs_triton
def test_splits_fill_the_gpu_and_never_exceed_the_blocks():
    assert fp8_attention.splits_for(64, 32, 300) == 1          # 2048 programs already
    assert fp8_attention.splits_for(1, 32, 2048) == 9          # 32 heads -> 288 programs
    assert fp8_attention.splits_for(1, 32, 100) == 2           # no split of less than a block
    assert fp8_attention.splits_for(1, 1, 1) == 1


@needs_triton
def test_the_kernel_choice_is_checked(monkeypatch):
    monkeypatch.setenv("LLMWATTS_KV_KERNEL", "wmma")
    with pytest.raises(InvalidArgument, match=r"^LLMWATTS_KV_KERNEL='wmma': use one of dot, cores$"):
        fp8_attention.kernel_from_env()
    monkeypatch.setenv("LLMWATTS_KV_KERNEL", "cores")
    assert fp8_attention.kernel_from_env() == "cores"


@needs_triton
def test_bad_operands_are_refused():
    q, k, v, mask = case_operands(2, 4, 2, 16, 8, "float8_e4m3fn", "float16", "all", seed=0)
    with pytest.raises(ValueError, match="q \\[B, Hq, 1, D\\]"):
        fp8_attention.launch(q.expand(2, 4, 3, 8), k, v, mask, 1.0)       # prefill's T > 1
    with pytest.raises(ValueError, match="Hkv dividing Hq"):
        fp8_attention.launch(q[:, :3], k, v, mask, 1.0)
    with pytest.raises(ValueError, match="mask"):
        fp8_attention.launch(q, k, v, mask[..., :8], 1.0)


# -- the engine -------------------------------------------------------------------------------------

def rounded(x: torch.Tensor) -> torch.Tensor:
    """x's values after an e4m3 round trip (written here, apart from the engine)."""
    return x.to(torch.float8_e4m3fn).to(x.dtype)


@pytest.fixture
def kv_reference_model(monkeypatch):
    """The plain tiny model whose keys (after the rotary) and values are rounded to e4m3 as they enter the
    cache: transformers' llama attention calls ``apply_rotary_pos_emb`` from its module, and v_proj's
    output is the value."""
    from transformers.models.llama import modeling_llama

    rotary = modeling_llama.apply_rotary_pos_emb

    def rotary_then_round(q, k, cos, sin, *args, **kwargs):
        q, k = rotary(q, k, cos, sin, *args, **kwargs)
        return q, rounded(k)

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", rotary_then_round)
    ref = models.load_model("tiny", "cpu", "float32")
    for layer in ref.model.model.layers:
        layer.self_attn.v_proj.register_forward_hook(lambda m, args, out: rounded(out))
    return ref


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 32000, (n,), generator=g).tolist() for n in lengths]


def test_fp8_cache_tokens_equal_the_rounded_kv_reference_exactly(kv_reference_model):
    """Guards against a cache write that skips the rounding or rounds the key before its rotary, a prefill
    that attends to unrounded values, or padding slots read as keys: in fp32 the fast engine with an fp8
    cache (``fp8-reference``: decode widens the cache for SDPA, as the kernel widens it in registers) gives
    the reference's greedy tokens exactly, across left padding and rows; the plain cache gives others."""
    spec = BatchSpec(prompts([5, 17, 1, 11, 30]), [14, 3, 20, 9, 12], GREEDY, ignore_eos=True)
    want = EagerEngine(kv_reference_model.model, 0, None, kv_reference_model.device).generate(spec).tokens
    tiny = models.load_model("tiny", "cpu", "float32")
    fast = FastEngine(tiny.model, 0, None, tiny.device, context_length=tiny.context_length, kv_cache="fp8-reference")
    assert fast.generate(spec).tokens == want
    assert fast.caches.by_batch[8].k[0].dtype == FP8
    plain = FastEngine(tiny.model, 0, None, tiny.device, context_length=tiny.context_length)
    assert plain.generate(spec).tokens != want  # the rounding changes something


@pytest.mark.parametrize("join_tokens", [JOIN_GRAPH_TOKENS, 0])
def test_a_continuous_batch_on_an_fp8_cache_gives_each_request_its_tokens_alone(join_tokens):
    """Guards against packed (or eager) joins writing fp8 K/V to the wrong row or slot, or a decode step
    of a continuous batch reading another row's: every request's greedy tokens equal its own run alone on
    the same fp8 cache."""
    from tests.server.test_continuous import mixed_requests, run_continuous

    tiny = models.load_model("tiny", "cpu", "float32")
    fast = FastEngine(tiny.model, 0, None, tiny.device, context_length=tiny.context_length,
                      kv_cache="fp8-reference", join_tokens=join_tokens)
    requests = mixed_requests()
    alone = {k: fast.generate(s).tokens for k, s in requests.items()}
    outputs, streamed, _ = run_continuous(fast.session(4, 64, GREEDY, ignore_eos=True), requests)
    for key in requests:
        assert outputs[key].tokens == alone[key] == streamed[key], key


def test_an_fp8_cache_on_the_tensor_parallel_path_gives_the_unsharded_tokens():
    """A FairScale-sharded rank (world 1 here) on its slices, through ``make_engine`` as a shard's rank
    builds its engine: an fp8 cache gives the unsharded engine's tokens on its own fp8 cache."""
    from llmwatts.server.host import make_engine
    from llmwatts.server.tp import load_sharded
    from tests.server.test_fast_engine import one_rank_model_parallel

    spec = BatchSpec(prompts([5, 12]), [6, 9], GREEDY, ignore_eos=True)
    tiny = models.load_model("tiny", "cpu", "float32")
    want = FastEngine(tiny.model, 0, None, tiny.device, kv_cache="fp8-reference").generate(spec).tokens
    with one_rank_model_parallel():
        loaded, _ = load_sharded("tiny", torch.device("cpu"), torch.float32, 0, 0, 1)
        fast = make_engine("fast", loaded, kv_cache="fp8-reference")
        assert {layer.mode for layer in fast.layers} == {"tp"} and fast.caches.kv_dtype == FP8
        assert fast.generate(spec).tokens == want


def test_an_fp8_cache_holds_a_quarter_of_fp32s_bytes_and_its_writes_are_e4m3():
    tiny = models.load_model("tiny", "cpu", "float32")
    fp8 = FastEngine(tiny.model, 0, None, tiny.device, kv_cache="fp8-reference").workspace(8, 100)
    plain = FastEngine(tiny.model, 0, None, tiny.device).workspace(8, 100)
    assert fp8.k[0].shape == plain.k[0].shape and fp8.nbytes * 4 == plain.nbytes
    cache = torch.zeros(2, 3, 8, 4, dtype=FP8)
    value = torch.randn(2, 3, 1, 4) * 100
    target, bits = stored(cache, value)
    target.index_copy_(2, torch.tensor([5]), bits)
    assert torch.equal(cache[:, :, 5:6].float(), rounded(value)) and not cache[:, :, :5].float().any()


def test_an_fp8_cache_is_refused_in_one_line_where_it_cannot_run(monkeypatch):
    tiny = models.load_model("tiny", "cpu", "float32")
    with pytest.raises(InvalidArgument, match=r"^--kv-cache fp8 needs an FP8 GPU .* use --kv-cache fp16$"):
        FastEngine(tiny.model, 0, None, tiny.device, kv_cache="fp8")
    with pytest.raises(InvalidArgument, match=r"^unknown KV cache 'int4'"):
        FastEngine(tiny.model, 0, None, tiny.device, kv_cache="int4")
    with pytest.raises(InvalidArgument, match=r"not bmm: unset LLMWATTS_FAST_ATTENTION"):
        FastEngine(tiny.model, 0, None, tiny.device, kv_cache="fp8", attention="bmm")
    from llmwatts.server.host import make_engine

    with pytest.raises(InvalidArgument, match=r"^unknown KV cache 'bogus'"):
        make_engine("eager", tiny, kv_cache="bogus")  # not "needs the fast engine": the value is the mistake
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    from llmwatts.server.engine.attention import check_kv_cache

    with pytest.raises(InvalidArgument, match=r"A100-SXM4-80GB is 8.0: use --kv-cache fp16$"):
        check_kv_cache("fp8", torch.device("cuda"), "sdpa")
    assert KV_CACHES == ("fp16", "fp8")


@pytest.mark.parametrize("flags, fragment", [
    (["--kv-cache", "fp8"], "--kv-cache fp8 needs an FP8 GPU"),                 # auto picks the fast engine
    (["--kv-cache", "fp8", "--engine", "eager"], "--kv-cache fp8 needs the fast engine"),
    (["--kv-cache", "int8"], "invalid choice: 'int8'"),
])
def test_the_serve_flag_is_refused_in_one_line_on_a_cpu(tmp_path, flags, fragment):
    run = subprocess.run([sys.executable, "-m", "llmwatts.cli", "serve", "--model", "tiny", "--device", "cpu",
                          "--port", "0", "--db", str(tmp_path / "s.db"), *flags],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert fragment in run.stderr and "Traceback" not in run.stderr
    assert len(lines) == 1 or fragment.startswith("invalid choice"), lines


def test_a_server_on_an_fp8_cache_serves_and_names_it_in_its_dtype(tmp_path):
    """The server's dtype (ServerInfo.dtype, servers.dtype: how a study tells servers apart) names the fp8
    cache, and a request through gRPC gets the engine's own tokens."""
    from llmwatts.v1 import llmwatts_pb2 as pb
    from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc
    from tests.conftest import db_of, start_server

    srv, port = start_server(tmp_path, kv_cache="fp8-reference", engine="fast")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = pb_grpc.ControlStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
            assert info.dtype == "float32+fp8-kv"
            reply = pb_grpc.InferenceStub(channel).Generate(
                pb.GenerateRequest(request_id="r1", run_id="run", prompts=["hello there"], max_new_tokens=6,
                                   sampling=pb.SamplingParams(greedy=True), ignore_eos=True,
                                   return_token_ids=True), timeout=60)
        ids = srv.host.loaded.tokenizer("hello there")["input_ids"]
        want = srv.host.engine.generate(BatchSpec([ids], [6], GREEDY, ignore_eos=True)).tokens[0]
        assert list(reply.completions[0].token_ids) == want
        assert [r["dtype"] for r in db_of(srv)["servers"].rows] == ["float32+fp8-kv"]
    finally:
        srv.stop(1)


if __name__ == "__main__":  # the child of ``interpreted``
    print(json.dumps(interpreter_checks()))
