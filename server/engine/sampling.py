"""Sampling on the device, inside the decode step (no host syncs): greedy argmax, or temperature then
nucleus (top-p) filtering as transformers' warpers do with top_k=0."""

import torch


def sample(logits: torch.Tensor, greedy: bool, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits: [B, V] fp32 -> token ids [B]. Temperature then nucleus (top-p) filtering, as generate's
    warpers do with top_k=0; the draw is argmax(p / Exp(1)) (gpt-fast), an exact categorical sample."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, sorted_ids = probs.sort(dim=-1, descending=True)
    outside = (sorted_p.cumsum(dim=-1) - sorted_p) > top_p  # the first token always stays
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    draw = (sorted_p / torch.empty_like(sorted_p).exponential_(1)).argmax(dim=-1, keepdim=True)
    return sorted_ids.gather(-1, draw).squeeze(-1)
