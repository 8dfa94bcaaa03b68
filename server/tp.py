"""Tensor parallelism for the transformers LLaMA, applied after the model is built (gpt-fast ``tp.py``).

The model code knows nothing of sharding. ``apply_tp`` swaps, on the meta device, each projection of a
``LlamaForCausalLM`` for its FairScale model-parallel twin:

- q/k/v and gate/up: ``ColumnParallelLinear`` (each rank owns a block of output rows: whole heads,
  a block of the MLP's intermediate features; no gather, the next layer takes the block as it is);
- o and down: ``RowParallelLinear`` (each rank owns the matching input columns; one all-reduce);
- the embedding: ``VocabParallelEmbedding`` (a block of vocabulary rows; one all-reduce);
- the LM head: ``ColumnParallelLinear`` over the vocabulary with ``gather_output`` (every rank gets the
  full logits, so sampling is identical everywhere).

Then each rank materialises only its slice: random presets through ``models.materialize_random(...,
slices=...)`` (``weights.tiled_normal`` gives any slice the values of the whole tensor), checkpoints by
reading ``safe_open(...).get_slice(name)[rows, cols]`` from the safetensors files. No rank ever holds a
full weight matrix. Last, q/k/v and gate/up of each rank's slice are fused (``models.fuse_projections``)
and the rank gets its ``TensorParallel`` (``tensor_parallel``): the all-reduce its engine calls after o and
down, so the engine itself imports no FairScale.

transformers' ``LlamaAttention`` reshapes with ``-1`` heads (``view(*input_shape, -1, head_dim)``) and
sizes nothing else by the head count: ``num_key_value_groups`` (q heads per kv head) is the same on a
shard as on the whole model because q and kv heads are split by the same factor, and the KV caches size
themselves from the first key tensor they see. ``check_shardable`` refuses shapes that do not split.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

from llmwatts.errors import InvalidArgument
from llmwatts.server.engine.parallel import TensorParallel

log = logging.getLogger(__name__)
Slices = dict[str, tuple[slice, slice]]  # parameter name -> (rows, cols) of the full tensor held here

COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW = ("self_attn.o_proj", "mlp.down_proj")


@dataclass
class ShardReport:
    """What one rank holds: proof that no rank materialised the full model."""

    rank: int
    world: int
    param_numel: int                  # elements this rank holds
    full_numel: int                   # elements of the unsharded model
    read_numel: int = 0               # elements read from a checkpoint (0 for random presets)
    shapes: dict[str, list[int]] = field(default_factory=dict)  # a few telling parameters, local shapes

    def as_dict(self) -> dict:
        return {"rank": self.rank, "world": self.world, "param_numel": self.param_numel,
                "full_numel": self.full_numel, "read_numel": self.read_numel, "shapes": self.shapes}


def _block(n: int, rank: int, world: int) -> slice:
    per = n // world
    return slice(rank * per, (rank + 1) * per)


def check_shardable(config, world: int) -> None:
    """Raise ``InvalidArgument`` unless heads, kv heads, MLP width and vocabulary split over ``world``."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    sizes = {"attention heads": config.num_attention_heads, "key/value heads": kv_heads,
             "intermediate size": config.intermediate_size, "vocabulary": config.vocab_size}
    bad = [f"{what} {n}" for what, n in sizes.items() if n % world]
    if bad:
        raise InvalidArgument(f"the model does not split over {world} shards ({', '.join(bad)} not divisible by "
                              f"{world}); pick a shard count that divides them")
    if getattr(config, "model_type", "llama") != "llama":
        raise InvalidArgument(f"sharding supports LLaMA models, not {config.model_type!r}")


def shard_slices(config, rank: int, world: int) -> Slices:
    """The (rows, cols) of every sharded parameter that ``rank`` of ``world`` holds; absent = whole."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    q_rows = _block(config.num_attention_heads * head_dim, rank, world)
    kv_rows = _block(kv_heads * head_dim, rank, world)
    mlp_rows = _block(config.intermediate_size, rank, world)
    everything = slice(None)
    out: Slices = {"model.embed_tokens.weight": (_block(config.vocab_size, rank, world), everything),
                   "lm_head.weight": (_block(config.vocab_size, rank, world), everything)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (q_rows, everything)
        out[p + "self_attn.k_proj.weight"] = (kv_rows, everything)
        out[p + "self_attn.v_proj.weight"] = (kv_rows, everything)
        out[p + "self_attn.o_proj.weight"] = (everything, q_rows)
        out[p + "mlp.gate_proj.weight"] = (mlp_rows, everything)
        out[p + "mlp.up_proj.weight"] = (mlp_rows, everything)
        out[p + "mlp.down_proj.weight"] = (everything, mlp_rows)
        for name in ("q_proj", "k_proj", "v_proj"):  # biases of column-parallel layers follow their rows
            out[p + f"self_attn.{name}.bias"] = (out[p + f"self_attn.{name}.weight"][0], everything)
        for name in ("gate_proj", "up_proj"):
            out[p + f"mlp.{name}.bias"] = (mlp_rows, everything)
    return out


def _on_meta(cls, **attrs):
    """A FairScale layer with ``attrs`` set and no storage. FairScale's ``__init__`` allocates its slice on
    the CPU with the legacy ``torch.Tensor(rows, cols)`` constructor (deaf to ``torch.device("meta")``)
    and draws the full "master weight" to initialise it; we set the attributes it would set instead."""
    layer = cls.__new__(cls)
    torch.nn.Module.__init__(layer)
    for name, value in attrs.items():
        setattr(layer, name, value)
    return layer


def _meta_param(*shape: int) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


def _column(linear: torch.nn.Linear, world: int, gather_output: bool = False) -> ColumnParallelLinear:
    rows = linear.out_features // world
    layer = _on_meta(ColumnParallelLinear, in_features=linear.in_features, out_features=linear.out_features,
                     gather_output=gather_output, output_size_per_partition=rows, master_weight=None,
                     weight=_meta_param(rows, linear.in_features),
                     bias=None if linear.bias is None else _meta_param(rows))
    _mark_full(layer, linear)
    return layer


def _row(linear: torch.nn.Linear, world: int) -> RowParallelLinear:
    cols = linear.in_features // world
    layer = _on_meta(RowParallelLinear, in_features=linear.in_features, out_features=linear.out_features,
                     input_is_parallel=True, input_size_per_partition=cols, master_weight=None,
                     weight=_meta_param(linear.out_features, cols),
                     bias=None if linear.bias is None else _meta_param(linear.out_features))
    _mark_full(layer, linear)
    return layer


def _embedding(emb: torch.nn.Embedding, rank: int, world: int) -> VocabParallelEmbedding:
    vocab = _block(emb.num_embeddings, rank, world)
    layer = _on_meta(VocabParallelEmbedding, num_embeddings=emb.num_embeddings, embedding_dim=emb.embedding_dim,
                     padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False,
                     _weight=None, vocab_start_index=vocab.start, vocab_end_index=vocab.stop,
                     num_embeddings_per_partition=vocab.stop - vocab.start,
                     weight=_meta_param(vocab.stop - vocab.start, emb.embedding_dim))
    _mark_full(layer, emb)
    return layer


def _mark_full(layer: torch.nn.Module, original: torch.nn.Module) -> None:
    """Tell ``materialize_random`` the unsharded shapes (its tiled values depend on them)."""
    for name, p in layer.named_parameters(recurse=False):
        p.full_shape = tuple(getattr(original, name).shape)


def apply_tp(model: torch.nn.Module) -> torch.nn.Module:
    """Swap a meta ``LlamaForCausalLM``'s projections for FairScale model-parallel layers (in place).

    Needs ``fairscale.nn.model_parallel.initialize_model_parallel`` done (the layers' forward uses its
    group); parameters stay on meta.
    """
    from fairscale.nn.model_parallel.initialize import get_model_parallel_rank, get_model_parallel_world_size

    if any(not p.is_meta for p in model.parameters()):
        raise ValueError("apply_tp expects a model on the meta device (materialise the slices afterwards)")
    rank, world = get_model_parallel_rank(), get_model_parallel_world_size()
    for layer in model.model.layers:
        for path in COLUMN + ROW:
            parent_name, _, attr = path.rpartition(".")
            parent = layer.get_submodule(parent_name)
            linear = getattr(parent, attr)
            setattr(parent, attr, _column(linear, world) if path in COLUMN else _row(linear, world))
    model.model.embed_tokens = _embedding(model.model.embed_tokens, rank, world)
    model.lm_head = _column(model.lm_head, world, gather_output=True)  # full logits on every rank
    return model


def tensor_parallel(device: torch.device) -> TensorParallel:
    """This rank's ``TensorParallel`` over the model-parallel group (FairScale's, initialised): what a
    row-parallel layer's ``forward`` does after its local matmul, and the ranks' minimum of a number (the
    engine's caches are evicted alike on every rank)."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel.initialize import get_model_parallel_group, get_model_parallel_world_size
    from fairscale.nn.model_parallel.mappings import reduce_from_model_parallel_region

    def min_over_ranks(value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=get_model_parallel_group())
        return int(t.item())

    return TensorParallel(get_model_parallel_world_size(), reduce_from_model_parallel_region, min_over_ranks)


def report(model: torch.nn.Module, rank: int, world: int, full_numel: int, read_numel: int = 0) -> ShardReport:
    shown = ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight", "lm_head.weight")
    params = dict(model.named_parameters())
    return ShardReport(rank, world, sum(p.numel() for p in params.values()), full_numel, read_numel,
                       {n: list(params[n].shape) for n in shown if n in params})


def full_numel(model: torch.nn.Module) -> int:
    """Elements of the unsharded model (call before ``apply_tp``; meta parameters cost nothing)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# Loading a rank's slice
# ---------------------------------------------------------------------------------------------------


def row_parallel_amax(name: str):
    """For ``--weights fp8``: the ``fp8.quantize_weight`` hook of weight ``name``'s slice. A row-parallel
    weight (o, down) holds a block of every row's columns here: its row maxima are maxed over the ranks,
    so each rank's scales are those of the whole weight (an unsharded server's). None for the rest."""
    if not name.endswith(tuple(f"{p}.weight" for p in ROW)):
        return None

    def over_ranks(amax: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        from fairscale.nn.model_parallel.initialize import get_model_parallel_group

        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=get_model_parallel_group())
        return amax

    return over_ranks


def load_sharded(spec: str, device: torch.device, dtype: torch.dtype, seed: int, rank: int, world: int,
                 weights_precision: str = "fp16"):
    """This rank's slice of a preset (random weights) or a HF safetensors checkpoint directory, its
    projections in fp8 with ``weights_precision`` "fp8" (or "fp8-reference", ``models.load_model``).

    Returns ``(LoadedModel, ShardReport)``. Model-parallel groups must be initialised.
    """
    from llmwatts.server import models
    from llmwatts.server.engine import fp8
    from llmwatts.server.tokenizer import llama_like_tokenizer

    fp8.check_fp8_device(device, weights_precision)
    quantized = weights_precision != "fp16"
    if spec in models.PRESETS:
        config = models.preset_config(spec)
        check_shardable(config, world)
        model = models.meta_model(config, dtype)
        total = full_numel(model)
        apply_tp(model)
        models.materialize_random(model, device, dtype, seed, slices=shard_slices(config, rank, world),
                                  weights_fp8=quantized, reduce_amax=row_parallel_amax)
        models.fuse_projections(model, world)
        loaded = models.LoadedModel(model, llama_like_tokenizer(), spec, True, config.max_position_embeddings,
                                    config.eos_token_id, device, dtype, tensor_parallel(device), weights_precision)
        return loaded, report(model, rank, world, total)
    loaded, shard = _load_checkpoint_slice(spec, device, dtype, rank, world, quantized)
    loaded.weights = weights_precision
    return loaded, shard


def _weight_files(path: Path) -> dict[str, Path]:
    """Parameter name -> safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise InvalidArgument(f"{path} has no safetensors weights (model.safetensors or its index): sharded "
                              f"loading reads slices from safetensors only; convert the checkpoint with "
                              f"save_pretrained(..., safe_serialization=True)")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def _load_checkpoint_slice(spec: str, device: torch.device, dtype: torch.dtype, rank: int, world: int,
                           weights_fp8: bool = False):
    from safetensors import safe_open
    from transformers import AutoConfig

    from llmwatts.server import models

    path = Path(spec).expanduser()
    if not path.is_dir():
        raise InvalidArgument(f"sharded serving needs a preset ({', '.join(models.PRESETS)}) or a local "
                              f"checkpoint directory; {spec!r} is neither")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    check_shardable(config, world)
    model = models.meta_model(config, dtype)
    total = full_numel(model)
    apply_tp(model)
    slices = shard_slices(config, rank, world)
    files = _weight_files(path)
    read_numel = 0
    handles = {}
    try:
        for name, param in list(model.named_parameters()):
            source = name
            if source not in files and name == "lm_head.weight" and config.tie_word_embeddings:
                source = "model.embed_tokens.weight"  # tied: the head is the embedding's rows
            if source not in files:
                raise InvalidArgument(f"checkpoint {path} lacks tensor {source!r}")
            file = files[source]
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt", device="cpu").__enter__()
            view = handles[file].get_slice(source)
            rows, cols = slices.get(name, (slice(None), slice(None)))
            value = view[rows] if len(view.get_shape()) == 1 else view[rows, cols]  # reads only the slice
            read_numel += value.numel()
            if tuple(value.shape) != tuple(param.shape):
                raise InvalidArgument(f"checkpoint tensor {source!r} slice has shape {tuple(value.shape)}, the "
                                      f"model expects {tuple(param.shape)}")
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr,
                    torch.nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False))
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    models.materialize_buffers(model, device)
    if weights_fp8:
        models.quantize_projections(model, row_parallel_amax)
    models.fuse_projections(model, world)
    tokenizer = models.checkpoint_tokenizer(str(path), local_files_only=True)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else config.eos_token_id
    loaded = models.LoadedModel(model.eval(), tokenizer, str(path), False,
                                int(getattr(config, "max_position_embeddings", 2048)), eos, device, dtype,
                                tensor_parallel(device))
    return loaded, report(model, rank, world, total, read_numel)
