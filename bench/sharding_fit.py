"""What fits on a GPU for bench/sharding.py: fp16 weights + KV cache per GPU, and ``max`` in ``--batches``
resolved to the largest batch that fits."""

from __future__ import annotations

from sharding_procs import log

# What ``max`` in --batches may resolve to: the fast engine's batch buckets above 64.
MAX_BATCH_CANDIDATES = (96, 128, 160, 192, 256, 320, 384, 512)
# fits() rounds prompt + new tokens up to this many KV-cache slots.
KV_SLOT_ROUNDING = 128


def preset_shape(model: str) -> tuple[int, int, int]:
    """(parameters (untied embeddings), layers, K/V width) of a preset, from its config alone."""
    from llmwatts.server.models import preset_config

    c = preset_config(model)
    h, kv_dim = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * c.intermediate_size + 2 * h  # q,o; k,v; MLP; norms
    return c.num_hidden_layers * per_layer + 2 * c.vocab_size * h + h, c.num_hidden_layers, kv_dim


def fits(model: str, shards: int, batch: int, seq_tokens: int, gpu_bytes: int) -> bool:
    """fp16 weights + KV cache (``seq_tokens`` rounded up to ``KV_SLOT_ROUNDING``), both split over the
    shards (tensor parallel splits the heads), under 0.9 × ``gpu_bytes`` per GPU."""
    n_params, n_layers, kv_dim = preset_shape(model)
    seq_slots = -(-seq_tokens // KV_SLOT_ROUNDING) * KV_SLOT_ROUNDING
    kv_bytes = 2 * 2 * n_layers * kv_dim * batch * seq_slots  # K and V, fp16
    return (2 * n_params + kv_bytes) / shards < 0.9 * gpu_bytes


def resolve_batches(tokens: list[str], model: str, shards: int, seq_tokens: int, gpu_bytes: int) -> list[int]:
    """``tokens`` (ints and ``max``) as batch sizes for (model, shards); ``max`` dropped when the largest
    candidate that fits is not above the other sizes."""
    fixed = [int(t) for t in tokens if t != "max"]
    out = []
    for t in tokens:
        if t != "max":
            out.append(int(t))
            continue
        fitting = [b for b in MAX_BATCH_CANDIDATES if fits(model, shards, b, seq_tokens, gpu_bytes)]
        if fitting and fitting[-1] > max(fixed, default=0):
            out.append(fitting[-1])
            log(f"{model} x{shards}: max batch = {fitting[-1]}")
        else:
            log(f"{model} x{shards}: max batch dropped (largest fitting: {fitting[-1] if fitting else 'none'})")
    return out
