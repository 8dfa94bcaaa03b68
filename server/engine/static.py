"""``FastEngine``: a static KV cache, separate prefill and decode, and a decode step replayed as a CUDA graph.

Modelled on gpt-fast's ``generate.py``: prefill runs once per batch; every decode step is one fixed-shape
function (embed -> layers -> sample) that on CUDA is captured once per (batch bucket, attention window,
greedy?) and replayed (``graphs.py``). The per-layer element-wise work (RMSNorm, rotary, SiLU·mul,
residuals) and the K/V cache writes are fused by ``torch.compile`` on CUDA (``layers.py``); matmuls stay
cuBLAS and attention is SDPA over the cache window (``attention.py``).

The engine runs the loaded transformers model's own parameters and modules (embedding, rotary, final
norm, lm_head) and its decoder layers' weights, q/k/v and gate/up fused at load time
(``models.fuse_projections``); it never changes the model. Greedy tokens on CPU in fp32 equal
``EagerEngine``'s (tests/server/test_fast_engine.py). A sharded model runs the same functions on each
rank's slices, with the all-reduces of the ``TensorParallel`` it is handed between them, captured into
the CUDA graph with the rest (docs/performance.md).

Each sequence masks its own padding (``key_valid``) and gets its own positions (``len_i + t``), exactly
as ``generate`` derives them from the attention mask. Attention reads only the window ``[0, W)`` of the
cache, ``W`` the next multiple of ``window_slots`` above the live slots, so a short batch does not pay
for the whole cache.
"""

import logging
import os
import time

import torch

from llmwatts.server.config import ATTENTION_ENV
from llmwatts.server.engine import prefill as prefill_mod
from llmwatts.server.engine.attention import (WINDOW_SLOTS, allow_recompiles, attend_bmm, attend_flex,
                                              attend_fp8_cache, attend_sdpa, check_decode_options, check_kv_cache,
                                              compiled_decode_attention, flex_block_mask, inductor_options)
from llmwatts.server.engine.batch import BatchOutput, BatchSpec, PaceCallback, Sampling, SequenceTracker, StepCallback
from llmwatts.server.engine.cache import FP8, Workspace, Workspaces, bucket, round_up
from llmwatts.server.engine.graphs import capture, step_buffers
from llmwatts.server.engine.layers import Layer, mlp_partial, post_attention, pre_attention
from llmwatts.server.engine.parallel import TensorParallel
from llmwatts.server.engine.prefill import JOIN_GRAPH_TOKENS, MAX_JOIN_TOKENS, PREFILL_TOKENS
from llmwatts.server.engine.sampling import sample

log = logging.getLogger(__name__)


class FastEngine:
    """Static-cache, CUDA-graph decode engine (``--engine fast``); same interface as ``EagerEngine``.

    ``compile`` (torch.compile of the layer's fused element-wise parts) and ``cuda_graphs`` default to
    on for CUDA and off elsewhere; ``LLMWATTS_FAST_COMPILE=0`` turns compile off for debugging.
    ``parallel``: this rank's ``TensorParallel`` when the model is one slice of a sharded model.
    """

    name = "fast"
    # Each row samples with its own noise key (``BatchSpec.keys``): requests with different seeds can share
    # a batch and each gets the tokens it would get alone (the batcher merges them).
    per_row_seeds = True

    def __init__(self, model: torch.nn.Module, pad_token_id: int, eos_token_id: int | None,
                 device: torch.device, context_length: int = 2048, *, compile: bool | None = None,
                 cuda_graphs: bool | None = None, attention: str | None = None, window_slots: int = WINDOW_SLOTS,
                 prefill_tokens: int = PREFILL_TOKENS, join_tokens: int = JOIN_GRAPH_TOKENS,
                 parallel: TensorParallel | None = None, kv_cache: str = "fp16"):
        self.model, self.pad_id, self.eos_id = model, pad_token_id, eos_token_id
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be positive, got {prefill_tokens}")
        if not 0 <= join_tokens <= MAX_JOIN_TOKENS:
            raise ValueError(f"join_tokens must be between 0 (off) and {MAX_JOIN_TOKENS}, got {join_tokens}")
        self.join_tokens = join_tokens
        self.captures, self.capture_s = 0, 0.0  # CUDA graphs captured so far, and the seconds it took
        self.device = torch.device(device)
        self.context_length = context_length
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        if compile is None:
            compile = on_cuda and os.environ.get("LLMWATTS_FAST_COMPILE", "1") != "0"
        inner = model.model
        self.embed, self.rotary, self.norm, self.lm_head = inner.embed_tokens, inner.rotary_emb, inner.norm, model.lm_head
        self.layers = [Layer(layer, parallel.all_reduce if parallel else None) for layer in inner.layers]
        self.scale = self.layers[0].module.self_attn.scaling
        self.dtype = self.embed.weight.dtype
        # Decode attention: SDPA over the cache window, two batched matmuls (``bmm``), or FlexAttention
        # over the whole cache with a block mask (``flex``: one graph per batch bucket, no windows); the
        # bench measures all three. Prefill always uses SDPA.
        self.attention = attention or os.environ.get(ATTENTION_ENV, "sdpa")
        # Attention window granularity: finer reads fewer stale slots per step but captures more graphs.
        check_decode_options(self.attention, window_slots)
        self.window_slots = window_slots
        # The KV cache's dtype: the model's, or e4m3 (``--kv-cache fp8``: decode reads it with the Triton
        # kernel of ``fp8_attention.py``; ``fp8-reference`` widens it for SDPA, as prefill always does).
        check_kv_cache(kv_cache, self.device, self.attention)
        self.kv_cache = kv_cache
        self.kv_kernel = kv_cache == "fp8"
        decode_attend = {"sdpa": attend_sdpa, "bmm": attend_bmm, "flex": attend_flex}[self.attention]
        self.fns = self.eager_fns = (pre_attention, post_attention, mlp_partial, decode_attend)
        self.compiled = bool(compile) and all(l.mode != "module" for l in self.layers)
        self.sharded = parallel is not None and parallel.world > 1  # ranks run in lockstep and must stay so
        if self.compiled:
            # Static shapes: one compile per batch bucket, so inductor tunes its kernels for that batch.
            # (With dynamic=True one compile served every bucket, but its kernels kept the launch configs
            # tuned at the first batch size: 2.2x the fused kernels' time at batch 64, 3.3x at 256 on an
            # H100, docs/performance.md.) The caches' length is marked dynamic (``Workspaces``), so a
            # longer cache for the same bucket does not compile again.
            allow_recompiles()
            layer_fns = [torch.compile(fn, dynamic=False, fullgraph=True, options=inductor_options())
                         for fn in self.eager_fns[:3]]
            self.fns = (*layer_fns, compiled_decode_attention(self.attention))
        first = self.layers[0]
        self.caches = Workspaces(
            device=self.device, dtype=self.dtype, layers=len(self.layers), kv_heads=self._kv_heads(),
            head_dim=first.head_dim, hidden=self.embed.weight.shape[-1],
            intermediate=first.module.mlp.gate_proj.weight.shape[0], context_length=context_length,
            prefill_tokens=prefill_tokens, graphs=self.cuda_graphs, flex=self.attention == "flex",
            mark_dynamic=self.compiled and self.attention != "flex",
            min_over_ranks=parallel.min_over_ranks if self.sharded else None,
            kv_dtype=self.dtype if kv_cache == "fp16" else FP8)
        self._pinned = None

    def _kv_heads(self) -> int:
        first = self.layers[0]
        if first.n_kv_heads is not None:
            return first.n_kv_heads
        a = first.module.self_attn  # module mode: ask the module (a sharded k_proj knows its local width)
        probe = a.k_proj(torch.zeros(1, 1, self.embed.weight.shape[-1], device=self.device, dtype=self.dtype))
        return probe.shape[-1] // a.head_dim

    # -- static batches ------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, batch: BatchSpec, on_step: StepCallback | None = None,
                 pace: PaceCallback | None = None) -> BatchOutput:
        tracker = SequenceTracker(batch, self.eos_id)
        n = len(batch.prompts)
        width = max(len(p) for p in batch.prompts)
        max_new = max(batch.max_new_tokens)
        if width + max_new > self.context_length:
            raise ValueError(f"prompt ({width} tokens) + max_new_tokens ({max_new}) exceeds the model's "
                             f"context of {self.context_length} tokens")
        s = batch.sampling
        ws = self.workspace(bucket(n), width + max_new, prefill_width=width)
        ws.temperature.fill_(s.temperature)
        ws.top_p.fill_(s.top_p)
        started = time.perf_counter()
        first = self.prefill(ws, batch.prompts, s.greedy, keys=None if s.greedy else batch.noise_keys())
        host = self._host_buffers(ws.batch)

        def emit(ids: list[int]) -> None:
            nonlocal started
            if tracker.all_done:
                return
            if pace is not None:
                pace(time.perf_counter() - started)
            deltas = tracker.step(ids[:n])
            if on_step is not None:
                on_step(tracker.steps - 1, deltas)
            started = time.perf_counter()

        emit(first.tolist())
        pending = None  # (event, pinned buffer) of the step in flight: its copy overlaps the next step
        for t in range(1, max_new):
            if tracker.all_done:
                break
            self.decode_step(ws, width + t, s.greedy)
            buf, event = host[t % 2]
            if self.device.type == "cuda":
                buf.copy_(ws.out, non_blocking=True)
                event.record()
            else:
                buf.copy_(ws.out)
            if pending is not None:
                self._emit_pending(pending, emit)
            pending = (buf, event)
        if pending is not None:
            self._emit_pending(pending, emit)
        return tracker.output()

    def session(self, rows: int, cache_slots: int, sampling: Sampling, ignore_eos: bool,
                prefill_width: int = 1):
        """A continuous batch of up to ``rows`` sequences of at most ``cache_slots`` tokens each
        (``ContinuousSession``)."""
        from llmwatts.server.engine.session import ContinuousSession

        return ContinuousSession(self, rows, cache_slots, sampling, ignore_eos, prefill_width)

    @torch.inference_mode()
    def teacher_forced_argmax(self, ids: list[int]) -> list[int]:
        """Argmax next token after each prefix of ``ids`` through the decode path (prefill of the first
        token, then one graphed step per token fed in): ``len(ids)`` predictions, for agreement checks."""
        ws = self.workspace(1, len(ids) + 1)
        out = [int(self.prefill(ws, [ids[:1]], True)[0])]
        forced = torch.tensor(ids, dtype=torch.long, device=self.device)
        for t in range(1, len(ids)):
            ws.tok.copy_(forced[t:t + 1])
            self.decode_step(ws, 1 + t, True)
            out.append(int(ws.out[0]))
        return out

    def release(self) -> None:
        """Drop every cache and graph (frees GPU memory; the next batch rebuilds what it needs)."""
        self.caches.release()
        self._pinned = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _emit_pending(self, pending, emit) -> None:
        buf, event = pending
        if event is not None and self.device.type == "cuda":
            event.synchronize()  # the one host sync per step: this step's tokens, for streaming
        emit(buf.tolist())

    def _host_buffers(self, batch: int):
        if self._pinned is None or self._pinned[0][0].numel() != batch:
            self._pinned = step_buffers(batch, self.device)
        return self._pinned

    # -- the steps a batch is made of (``generate`` and ``ContinuousSession`` drive them) ------------

    def workspace(self, batch: int, needed_slots: int, prefill_width: int = 1) -> Workspace:
        """The caches and static buffers of bucket ``batch`` with room for ``needed_slots`` tokens a row."""
        return self.caches.get(batch, needed_slots, prefill_width)

    def rows_view(self, ws: Workspace, rows: int) -> Workspace:
        """The first ``rows`` rows of ``ws``: the workspace a step over them runs on (its own graphs)."""
        return self.caches.rows_view(ws, rows)

    def prefill(self, ws: Workspace, prompts: list[list[int]], greedy: bool,
                rows: list[int] | None = None, keys: list[int] | None = None) -> torch.Tensor:
        """``prefill.prefill``: the prompts (sampling-noise ``keys``) into ``ws`` -> the first token per row [B]."""
        return prefill_mod.prefill(self, ws, prompts, greedy, rows, keys)

    def join(self, ws: Workspace, prompts: list[list[int]], greedy: bool, rows: list[int],
             keys: list[int] | None = None) -> tuple[list[int], list[int]]:
        """``prefill.join``: a continuous batch's prompts into free ``rows`` -> (first tokens, next slots)."""
        return prefill_mod.join(self, ws, prompts, greedy, rows, keys)

    def capture_joins(self, ws: Workspace, greedy: bool) -> None:
        """Capture every graphed join shape of ``ws`` (before any of its rows is live)."""
        prefill_mod.capture_joins(self, ws, greedy)

    def window(self, ws: Workspace, live_slots: int) -> int:
        """The cache slots a decode step with ``live_slots`` live slots attends over. flex reads the blocks up
        to the slot by itself: one window (the whole cache), one graph."""
        return ws.cache_len if self.attention == "flex" else min(round_up(live_slots, self.window_slots), ws.cache_len)

    def decode_step(self, ws: Workspace, live_slots: int, greedy: bool, per_row: bool = False) -> None:
        """One decode step of every row of ``ws`` (replayed as a graph on CUDA): its tokens into ``ws.out``."""
        window = self.window(ws, live_slots)
        if not self.cuda_graphs:
            self._decode_body(ws, window, greedy, per_row)
            return
        self.step_graph(ws, window, greedy, per_row).replay()

    def step_graph(self, ws: Workspace, window: int, greedy: bool, per_row: bool):
        """The decode step's graph for ``ws`` and ``window``, captured the first time."""
        return self.graph(ws, (window, greedy, per_row), lambda: self._decode_body(ws, window, greedy, per_row),
                          state=(ws.tok, ws.out, ws.pos, ws.row_slot if per_row else ws.slot), compiled=True)

    def graph(self, ws: Workspace, key: tuple, body, state: tuple = (), compiled: bool = False):
        """``ws.graphs[key]``, captured from ``body`` the first time (``graphs.capture``). ``compiled``: the
        body runs the compiled layer functions, and a compiler failure falls back to the uncompiled ones."""
        graph = ws.graphs.get(key)
        if graph is not None:
            return graph
        t0 = time.perf_counter()
        graph = capture(ws, key, body, self.device, state, on_failure=lambda: self._fall_back(compiled))
        seconds = time.perf_counter() - t0
        self.captures += 1
        self.capture_s += seconds
        log.info("captured a graph of the batch-%d workspace: %s in %.0f ms", ws.batch, key, 1000 * seconds)
        return graph

    def _fall_back(self, compiled: bool) -> bool:
        """After a capture's warm-up raised: run uncompiled from now on (True), or re-raise (False)."""
        if not (compiled and self.compiled) or self.sharded:
            # Sharded, a fallback on one rank alone would re-issue collectives the others do not: fail
            # the batch (every rank sees it) rather than desynchronise the ranks.
            return False
        # A compiler failure must not take the server down: fall back to uncompiled layers.
        log.exception("torch.compile of the decode step failed; running it uncompiled")
        self.compiled = False
        self.caches.mark_dynamic = False
        return True

    # -- the model -----------------------------------------------------------------------------------

    def forward(self, caches, ids, positions, mask, slots, window: int, compiled: bool,
                decode: bool = False, per_row: bool = False, last: torch.Tensor | None = None) -> torch.Tensor:
        """ids, positions: [B, T]; mask: [B, 1, T, window] additive (decode with flex: a BlockMask over the
        whole cache); writes k, v at ``slots`` [T] (``per_row``: [B], T = 1) into ``caches`` (per layer a
        (k, v) pair of [B, Hkv, L, D]) -> logits [B, V] fp32. Prefill (even of one-token prompts) always
        attends with SDPA; ``decode`` picks the engine's decode attention. The logits are those after the
        last column, or after column ``last`` [B] of each row (one row: ``last`` [n], n logits)."""
        pre, post, mlp, attend = self.fns if compiled else self.eager_fns
        h = self.embed(ids)                                                     # [B, T, E]
        cos, sin = self.rotary(h, positions)                                    # [B, T, D]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for layer, (kc, vc) in zip(self.layers, caches):
            q = layer.pre(pre, h, cos, sin, kc, vc, slots, per_row)            # q: [B, Hq, T, D]
            kw, vw = kc[:, :, :window], vc[:, :, :window]                       # k: [B, Hkv, W, D]
            if kw.dtype != q.dtype:  # an fp8 cache
                attn = attend_fp8_cache(q, kw, vw, mask, self.scale, kernel=decode and self.kv_kernel)
            elif decode and (self.attention != "bmm" or kw.shape[1] == q.shape[1]):  # bmm has no GQA: SDPA
                attn = attend(q, kw, vw, mask, self.scale)
            else:
                attn = attend_sdpa(q, kw, vw, mask, self.scale)
            h = layer.post((post, mlp), h, attn)
        if last is None:
            h = h[:, -1:, :]
        elif h.shape[0] == 1:  # one row (a packed join: several prompts' last columns)
            h = h[0, last][:, None, :]
        else:
            h = h[torch.arange(h.shape[0], device=h.device), last][:, None, :]
        return self.lm_head(self.norm(h))[:, -1].float()

    def additive(self, keep: torch.Tensor) -> torch.Tensor:
        # Once per step, not once per layer: SDPA would convert a bool mask like this in every layer.
        return torch.zeros(keep.shape, dtype=self.dtype, device=keep.device).masked_fill_(~keep, float("-inf"))

    def _decode_body(self, ws: Workspace, window: int, greedy: bool, per_row: bool = False) -> None:
        """One decode step on the workspace's static buffers (this is what a CUDA graph captures). A
        static batch writes one slot for every row; a continuous one (``per_row``) each row's own slot,
        and advances only live rows (an idle row rewrites its slot 0 and attends to it alone)."""
        slot = ws.row_slot if per_row else ws.slot
        if self.attention == "flex":
            mask = flex_block_mask(ws.key_valid, ws.slot, ws.flex_blocks, ws.flex_indices)
        else:
            cols = torch.arange(window, device=self.device)
            upto = cols[None, :] <= (slot[:, None] if per_row else slot)
            mask = self.additive((ws.key_valid[:, :window] & upto)[:, None, None, :])  # [B, 1, 1, W]
        logits = self.forward(zip(ws.k, ws.v), ws.tok[:, None], ws.pos[:, None], mask, slot, window,
                              compiled=self.compiled, decode=True, per_row=per_row)
        nxt = sample(logits, greedy, ws.temperature, ws.top_p, ws.key, ws.pos)  # (pos: the token fed in)
        ws.out.copy_(nxt)
        ws.tok.copy_(nxt)
        if per_row:
            ws.pos.add_(ws.live)
            ws.row_slot.add_(ws.live)
        else:
            ws.pos.add_(1)
            ws.slot.add_(1)
