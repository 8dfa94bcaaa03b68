"""Model loading: preset shapes, slice-exact random weights, HF checkpoints from disk, offline errors."""

import pytest
import torch

from llmwatts.errors import InvalidArgument, NotFound
from llmwatts.server import models
from llmwatts.server.engine import BatchSpec, EagerEngine, Sampling
from llmwatts.server.tokenizer import llama_like_tokenizer
from llmwatts.server.weights import tiled_normal


@pytest.mark.parametrize("name, hidden, inter, layers, heads, billions", [
    ("llama-7b", 4096, 11008, 32, 32, 6.7), ("llama-13b", 5120, 13824, 40, 40, 13.0),
    ("llama-65b", 8192, 22016, 80, 64, 65.2),
])
def test_presets_have_llama1_shapes(name, hidden, inter, layers, heads, billions):
    config = models.preset_config(name)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.vocab_size) == (hidden, inter, layers, heads, 32000)
    model = models.meta_model(config, torch.float16)  # no storage: safe for 65B
    n = sum(p.numel() for p in model.parameters())
    assert n / 1e9 == pytest.approx(billions, rel=0.01)
    assert all(p.is_meta for p in model.parameters())


def test_tiled_normal_slices_equal_the_whole_tensor():
    full = tiled_normal("w", (2500, 3100), seed=3, std=0.02)
    part = tiled_normal("w", (2500, 3100), seed=3, std=0.02, rows=slice(1000, 2049), cols=slice(7, 3100))
    assert torch.equal(full[1000:2049, 7:3100], part)
    assert not torch.equal(full, tiled_normal("w", (2500, 3100), seed=4, std=0.02))
    assert full.std().item() == pytest.approx(0.02, rel=0.02)


def test_tiny_preset_is_deterministic_and_small():
    a = models.load_model("tiny", "cpu", "float32", seed=0)
    b = models.load_model("tiny", "cpu", "float32", seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))
    assert sum(p.numel() for p in a.model.parameters()) < 10_000_000
    assert a.random_weights and a.context_length == 2048 and a.eos_token_id == 2


def test_tokenizer_is_llama_like():
    tok = llama_like_tokenizer()
    assert len(tok) == 32000 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    text = "Give three tips for staying healthy. Ünïcödé ✓ and 42 apples"
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == text  # byte fallback round-trips
    words = "Describe the process of photosynthesis in plants and explain why it matters for life on earth".split()
    per_word = (len(tok(" ".join(words))["input_ids"]) - 1) / len(words)
    assert 1.0 <= per_word <= 2.0  # LLaMA: ~1.3 tokens per English word


def test_bad_device_and_dtype_are_clear():
    with pytest.raises(InvalidArgument, match="use auto, cpu"):
        models.resolve_device("tpu:0")
    with pytest.raises(InvalidArgument, match="unknown dtype"):
        models.resolve_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgument, match="no CUDA GPU"):
            models.resolve_device("cuda")


def test_hf_checkpoint_loads_from_a_directory_the_test_writes(tmp_path):
    tiny = models.load_model("tiny", "cpu", "float32", seed=1)
    tiny.model.save_pretrained(tmp_path / "ckpt")
    tiny.tokenizer.save_pretrained(tmp_path / "ckpt")
    loaded = models.load_model(str(tmp_path / "ckpt"), "cpu", "float32")
    assert not loaded.random_weights and loaded.tokenizer.padding_side == "left"
    spec = BatchSpec([[1, 50, 60], [1, 70]], [6, 6], Sampling(greedy=True), ignore_eos=True)
    a = EagerEngine(tiny.model, 0, 2, tiny.device).generate(spec)
    b = EagerEngine(loaded.model, loaded.tokenizer.pad_token_id, loaded.eos_token_id, loaded.device).generate(spec)
    assert a.tokens == b.tokens


def test_hub_id_offline_fails_with_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NotFound, match="huggingface-cli download"):
        models.load_model("meta-llama/Llama-2-7b-hf", "cpu")


def test_unknown_model_path_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="preset"):
        models.load_model(str(tmp_path / "no" / "such" / "dir"), "cpu")
