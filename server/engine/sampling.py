"""Sampling on the device, inside the decode step (no host syncs, no generator state): greedy argmax, or
temperature then nucleus (top-p) filtering as transformers' warpers do with top_k=0, drawn with noise
keyed per row.

Each row has a noise key (``row_keys``: from its request's seed and its index in the request, or random
when unseeded); the noise a row draws after position ``p`` is a counter-based hash of (key, p, token id).
So a row samples the same tokens alone or beside any other rows, in a static batch or a continuous one,
whatever their seeds: requests with different seeds share one batch (``--merge-requests``).
"""

import hashlib
import random

import torch

MASK32 = 0xFFFFFFFF


def row_keys(seed: int | None, n: int) -> list[int]:
    """The noise keys (32-bit) of a request's ``n`` sequences: with a seed, a function of (seed, sequence
    index) alone; without, random."""
    if seed is None:
        return [random.getrandbits(32) for _ in range(n)]
    return [int.from_bytes(hashlib.blake2b(f"{seed}/{k}".encode(), digest_size=4).digest(), "little")
            for k in range(n)]


def _pcg(x: torch.Tensor) -> torch.Tensor:
    """PCG hash (Jarzynski and Olano 2020) of 32-bit values held in int64 (no product overflows)."""
    state = (x * 747796405 + 2891336453) & MASK32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & MASK32
    return (word >> 22) ^ word


def exponential_noise(keys: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Exp(1) draws [B, V] fp32 for each row's tokens ``token_ids`` [B, V], from (``keys`` [B], ``positions``
    [B], token id) alone."""
    row = _pcg((keys & MASK32) ^ _pcg(positions & MASK32))                         # [B]
    bits = _pcg(_pcg(token_ids) ^ row[:, None]) >> 9                               # [B, V], 23 bits
    # u = (bits + 0.5) / 2^23 is exact in fp32 (24 significant bits) and strictly inside (0, 1): E > 0, so
    # a filtered-out token (p = 0) never draws 0 / 0.
    return -torch.log((bits.float() + 0.5) * (1.0 / (1 << 23)))


def sample(logits: torch.Tensor, greedy: bool, temperature: torch.Tensor, top_p: torch.Tensor,
           keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits: [B, V] fp32 -> token ids [B]. Temperature then nucleus (top-p) filtering, as generate's
    warpers do with top_k=0; the draw is argmax(p / E), E ~ Exp(1) (gpt-fast), an exact categorical
    sample, with E keyed by each row's ``keys`` [B] and the ``positions`` [B] it samples after."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, sorted_ids = probs.sort(dim=-1, descending=True)
    outside = (sorted_p.cumsum(dim=-1) - sorted_p) > top_p  # the first token always stays
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    draw = (sorted_p / exponential_noise(keys, positions, sorted_ids)).argmax(dim=-1, keepdim=True)
    return sorted_ids.gather(-1, draw).squeeze(-1)
