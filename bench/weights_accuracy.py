"""The accuracy cost of lower-precision weights (imported by ``engine.py`` as a sibling module): top-1
agreement and mean KL divergence of a model's next-token distributions against the fp16 model's with
the same (random preset) weights, over a fixed token set.

Random weights say little about real quality: their next-token distributions are nearly flat, so the
figures bound how much the arithmetic moves, not what a trained model would lose.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def fixed_tokens(n_seqs: int, length: int, seed: int = 0, vocab: int = 32000) -> torch.Tensor:
    """[n_seqs, length] token ids, the same for every run (ids 3.. : no special tokens)."""
    return torch.randint(3, vocab, (n_seqs, length), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def next_token_logits(model: torch.nn.Module, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The full forward's logits after every position, one sequence at a time -> [n, L, V] fp32 on CPU."""
    return torch.stack([model(tokens[i:i + 1].to(device)).logits[0].float().cpu() for i in range(len(tokens))])


def compare(reference: torch.Tensor, logits: torch.Tensor) -> dict:
    """Top-1 agreement and mean KL(reference || logits) in nats over every position of [n, L, V] logits."""
    ref_logp, logp = torch.log_softmax(reference, -1), torch.log_softmax(logits, -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)                         # [n, L]
    agree = (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()
    return {"positions": int(kl.numel()), "top1_agreement": agree, "mean_kl_nats": kl.mean().item(),
            "max_kl_nats": kl.max().item()}


def against_fp16(spec: str, device: torch.device, model: torch.nn.Module, n_seqs: int = 4, length: int = 256,
                 seed: int = 0) -> dict:
    """``model``'s logits (lower-precision weights of preset ``spec``) against those of the fp16 model
    loaded here (fp32 on CPU) from the same preset and seed, on ``fixed_tokens``."""
    from llmwatts.server import models

    tokens = fixed_tokens(n_seqs, length)
    low = next_token_logits(model, tokens, device)
    reference = models.load_model(spec, str(device), "float16" if device.type == "cuda" else "float32", seed)
    ref = next_token_logits(reference.model, tokens, device)
    del reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return compare(ref, low)


def other_precision(script: str, argv: list[str], precision: str, engines: str, results: dict,
                    json_path: Path | None = None) -> list[dict]:
    """The fast/server rows with ``precision`` weights, from ``script`` (``engine.py``) run with ``argv`` in a
    process of its own (argparse takes an option's last value: these override the caller's); its accuracy
    goes into ``results``. Its JSON goes beside ``json_path`` (``-fp8.json``), so a run cut short keeps it."""
    with tempfile.TemporaryDirectory() as d:
        out = json_path.with_name(f"{json_path.stem}-{precision}.json") if json_path else Path(d) / "rows.json"
        subprocess.run([sys.executable, script, *argv, "--weights", precision, "--json", str(out),
                        "--engines", engines, "--variants", "", "--telemetry-hz", "", "--no-agreement"], check=False)
        if not out.exists():
            return [{"engine": f"fast-{precision}", "batch": 0, "error": "its process wrote no results"}]
        other = json.loads(out.read_text())
    results.setdefault("weights_accuracy", {}).update(other.get("weights_accuracy", {}))
    results.setdefault("kv_accuracy", {}).update(other.get("kv_accuracy", {}))
    results["events"] += other["events"]
    return [r for r in other["rows"] if r["engine"].split("-")[0] in ("fast", "server")]


def fmt_accuracy(a: dict) -> str:
    return (f"top-1 agreement {100 * a['top1_agreement']:.2f}%, mean KL {a['mean_kl_nats']:.5f} nats (max "
            f"{a['max_kl_nats']:.4f}) over {a['positions']} positions of random weights")
