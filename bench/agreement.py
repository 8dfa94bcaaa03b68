"""Teacher-forced argmax agreement of an engine with eager (imported by ``engine.py`` as a sibling module)."""

import torch

from llmwatts.server.models import materialize_buffers, meta_model


class AgreementCheck:
    """Teacher-forced next-token argmax over ``n`` random 256-token sequences: eager as ``generate``
    computes it (one token at a time, dynamic cache; the sequences batched), eager's full forward, and any
    engine's ``teacher_forced_argmax``. Eager's logits are kept, so every disagreement comes with eager's
    logit gap between its own choice and the engine's: near-ties (random weights) show as small gaps."""

    def __init__(self, model, device: torch.device, n: int, length: int = 256):
        g = torch.Generator().manual_seed(1)
        self.seqs = torch.randint(3, model.config.vocab_size, (n, length), generator=g)
        self.positions = n * length
        x, past, steps = self.seqs.to(device), None, []
        with torch.inference_mode():
            for t in range(length):
                out = model(input_ids=x[:, t:t + 1], past_key_values=past, use_cache=True)
                past = getattr(out, "past_key_values", None) or getattr(out, "cache", None)
                steps.append(out.logits[:, -1].float())
            self.logits = torch.stack(steps, 1)                                 # [n, length, V]
            self.ref = self.logits.argmax(-1)
            self.full = model(x).logits.argmax(-1)
            # Exact arithmetic on the same weights: the fp16 weights upcast, one fp32 full forward. How often
            # each fp16 path (eager's two, the engine's) picks the exact argmax says which rounds more.
            exact = meta_model(model.config, torch.float32)
            exact.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=False, assign=True)
            materialize_buffers(exact, device)
            self.exact = exact(x).logits.argmax(-1)
            del exact
        top2 = self.logits.topk(2, dim=-1).values
        self.median_top2_gap = (top2[..., 0] - top2[..., 1]).median().item()

    def predict(self, engine) -> torch.Tensor:
        return torch.tensor([engine.teacher_forced_argmax(s) for s in self.seqs.tolist()], device=self.ref.device)

    def rate(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return (a == b).float().mean().item()

    def gaps(self, pred: torch.Tensor) -> list[float]:
        """Eager's logit of its argmax minus its logit of ``pred``'s token, where they differ (ascending)."""
        gap = self.logits.gather(-1, self.ref[..., None]) - self.logits.gather(-1, pred[..., None])
        return sorted(gap[..., 0][pred != self.ref].tolist())

    def record(self, results: dict, suffix: str, engine) -> torch.Tensor:
        """The engine's agreement and gaps into ``results`` (keys ``agreement{suffix}...``); its argmax."""
        pred = self.predict(engine)
        if not suffix:
            results["agreement_positions"] = self.positions
            results["agreement_median_top2_gap"] = self.median_top2_gap
        results[f"agreement{suffix}"] = self.rate(self.ref, pred)
        results[f"agreement{suffix}_gaps"] = self.gaps(pred)
        return pred


def fmt_gaps(gaps: list[float]) -> str:
    return "(none)" if not gaps else f"max {max(gaps):.3f} over {len(gaps)}"
