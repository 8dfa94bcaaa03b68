"""Engines turn a batch of token-id prompts into generated tokens, reporting every decode step.

``EagerEngine`` (``eager.py``) is transformers' own ``generate``, the paper-faithful baseline;
``FastEngine`` (``static.py``) is a static-cache, CUDA-graph engine, with ``ContinuousSession``
(``session.py``) for continuous batching. Both share one interface (``batch.py``), so the batcher, the
servicer and the benchmarks never care which one runs. The rest of the fast engine, one job a file:
``layers.py`` (the decoder layer's maths), ``attention.py`` (decode attention kernels), ``sampling.py``,
``cache.py`` (static KV caches), ``prefill.py`` (prefill and continuous joins), ``graphs.py`` (CUDA
graph capture), ``warmup.py``, ``parallel.py`` (what a sharded engine is handed).
"""

from llmwatts.server.engine.attention import WINDOW_SLOTS, check_decode_options
from llmwatts.server.engine.batch import (BatchOutput, BatchSpec, Engine, PaceCallback, Sampling, SequenceTracker,
                                          StepCallback, left_pad, validate_sampling)
from llmwatts.server.engine.cache import BATCH_BUCKETS, CACHE_SLOTS, bucket
from llmwatts.server.engine.eager import EagerEngine
from llmwatts.server.engine.parallel import TensorParallel
from llmwatts.server.engine.prefill import JOIN_GRAPH_TOKENS, PREFILL_TOKENS
from llmwatts.server.engine.session import ContinuousSession
from llmwatts.server.engine.static import FastEngine
from llmwatts.server.engine.warmup import warm_up

__all__ = ["BATCH_BUCKETS", "CACHE_SLOTS", "JOIN_GRAPH_TOKENS", "PREFILL_TOKENS", "WINDOW_SLOTS", "BatchOutput",
           "BatchSpec", "ContinuousSession", "EagerEngine", "Engine", "FastEngine", "PaceCallback", "Sampling",
           "SequenceTracker", "StepCallback", "TensorParallel", "bucket", "check_decode_options", "left_pad",
           "validate_sampling", "warm_up"]
