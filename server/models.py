"""Model loading: HF checkpoints and random-weight presets of the real LLaMA-1 shapes.

Random presets are built on the meta device and materialised tensor by tensor, directly on the target
device in the target dtype (no fp32 CPU copy of a 13B model). Their values come from
``weights.tiled_normal``, which gives the same numbers for any slice of a tensor, so a sharded rank
materialises exactly its slice of the model an unsharded server would have.
"""

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from llmwatts.errors import InvalidArgument, NotFound
from llmwatts.server import weights
from llmwatts.server.engine import fp8
from llmwatts.server.engine.parallel import TensorParallel
from llmwatts.server.tokenizer import llama_like_tokenizer

log = logging.getLogger(__name__)

# LLaMA-1 shapes (Touvron et al. 2023, table 2); vocab 32000, context 2048.
PRESETS: dict[str, dict] = {
    # tiny: 8 heads of 16 so that CPU tests can shard it up to 8 ways (head, vocab and MLP splits all divide).
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=8),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "llama-65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64),
}
DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    name: str               # preset name or checkpoint path
    random_weights: bool
    context_length: int
    eos_token_id: int | None
    device: torch.device
    dtype: torch.dtype
    parallel: TensorParallel | None = None  # a sharded rank's slice: how its engine joins the other ranks
    weights: str = "fp16"                    # "fp16" (the dtype as it is) or "fp8" (``fp8.Fp8Linear`` projections)


@dataclass(frozen=True)
class FusedProjections:
    """A decoder layer's q/k/v and gate/up weights stacked along their output rows (one matmul each), as
    gpt-fast's checkpoint conversion stacks ``wqkv``; the modules' own weights are views of these rows."""

    wqkv: torch.Tensor              # [n_q + 2 n_kv, E] (this rank's rows of each, when sharded)
    bqkv: torch.Tensor | None
    wgu: torch.Tensor               # [2 n_inter, E]
    bgu: torch.Tensor | None
    n_q: int
    n_kv: int
    n_inter: int
    world: int = 1                  # ranks the layer is split over (1: whole)
    sqkv: torch.Tensor | None = None  # fp8 weights: the stacked per-channel scales [n_q + 2 n_kv]
    sgu: torch.Tensor | None = None   # [2 n_inter]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InvalidArgument(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(f"device {device!r} asked for, but no CUDA GPU is visible: use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidArgument(f"unknown dtype {dtype!r}: use auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def preset_config(name: str) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False, **PRESETS[name],
    )


def meta_model(config: LlamaConfig, dtype: torch.dtype) -> LlamaForCausalLM:
    """The model's structure with no storage: every parameter on the meta device."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_projection(name: str) -> bool:
    """A decoder layer's projection weight (what ``--weights fp8`` stores in fp8)."""
    return name.endswith(".weight") and name.rpartition(".")[0].rpartition(".")[2] in PROJECTIONS


def to_fp8(model: torch.nn.Module, module_name: str, value: torch.Tensor, reduce_amax=None) -> None:
    """Quantize ``value`` (the weight of ``module_name``) to fp8 with per-channel scales, in place of the
    module's weight: an ``nn.Linear`` becomes an ``fp8.Fp8Linear``; any other (a sharded rank's FairScale
    layer) keeps its class and gains ``scale`` (only the fast engine runs it). ``reduce_amax``:
    ``fp8.quantize_weight``'s, for a slice of a row-parallel weight."""
    w_q, scale = fp8.quantize_weight(value, reduce_amax)
    module = model.get_submodule(module_name)
    if type(module) is torch.nn.Linear:
        parent, _, attr = module_name.rpartition(".")
        setattr(model.get_submodule(parent), attr, fp8.Fp8Linear(w_q, scale, module.bias))
    else:
        module.weight = torch.nn.Parameter(w_q, requires_grad=False)
        module.scale = torch.nn.Parameter(scale, requires_grad=False)


def quantize_projections(model: torch.nn.Module, reduce_amax=None) -> None:
    """Every decoder projection of a loaded model to fp8 (a checkpoint: it was loaded first).
    ``reduce_amax(name)``: the ``fp8.quantize_weight`` hook for the weight ``name`` (sharding), or None."""
    for name, param in list(model.named_parameters()):
        if is_projection(name) and param.dtype != fp8.FP8:
            to_fp8(model, name.rpartition(".")[0], param.detach(), reduce_amax and reduce_amax(name))


def materialize_random(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int,
                       slices: dict[str, tuple[slice, slice]] | None = None, weights_fp8: bool = False,
                       reduce_amax=None) -> None:
    """Give every meta parameter storage on ``device``: norms 1, everything else N(0, 0.02) from
    ``weights.tiled_normal``. ``slices`` maps a parameter name to the (rows, cols) of the full tensor
    that this rank holds (sharding); absent names are whole. ``weights_fp8``: each projection is quantized
    as soon as it is drawn (``to_fp8``), so no more than one full-precision projection exists at a time."""
    slices = slices or {}
    for name, param in list(model.named_parameters()):
        if name.endswith("norm.weight"):
            value = torch.ones(param.shape, device=device, dtype=dtype)
        else:
            full_shape = getattr(param, "full_shape", tuple(param.shape))
            rows, cols = slices.get(name, (slice(None), slice(None)))
            value = weights.tiled_normal(name, full_shape, seed=seed, std=0.02, rows=rows, cols=cols,
                                         device=device, dtype=dtype)
            assert value.shape == param.shape, (name, value.shape, param.shape)
        module_name, _, attr = name.rpartition(".")
        if weights_fp8 and is_projection(name):
            to_fp8(model, module_name, value, reduce_amax and reduce_amax(name))
            del value
            continue
        setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(value, requires_grad=False))
    materialize_buffers(model, device)


def materialize_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Buffers (rotary inv_freq) are computed, not loaded: rebuild the modules holding meta buffers on
    ``device``."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            with torch.device(device):
                rebuilt = type(module)(config=module.config)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, rebuilt)


def _stack(linears, attr: str) -> torch.Tensor | None:
    """Copy each module's ``attr`` (weight, bias or fp8 scale) into one tensor, rows in order, and re-point
    the module's own at its rows of it: no extra memory once the originals are freed. A missing bias
    among present ones stacks as zeros; None when no module has one."""
    parts = [getattr(m, attr, None) for m in linears]
    present = [p for p in parts if p is not None]
    if not present:
        return None
    rows = [m.weight.shape[0] for m in linears]
    fused = present[0].new_zeros((sum(rows), *present[0].shape[1:]))
    at = 0
    for m, part, n in zip(linears, parts, rows):
        if part is not None:
            fused[at:at + n].copy_(part.detach())
            setattr(m, attr, torch.nn.Parameter(fused[at:at + n], requires_grad=False))
        at += n
    return fused


def fuse_projections(model: torch.nn.Module, world: int = 1) -> torch.nn.Module:
    """Stack every decoder layer's q/k/v and gate/up projections (``FusedProjections``, kept on the layer
    as ``fused_projections``), once, after the weights are loaded: the fast engine runs each as one
    matmul; the eager engine still runs the modules. LLaMA-like layers only; others are left alone."""
    for layer in getattr(getattr(model, "model", None), "layers", []):
        a, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if getattr(layer, "fused_projections", None) is not None or not all(
                hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj")) or not all(
                hasattr(mlp, n) for n in ("gate_proj", "up_proj")):
            continue
        n_q, n_kv, n_inter = a.q_proj.weight.shape[0], a.k_proj.weight.shape[0], mlp.gate_proj.weight.shape[0]
        qkv, gu = (a.q_proj, a.k_proj, a.v_proj), (mlp.gate_proj, mlp.up_proj)
        layer.fused_projections = FusedProjections(
            _stack(qkv, "weight"), _stack(qkv, "bias"), _stack(gu, "weight"), _stack(gu, "bias"), n_q, n_kv,
            n_inter, world, sqkv=_stack(qkv, "scale"), sgu=_stack(gu, "scale"))
    return model


def load_model(spec: str, device: str = "auto", dtype: str = "auto", seed: int = 0,
               weights_precision: str = "fp16") -> LoadedModel:
    """Load a preset (random weights) or a HF checkpoint (directory or hub id). ``weights_precision``:
    "fp16" keeps ``dtype``; "fp8" stores the decoder projections in fp8 (an FP8 GPU only; presets quantize
    each tensor as it is drawn); "fp8-reference" the same on any device, for tests (``fp8.py``)."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    fp8.check_fp8_device(dev, weights_precision)
    quantized = weights_precision != "fp16"
    if spec in PRESETS:
        config = preset_config(spec)
        model = meta_model(config, torch_dtype)
        materialize_random(model, dev, torch_dtype, seed, weights_fp8=quantized)
        fuse_projections(model)
        return LoadedModel(model, llama_like_tokenizer(), spec, True, config.max_position_embeddings,
                           config.eos_token_id, dev, torch_dtype, weights=weights_precision)
    loaded = load_checkpoint(spec, dev, torch_dtype, weights_fp8=quantized)
    loaded.weights = weights_precision
    return loaded


def check_model_spec(spec: str) -> None:
    """Refuse at once (no hub round trips) a ``--model`` that is neither a preset, a checkpoint directory
    nor a hub id (``org/name``): a mistyped preset such as ``llama-3b`` must not cost retries offline."""
    if spec in PRESETS or Path(spec).expanduser().is_dir():
        return
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "~", "/")) and all(spec.split("/"))
    if looks_like_hub_id and not Path(spec).expanduser().exists():
        return
    close = difflib.get_close_matches(spec, PRESETS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise NotFound(f"model {spec!r} is neither a preset ({', '.join(PRESETS)}), a checkpoint directory nor a "
                   f"hub id (org/name): {hint}pass a preset name or a folder holding config.json")


def checkpoint_tokenizer(source: str, local_files_only: bool) -> PreTrainedTokenizerBase:
    """A checkpoint's tokenizer with its quirks fixed at load time: LLaMA ships no pad token (unk, else
    eos, pads), and batches pad on the left so every row's last token is its newest."""
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_checkpoint(spec: str, dev: torch.device, torch_dtype: torch.dtype,
                    weights_fp8: bool = False) -> LoadedModel:
    check_model_spec(spec)
    path = Path(spec).expanduser()
    local = path.is_dir()
    source = str(path) if local else spec
    # Read at call time (huggingface_hub reads it once at import): offline means no network attempt.
    files_only = local or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        tokenizer = checkpoint_tokenizer(source, local_files_only=files_only)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=files_only,
                                                     device_map=str(dev) if dev.type == "cuda" else None)
    except (OSError, ValueError) as e:
        if local:
            raise InvalidArgument(f"cannot load the checkpoint in {source}: {str(e).splitlines()[0]}") from e
        raise NotFound(
            f"model {spec!r} is not a preset ({', '.join(PRESETS)}) nor a local checkpoint directory, and "
            f"could not be fetched from the Hugging Face hub (offline?): download it elsewhere with "
            f"`huggingface-cli download {spec} --local-dir DIR`, copy DIR here and pass --model DIR"
        ) from e
    model = model.to(dev).eval()
    if weights_fp8:
        quantize_projections(model)
    fuse_projections(model)
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id
    return LoadedModel(model, tokenizer, source, False, context, eos, dev, torch_dtype)
