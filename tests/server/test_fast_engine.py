"""The fast engine (static cache, separate prefill/decode) against transformers' generate, on CPU in fp32.

Greedy tokens must be identical: the fast engine replays the decoder layer's own ops, so any mismatch is
a bug in padding, positions, masks or the cache (the bugs these tests guard against).
"""

import contextlib
import socket

import pytest
import torch

from llmwatts.server.engine import CACHE_SLOTS, WINDOW_SLOTS, BatchSpec, EagerEngine, FastEngine, Sampling
from llmwatts.server.models import load_model

GREEDY = Sampling(greedy=True)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", "cpu", "float32")


def engines(tiny, eos):
    pad = tiny.tokenizer.pad_token_id
    return (EagerEngine(tiny.model, pad, eos, tiny.device),
            FastEngine(tiny.model, pad, eos, tiny.device, context_length=tiny.context_length))


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 32000, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("lengths,limits", [
    ([7], [9]),                                 # batch 1
    ([5, 17, 1, 11], [8, 3, 10, 6]),            # mixed prompt lengths and per-sequence limits, padded to 4
    ([WINDOW_SLOTS - 3, 2], [7, 7]),            # decode crosses an attention-window boundary
])
def test_greedy_tokens_equal_eager_exactly(tiny, lengths, limits):
    eager, fast = engines(tiny, tiny.eos_token_id)
    spec = BatchSpec(prompts(lengths), limits, GREEDY, ignore_eos=True)
    want, got = eager.generate(spec), fast.generate(spec)
    assert got.tokens == want.tokens
    assert [len(t) for t in got.tokens] == limits
    assert got.finish_reasons == ["length"] * len(lengths)
    assert all(ws.cache_len % CACHE_SLOTS == 0 for ws in fast.caches.by_batch.values())  # the static cache ran


def test_eos_stops_each_sequence_like_eager(tiny):
    spec = BatchSpec(prompts([6, 9, 3], seed=1), [10, 10, 10], GREEDY, ignore_eos=True)
    free = EagerEngine(tiny.model, tiny.tokenizer.pad_token_id, None, tiny.device).generate(spec)
    eos = free.tokens[1][3]  # a token greedy decoding really produces: sequence 1 stops at step 3 (or before)
    eager, fast = engines(tiny, eos)
    spec.ignore_eos = False
    want, got = eager.generate(spec), fast.generate(spec)
    assert got.tokens == want.tokens
    assert got.finish_reasons == want.finish_reasons
    assert got.finish_reasons[1] == "eos" and len(got.tokens[1]) <= 3
    assert eos not in got.tokens[1]


def test_every_step_streams_each_sequences_new_token_and_paces(tiny):
    _, fast = engines(tiny, tiny.eos_token_id)
    spec = BatchSpec(prompts([4, 8]), [5, 2], GREEDY, ignore_eos=True)
    steps, paced = [], []
    out = fast.generate(spec, on_step=lambda i, d: steps.append((i, d)), pace=paced.append)
    assert [i for i, _ in steps] == list(range(5))
    streamed = [[t for _, d in steps for t in d[k]] for k in range(2)]
    assert streamed == out.tokens
    assert steps[2][1][1] == []  # sequence 1 finished after 2 tokens: nothing more streamed for it
    assert len(paced) == 5 and all(s >= 0 for s in paced)


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(tiny):
    _, fast = engines(tiny, tiny.eos_token_id)
    ps = prompts([5, 9])
    sampled = BatchSpec(ps, [6, 6], Sampling(temperature=0.8, top_p=0.95, seed=7), ignore_eos=True)
    a, b = fast.generate(sampled), fast.generate(sampled)
    assert a.tokens == b.tokens
    nucleus_of_one = BatchSpec(ps, [6, 6], Sampling(temperature=0.8, top_p=1e-6, seed=3), ignore_eos=True)
    assert fast.generate(nucleus_of_one).tokens == fast.generate(BatchSpec(ps, [6, 6], GREEDY, ignore_eos=True)).tokens


def test_teacher_forced_argmax_matches_a_full_forward(tiny):
    _, fast = engines(tiny, tiny.eos_token_id)
    seq = prompts([40], seed=2)[0]
    with torch.inference_mode():
        want = tiny.model(torch.tensor([seq])).logits[0].argmax(-1).tolist()
    assert fast.teacher_forced_argmax(seq) == want


def test_too_long_for_the_context_is_refused(tiny):
    _, fast = engines(tiny, tiny.eos_token_id)
    with pytest.raises(ValueError, match="context"):
        fast.generate(BatchSpec(prompts([10]), [tiny.context_length], GREEDY, ignore_eos=True))


def test_qkv_and_gate_up_are_fused_at_load_into_one_tensor_the_modules_view(tiny):
    """q/k/v and gate/up are stacked when the model loads (``models.fuse_projections``), not by the engine:
    the modules' weights are rows of the stack (the model did not grow, eager runs the same numbers), and
    making an engine changes nothing in the model."""
    from llmwatts.server.models import load_model as load

    fresh = load("tiny", "cpu", "float32")
    params = {n: p.data_ptr() for n, p in fresh.model.named_parameters()}
    layer = FastEngine(fresh.model, fresh.tokenizer.pad_token_id, None, fresh.device).layers[0]
    assert {n: p.data_ptr() for n, p in fresh.model.named_parameters()} == params  # the engine mutated nothing
    a, mlp = layer.module.self_attn, layer.module.mlp
    assert layer.mode == "plain"
    assert layer.wqkv is layer.module.fused_projections.wqkv
    assert layer.wqkv.shape[0] == a.q_proj.weight.shape[0] + a.k_proj.weight.shape[0] + a.v_proj.weight.shape[0]
    assert a.q_proj.weight.data_ptr() == layer.wqkv.data_ptr()
    assert a.v_proj.weight.data_ptr() == layer.wqkv[layer.n_q + layer.n_kv:].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == layer.wgu[layer.n_inter:].data_ptr()
    unfused = {n: p for n, p in load("tiny", "cpu", "float32").model.named_parameters()}
    assert sum(p.numel() for p in fresh.model.parameters()) == sum(p.numel() for p in unfused.values())


def test_an_unfused_model_runs_its_modules_and_a_slice_needs_its_ranks(tiny):
    """A LLaMA whose projections were not fused at load runs its modules (uncompiled), with eager's tokens;
    a layer fused on one slice of a sharded model refuses to run without the ranks' all-reduce (it would
    silently give a rank's partial sums)."""
    import dataclasses

    from llmwatts.server.models import materialize_random, meta_model, preset_config

    model = meta_model(preset_config("tiny"), torch.float32)
    materialize_random(model, torch.device("cpu"), torch.float32, seed=0)
    fast = FastEngine(model, tiny.tokenizer.pad_token_id, None, tiny.device)
    assert {layer.mode for layer in fast.layers} == {"module"}
    eager, _ = engines(tiny, None)
    spec = BatchSpec(prompts([5, 12]), [6, 6], GREEDY, ignore_eos=True)
    assert fast.generate(spec).tokens == eager.generate(spec).tokens
    layer = tiny.model.model.layers[0]
    fused = layer.fused_projections
    layer.fused_projections = dataclasses.replace(fused, world=2)
    try:
        with pytest.raises(ValueError, match="slice of 2 ranks"):
            FastEngine(tiny.model, tiny.tokenizer.pad_token_id, None, tiny.device)
    finally:
        layer.fused_projections = fused


def test_compiled_layers_give_eagers_greedy_tokens(tiny):
    """The compiled path (the default on CUDA; here inductor's CPU backend, ~30 s): the layer functions
    fused by torch.compile, the cache writes among them (inductor writes the cache in place), still give
    eager's tokens, across padding, a window boundary, one-token prompts and a longer cache; compiled
    once per batch bucket, not per cache length."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # compiled code is cached per function, across engines: count from a clean slate
    eager, _ = engines(tiny, None)
    fast = FastEngine(tiny.model, tiny.tokenizer.pad_token_id, None, tiny.device, compile=True)
    assert fast.compiled
    graphs = counters["stats"]["unique_graphs"]
    spec = BatchSpec(prompts([5, 17, 1, 11]), [8, 3, 40, 6], GREEDY, ignore_eos=True)
    assert fast.generate(spec).tokens == eager.generate(spec).tokens
    spec = BatchSpec(prompts([1, 1]), [5, 4], GREEDY, ignore_eos=True)
    assert fast.generate(spec).tokens == eager.generate(spec).tokens
    # Static shapes: the two layer functions compile once per batch bucket (4, then 2) ...
    assert counters["stats"]["unique_graphs"] - graphs == 4
    # ... and not again when the same bucket needs a longer cache (64 -> 128 slots).
    spec = BatchSpec(prompts([5, 17, 2, 11]), [8, 3, 90, 6], GREEDY, ignore_eos=True)
    assert fast.generate(spec).tokens == eager.generate(spec).tokens
    assert fast.caches.by_batch[4].cache_len == 128
    assert counters["stats"]["unique_graphs"] - graphs == 4


def test_prefill_in_row_chunks_gives_eagers_greedy_tokens(tiny):
    """Prefill over a few rows at a time (what bounds its memory at large batches) fills the same caches:
    eager's tokens, with chunks of one row and of three rows (the last one short)."""
    eager, _ = engines(tiny, None)
    spec = BatchSpec(prompts([5, 17, 1, 11, 9]), [8, 3, 12, 6, 5], GREEDY, ignore_eos=True)  # bucket 8, width 17
    want = eager.generate(spec).tokens
    for prefill_tokens, rows in ((17, 1), (51, 3)):  # 8 rows: chunks of 1, and of 3, 3 and 2
        fast = FastEngine(tiny.model, tiny.tokenizer.pad_token_id, None, tiny.device, prefill_tokens=prefill_tokens)
        assert fast.caches.prefill_rows(17) == rows
        assert fast.generate(spec).tokens == want
    with pytest.raises(ValueError, match="prefill_tokens must be positive, got 0"):
        FastEngine(tiny.model, 0, None, tiny.device, prefill_tokens=0)


@pytest.mark.parametrize("attention,window_slots", [("bmm", 16), ("flex", 16), ("sdpa", 32), ("sdpa", 64)])
def test_decode_attention_variants_give_eagers_greedy_tokens(tiny, attention, window_slots):
    eager, _ = engines(tiny, tiny.eos_token_id)
    fast = FastEngine(tiny.model, tiny.tokenizer.pad_token_id, tiny.eos_token_id, tiny.device, attention=attention,
                      window_slots=window_slots)
    # Mixed lengths (padding masked per row) and a run past a 64-slot block boundary (flex's block mask).
    spec = BatchSpec(prompts([5, 17, 1, 11]), [8, 3, 60, 6], GREEDY, ignore_eos=True)
    assert fast.generate(spec).tokens == eager.generate(spec).tokens
    # One-token prompts: the prefill is one position wide and must still take the prefill path.
    spec = BatchSpec(prompts([1, 1]), [5, 5], GREEDY, ignore_eos=True)
    assert fast.generate(spec).tokens == eager.generate(spec).tokens
    with pytest.raises(ValueError, match="unknown attention 'flash': use one of sdpa, bmm, flex"):
        FastEngine(tiny.model, 0, None, tiny.device, attention="flash")
    with pytest.raises(ValueError, match="window_slots must divide 64, got 48"):
        FastEngine(tiny.model, 0, None, tiny.device, window_slots=48)


def test_fairscale_layers_run_the_functional_tensor_parallel_path(tiny):
    """A FairScale-sharded model (world 1 here; 2, 4 and 8 ranks run in tests/server/test_sharding.py) is
    not a black box of modules: the engine runs its slices through the same functions, all-reducing
    after o and down through the ``TensorParallel`` tp.py hands it, and gives the unsharded eager tokens."""
    from llmwatts.server.tp import load_sharded

    with one_rank_model_parallel():
        loaded, _ = load_sharded("tiny", torch.device("cpu"), torch.float32, 0, 0, 1)
        fast = FastEngine(loaded.model, loaded.tokenizer.pad_token_id, None, loaded.device, parallel=loaded.parallel)
        assert {layer.mode for layer in fast.layers} == {"tp"}
        assert loaded.parallel.world == 1
        eager, _ = engines(tiny, None)
        spec = BatchSpec(prompts([5, 12]), [6, 6], GREEDY, ignore_eos=True)
        assert fast.generate(spec).tokens == eager.generate(spec).tokens


@contextlib.contextmanager
def one_rank_model_parallel():
    """A gloo process group of one rank, FairScale's model-parallel groups on it (world 1)."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel.initialize import destroy_model_parallel, initialize_model_parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        initialize_model_parallel(1, model_parallel_backend="gloo")
        yield
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()


def test_rows_with_different_seeds_sample_as_each_would_alone(tiny):
    """Issue 17 defect 2: a batch sampled from one global generator seeded once, so requests with different
    seeds (the default load) could never share a batch. Each row's noise is keyed by its own request's
    seed and its index there: merged into one static batch, or joining a continuous session, a request
    samples exactly the tokens it samples alone."""
    from llmwatts.server.engine.sampling import row_keys

    _, fast = engines(tiny, tiny.eos_token_id)
    ps = prompts([5, 9, 3, 12], seed=4)
    sampling = {s: Sampling(temperature=0.8, top_p=0.95, seed=s) for s in (7, 11, 13)}
    alone = {7: BatchSpec(ps[0:2], [8, 8], sampling[7], ignore_eos=True),
             11: BatchSpec(ps[2:3], [8], sampling[11], ignore_eos=True),
             13: BatchSpec(ps[3:4], [5], sampling[13], ignore_eos=True)}
    want = {s: fast.generate(spec).tokens for s, spec in alone.items()}
    assert want[7][0] != fast.generate(BatchSpec(ps[0:1], [8], GREEDY, ignore_eos=True)).tokens[0]  # it samples
    assert fast.generate(alone[7]).tokens == want[7]                                                  # repeatably
    merged = BatchSpec([p for s in alone.values() for p in s.prompts], [8, 8, 8, 5], sampling[7], ignore_eos=True,
                       keys=[k for s, spec in alone.items() for k in row_keys(s, len(spec.prompts))])
    got = fast.generate(merged).tokens
    assert [got[0:2], got[2:3], got[3:4]] == [want[7], want[11], want[13]]
    session = fast.session(4, 64, sampling[7], ignore_eos=True)
    assert all(session.fits(spec) for spec in alone.values())
    session.admit({7: alone[7]})
    session.step()
    session.admit({11: alone[11], 13: alone[13]})  # they join a step later, beside request 7
    while session.busy:
        session.step()
    assert {s: session.pop(s).tokens for s in alone} == want
