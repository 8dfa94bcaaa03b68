"""The decoder layer's maths, split around attention, and ``Layer``: one decoder layer of the loaded model
as the engine runs it.

Same ops, same order as transformers' LlamaRMSNorm, apply_rotary_pos_emb, LlamaMLP and LlamaDecoderLayer
(fp32 results are bit-identical), except that q/k/v and gate/up each run as one matmul over their weights
stacked at load time (``models.fuse_projections``). The functions take tensors only, so ``torch.compile``
fuses their element-wise work; tensor parallelism enters only as the ``all_reduce`` a sharded engine is
handed (``server/tp.py``), called between them.
"""

from typing import Callable

import torch
import torch.nn.functional as F

from llmwatts.server.engine.cache import stored
from llmwatts.server.engine.fp8 import linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos, sin: [B, 1, T, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def pre_attention(h, cos, sin, ln_w, eps: float, wqkv, bqkv, sqkv, n_q: int, n_kv: int, head_dim: int,
                  kc, vc, slots, per_row: bool = False):
    """h: [B, T, E] -> q: [B, Hq, T, D] (rotary applied); k (rotary applied) and v are written into the
    caches ``kc``, ``vc`` [B, Hkv, L, D] at ``slots`` (``rope_into_cache``). One matmul for q, k and v (``wqkv``: their
    weights stacked), split afterwards. Compiled, inductor fuses the cache writes with the rotary's
    kernels and writes the caches in place (no copy kernels; on an H100 two Triton kernels: both rotaries
    with the k write, and the v write)."""
    b, t, _ = h.shape
    x = rms_norm(h, ln_w, eps)
    q, k, v = linear(x, wqkv, bqkv, sqkv).split((n_q, n_kv, n_kv), dim=-1)
    q = q.reshape(b, t, -1, head_dim).transpose(1, 2)
    k = k.reshape(b, t, -1, head_dim).transpose(1, 2)
    v = v.reshape(b, t, -1, head_dim).transpose(1, 2)
    return rope_into_cache(q, k, v, cos, sin, kc, vc, slots, per_row)


def rope_into_cache(q, k, v, cos, sin, kc, vc, slots, per_row: bool = False):
    """Rotary on q and k; k and v written into the caches ``kc``, ``vc`` (in their dtype: an fp8 cache
    rounds them to e4m3) -> q. ``slots``: [T], the same slots for every row; or with ``per_row`` (a
    decode step, T = 1, of a continuous batch) [B], each row's own slot."""
    k = rope(k, cos, sin)
    if per_row:
        rows = torch.arange(kc.shape[0], device=kc.device)
        for cache, value in (stored(kc, k[:, :, 0]), stored(vc, v[:, :, 0])):
            cache[rows, :, slots] = value
    else:
        for cache, value in (stored(kc, k), stored(vc, v)):
            cache.index_copy_(2, slots, value)
    return rope(q, cos, sin)


def swiglu(x, wgu, bgu, sgu, n_inter: int, wd, bd, sd):
    """x: [B, T, E] -> down(silu(gate(x)) * up(x)), gate and up as one matmul (``wgu``: stacked). ``s*``:
    an fp8 weight's per-channel scales (``fp8.linear``), None for plain weights."""
    gate, up = linear(x, wgu, bgu, sgu).split((n_inter, n_inter), dim=-1)
    return linear(F.silu(gate) * up, wd, bd, sd)


def post_attention(h, attn, wo, bo, so, ln_w, eps: float, wgu, bgu, sgu, n_inter: int, wd, bd, sd):
    """h: [B, T, E], attn: [B, Hq, T, D] -> the layer's output [B, T, E]."""
    b, t, _ = h.shape
    h = h + linear(attn.transpose(1, 2).reshape(b, t, -1).contiguous(), wo, bo, so)
    return h + swiglu(rms_norm(h, ln_w, eps), wgu, bgu, sgu, n_inter, wd, bd, sd)


def mlp_partial(h, o, ln_w, eps: float, wgu, bgu, sgu, n_inter: int, wd, sd):
    """Tensor-parallel half of ``post_attention`` after o's all-reduce: h: [B, T, E], o: [B, T, E] (summed
    over ranks) -> (h + o, this rank's partial down projection [B, T, E], to be all-reduced)."""
    h = h + o
    return h, swiglu(rms_norm(h, ln_w, eps), wgu, bgu, sgu, n_inter, wd, None, sd)


class Layer:
    """One decoder layer, in one of three modes:

    - ``plain``: the projections' weights were fused at load (``models.fuse_projections``: the layer's
      ``fused_projections``); the layer runs as two (compilable) functions of its tensors, with q/k/v and
      gate/up each one matmul;
    - ``tp``: the same functions on this rank's slices (column-parallel q/k/v/gate/up, row-parallel
      o/down, ``server/tp.py``), with the two all-reduces a row-parallel layer does (after o and after
      down) made explicitly between them, through the ``all_reduce`` the engine was handed;
    - ``module``: anything else (another make, or weights not fused); the layer calls its modules,
      uncompiled.
    """

    def __init__(self, module: torch.nn.Module, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None):
        self.module = m = module
        a, mlp = m.self_attn, m.mlp
        self.head_dim = a.head_dim
        self.eps1, self.eps2 = m.input_layernorm.variance_epsilon, m.post_attention_layernorm.variance_epsilon
        self.all_reduce = all_reduce
        self.mode = layer_mode(m, all_reduce is not None)
        if self.mode == "module":
            return
        f = m.fused_projections
        self.n_q, self.n_kv, self.n_inter = f.n_q, f.n_kv, f.n_inter
        self.wqkv, self.bqkv, self.wgu, self.bgu = f.wqkv, f.bqkv, f.wgu, f.bgu
        self.wo, self.bo, self.wd, self.bd = a.o_proj.weight, a.o_proj.bias, mlp.down_proj.weight, mlp.down_proj.bias
        # fp8 weights (``fp8.Fp8Linear``): each weight's per-channel scales; None for plain weights.
        self.sqkv, self.sgu = f.sqkv, f.sgu
        self.so, self.sd = getattr(a.o_proj, "scale", None), getattr(mlp.down_proj, "scale", None)

    @property
    def n_kv_heads(self) -> int | None:
        return None if self.mode == "module" else self.n_kv // self.head_dim

    def pre(self, fn, h, cos, sin, kc, vc, slots, per_row: bool = False):
        """q [B, Hq, T, D]; k and v go into the caches ``kc``, ``vc`` at ``slots``."""
        m = self.module
        if self.mode == "module":
            a = m.self_attn
            b, t, _ = h.shape
            x = m.input_layernorm(h)
            q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
            return rope_into_cache(q, k, v, cos, sin, kc, vc, slots, per_row)
        return fn(h, cos, sin, m.input_layernorm.weight, self.eps1, self.wqkv, self.bqkv, self.sqkv, self.n_q,
                  self.n_kv, self.head_dim, kc, vc, slots, per_row)

    def post(self, fns, h, attn):
        m = self.module
        post_fn, mlp_fn = fns
        if self.mode == "plain":
            return post_fn(h, attn, self.wo, self.bo, self.so, m.post_attention_layernorm.weight, self.eps2,
                           self.wgu, self.bgu, self.sgu, self.n_inter, self.wd, self.bd, self.sd)
        b, t, _ = h.shape
        flat = attn.transpose(1, 2).reshape(b, t, -1).contiguous()             # [B, T, Hq_local * D]
        if self.mode == "module":
            h = h + m.self_attn.o_proj(flat)
            return h + m.mlp(m.post_attention_layernorm(h))
        # What a row-parallel linear does: the local matmul, the all-reduce, then the bias.
        o = self.all_reduce(linear(flat, self.wo, None, self.so))
        if self.bo is not None:
            o = o + self.bo
        h, down = mlp_fn(h, o, m.post_attention_layernorm.weight, self.eps2, self.wgu, self.bgu, self.sgu,
                         self.n_inter, self.wd, self.sd)
        down = self.all_reduce(down)
        return h + (down if self.bd is None else down + self.bd)


def layer_mode(layer: torch.nn.Module, parallel: bool) -> str:
    """``plain``, ``tp`` (``parallel``: the engine was handed an all-reduce) or ``module`` (``Layer``).
    ValueError for a layer fused on a slice of several ranks but no all-reduce to join them."""
    mlp = layer.mlp
    act = getattr(mlp, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation")
    fused = getattr(layer, "fused_projections", None)
    if not (silu and fused is not None and type(layer.input_layernorm).__name__.endswith("RMSNorm")
            and type(layer.post_attention_layernorm).__name__.endswith("RMSNorm")):
        return "module"
    if fused.world > 1 and not parallel:
        raise ValueError(f"this layer holds a slice of {fused.world} ranks: the engine needs the ranks' "
                         f"all-reduce (server/tp.py TensorParallel)")
    return "tp" if parallel else "plain"
