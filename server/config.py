"""Server configuration: one dataclass, filled by ``llmwatts serve`` flags or by tests directly."""

import os
from dataclasses import dataclass, field
from pathlib import Path

from llmwatts.errors import InvalidArgument

# Paper defaults (Samsi et al. 2023): temperature 0.8, top-p 0.95.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
ENGINES = ("auto", "eager", "fast")
# The fast engine's decode attention, chosen by this environment variable (docs/performance.md).
ATTENTIONS = ("sdpa", "bmm", "flex")
ATTENTION_ENV = "LLMWATTS_FAST_ATTENTION"
KV_CACHES = ("fp16", "fp8")  # --kv-cache: "fp16" keeps K/V in the model's dtype, "fp8" in e4m3
KV_REFERENCE = "fp8-reference"  # an fp8 cache whose attention always widens it (CPU tests; not a flag value)
MAX_JOIN_TOKENS = 4096  # --continuous-join-tokens at most this (= engine.prefill.MAX_JOIN_TOKENS; this module stays torch-free)


def check_engine(name: str, continuous: bool = False) -> None:
    if name not in ENGINES:
        raise InvalidArgument(f"unknown engine {name!r}: use auto, eager or fast")
    if continuous and name == "eager":
        raise InvalidArgument("continuous batching needs the fast engine: use --engine fast (or auto)")
    attention = os.environ.get(ATTENTION_ENV)
    if name != "eager" and attention is not None and attention not in ATTENTIONS:
        raise InvalidArgument(f"{ATTENTION_ENV}={attention!r} is not a decode attention: use one of "
                              f"{', '.join(ATTENTIONS)} (or unset it)")
    if continuous and attention == "flex":
        raise InvalidArgument(f"continuous batching runs with the sdpa or bmm decode attention: unset "
                              f"{ATTENTION_ENV}=flex or drop --continuous")


def check_kv_cache_name(kv_cache: str) -> None:
    """InvalidArgument (one line) unless ``kv_cache`` names a KV cache (where it can run: the fast engine's
    ``attention.check_kv_cache``)."""
    if kv_cache not in (*KV_CACHES, KV_REFERENCE):
        raise InvalidArgument(f"unknown KV cache {str(kv_cache)[:40]!r}: use {' or '.join(KV_CACHES)}")


@dataclass
class ServerConfig:
    model: str = "tiny"                  # preset name (tiny, llama-7b, llama-13b, llama-65b) or HF checkpoint dir
    device: str = "auto"                 # auto, cpu, cuda, cuda:N
    dtype: str = "auto"                  # auto (fp16 on GPU, fp32 on CPU), float16, bfloat16, float32
    weights: str = "fp16"                # fp16 (the dtype as it is) or fp8 (projections e4m3, FP8 GPUs only)
    kv_cache: str = "fp16"               # fp16 (the dtype as it is) or fp8 (K/V e4m3, fast engine, FP8 GPUs only)
    engine: str = "auto"                 # auto (fast on GPU, eager on CPU), eager, fast
    host: str = "127.0.0.1"
    port: int = 50051                    # 0 picks a free port (tests)
    db_path: Path = Path("llmwatts-server.db")
    power_backend: str = "auto"          # auto, nvml, nvml-readonly, simulated
    metrics_port: int | None = None      # Prometheus metrics on this port (0 picks one); None: off
    telemetry_hz: float = 10.0           # 0 disables the sampler (batch-boundary reads still happen)
    max_batch_size: int = 64             # most sequences in one batch (per request and merged)
    max_new_tokens_limit: int = 2048     # largest max_new_tokens a request may ask for
    default_max_new_tokens: int = 256
    max_prompt_tokens: int | None = None # default: the model's context length minus max_new_tokens
    merge_requests: bool = False         # merge concurrent requests into one batch
    batch_wait_ms: float = 5.0           # how long the batcher waits for more requests to merge
    continuous: bool = False             # requests join a running batch between decode steps (fast engine)
    continuous_slots: int = 0            # its cache length per row; 0: the first request's prompt + new tokens
    continuous_join_rows: int = 0        # a running continuous batch admits once this many rows are free;
                                         # 0: max_batch_size / 8 (at least 1)
    continuous_join_tokens: int | None = None  # joins of at most this many prompt tokens run packed, replaying
                                         # captured graphs; 0: none; None: the engine's JOIN_GRAPH_TOKENS (2048)
    stream_interval_ms: float = 50.0     # GenerateStream coalesces steps faster than this into one chunk; 0: a chunk a step
    queue_size: int = 64                 # bounded queue of pending requests; full → RESOURCE_EXHAUSTED
    warmup: bool = False                 # run every batch bucket (and row prefix) once before serving
    seed: int = 0
    # Security (power-cap control).
    control_token: str | None = None     # bearer token for mutating Control calls (from env/file, never argv)
    inference_token: str | None = None   # optional token for Inference calls
    allow_insecure_loopback_control: bool = False
    allow_short_token: bool = False      # accept control/inference tokens under 16 bytes (limits.MIN_TOKEN_BYTES)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None    # set → mutual TLS (clients must present a cert signed by it)
    cap_state_path: Path | None = None   # persisted cap changes, restored at next start after a SIGKILL
    default_lease_s: float = 600.0
    # Simulated GPU.
    sim_gpus: int = 1
    sim_profile: str = "a100-250w"
    labels: dict = field(default_factory=dict)
