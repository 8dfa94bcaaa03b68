"""``llmwatts serve``: flags → ServerConfig → create_server, with SIGTERM/SIGINT → graceful stop."""

import logging
import os
from pathlib import Path

from llmwatts.errors import InvalidArgument
from llmwatts.server.config import KV_CACHES, MAX_JOIN_TOKENS, ServerConfig, check_engine
from llmwatts.server.lifecycle import check_port_free
from llmwatts.server.gpu import SIM_PROFILES


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a LLaMA model over gRPC with GPU telemetry",
        description="Serve a LLaMA model (random-weight preset or HF checkpoint) over gRPC, sampling GPU "
                    "power/energy (NVML, or a simulated GPU without one) into a SQLite DB. Tokens for "
                    "power-cap control come from LLMWATTS_CONTROL_TOKEN or LLMWATTS_CONTROL_TOKEN_FILE.",
    )
    d = ServerConfig()
    p.add_argument("--model", default=d.model,
                   help="preset (tiny, llama-7b, llama-13b, llama-65b) or HF checkpoint dir/hub id (default: tiny)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default=d.dtype, help="auto (fp16 on GPU, fp32 on CPU), float16, bfloat16, float32")
    p.add_argument("--weights", default=d.weights, choices=("fp16", "fp8"),
                   help="decoder weights: fp16 (as --dtype) or fp8 (e4m3, per-channel scales; an FP8 GPU: "
                        "Ada or Hopper; default: fp16)")
    p.add_argument("--kv-cache", default=d.kv_cache, choices=KV_CACHES,
                   help="KV cache: fp16 (as --dtype) or fp8 (e4m3, read by its own decode kernel; the fast "
                        "engine on an FP8 GPU: Ada or Hopper; default: fp16)")
    p.add_argument("--engine", default=d.engine, help="auto (fast on GPU, eager on CPU), eager or fast")
    p.add_argument("--host", default=d.host, help="interface to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=d.port, help="TCP port, 0 to 65535 (0 picks a free one; default: 50051)")
    p.add_argument("--port-file", type=Path, help="write the bound port here once serving (for scripts)")
    p.add_argument("--db", type=Path, default=d.db_path, dest="db_path",
                   help="server SQLite DB, in a folder that exists (default: %(default)s)")
    p.add_argument("--power-backend", default=d.power_backend,
                   help="auto (nvml-readonly with a GPU, else simulated), nvml, nvml-readonly, simulated")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics (per-GPU power, energy, cap, SM %%, memory-controller %%, queue, "
                        "in-flight requests, tokens/s, requests by status) on this port of --host")
    p.add_argument("--telemetry-hz", type=float, default=d.telemetry_hz, help="sampling rate, 0 to 100 (default 10)")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help="most prompts in one batch: one request's, merged requests' or continuous rows "
                        "(default %(default)s)")
    p.add_argument("--max-new-tokens-limit", type=int, default=d.max_new_tokens_limit,
                   help="largest max_new_tokens a request may ask for (default %(default)s)")
    p.add_argument("--default-max-new-tokens", type=int, default=d.default_max_new_tokens,
                   help="max_new_tokens of a request that sets none (default %(default)s)")
    p.add_argument("--merge-requests", action="store_true", help="merge concurrent requests into one batch")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="how long a merged batch (--merge-requests) or a continuous batch's join round "
                        "(--continuous) waits for more requests (default 5)")
    p.add_argument("--stream-interval-ms", type=float, default=d.stream_interval_ms,
                   help="GenerateStream: steps that come faster than this go out as one chunk, each token with its "
                        "own server time; the first tokens are always sent at once (default 50; 0: a chunk a step)")
    p.add_argument("--continuous", action="store_true",
                   help="continuous batching: requests join the running batch between decode steps and leave it "
                        "when they end (fast engine, one shard; --max-batch-size rows)")
    p.add_argument("--continuous-slots", type=int, default=d.continuous_slots,
                   help="with --continuous: cache tokens per row, the longest prompt + max_new_tokens that joins "
                        "without waiting for the batch to drain (default 0: the first request's)")
    p.add_argument("--continuous-join-rows", type=int, default=d.continuous_join_rows,
                   help="with --continuous: free rows a running batch waits for before requests join, so one "
                        "prefill serves several (default 0: --max-batch-size / 8, at least 1; 1 joins at once)")
    p.add_argument("--continuous-join-tokens", type=int, default=d.continuous_join_tokens,
                   help="with --continuous: joins of at most this many prompt tokens in all run packed end to "
                        "end in one row (padded to a multiple of 128), replaying CUDA graphs captured as a "
                        "session opens; larger ones run eagerly; 0: every join eagerly (default 2048, at most "
                        "4096; docs/performance.md)")
    p.add_argument("--queue-size", type=int, default=d.queue_size,
                   help="requests waiting for the engine; more are refused with RESOURCE_EXHAUSTED "
                        "(default %(default)s)")
    p.add_argument("--warmup", action="store_true",
                   help="fast engine: before serving, run every batch bucket up to --max-batch-size once (and "
                        "with --continuous every row prefix), so their compiles do not stall the first requests "
                        "(on a GPU seconds per bucket); with --continuous-slots also capture every decode step "
                        "graph of the continuous batch (llama-7b, 64 rows, 640 slots: 99 s on an H200)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random-weight presets")
    p.add_argument("--sim-gpus", type=int, default=d.sim_gpus, help="simulated GPUs (simulated backend)")
    p.add_argument("--sim-profile", default=d.sim_profile, choices=list(SIM_PROFILES), metavar="PROFILE",
                   help="simulated GPU profile: " + ", ".join(f"{k} ({v.label})" for k, v in SIM_PROFILES.items())
                        + " (default %(default)s)")
    p.add_argument("--control-token-file", type=Path, metavar="PATH",
                   help="file holding the control token, needed to change power caps (default "
                        "$LLMWATTS_CONTROL_TOKEN_FILE, then $LLMWATTS_CONTROL_TOKEN)")
    p.add_argument("--inference-token-file", type=Path, metavar="PATH",
                   help="file holding the inference token; when set, Inference calls must present it "
                        "(default $LLMWATTS_INFERENCE_TOKEN_FILE, then $LLMWATTS_INFERENCE_TOKEN)")
    p.add_argument("--allow-insecure-loopback-control", action="store_true",
                   help="allow power-cap changes without a token on a loopback-only server")
    p.add_argument("--allow-short-token", action="store_true",
                   help="accept control and inference tokens shorter than 16 bytes (refused by default)")
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="serve TLS with this certificate (with --tls-key)")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--cap-state", type=Path, dest="cap_state_path",
                   help="where cap changes are persisted for restore after a crash (default: DB path + .caps.json); "
                        "clock locks go to this path (or the DB path) + .clocks.json")
    p.add_argument("--default-lease-s", type=float, default=d.default_lease_s,
                   help="seconds until a power cap or clock lock set without a lease reverts (default %(default)s)")
    p.add_argument("--shards", type=int, default=1,
                   help="tensor-parallel shards, one process per GPU (FairScale; default 1)")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="default INFO")
    p.set_defaults(func=run)


def config_from_args(args) -> ServerConfig:
    from llmwatts import credentials

    if not 0 <= args.port <= 65535:
        raise InvalidArgument(f"--port must be between 0 and 65535 (0 picks a free one), got {args.port}")
    for name in ("max_batch_size", "max_new_tokens_limit", "default_max_new_tokens", "queue_size", "sim_gpus"):
        if getattr(args, name) < 1:
            raise InvalidArgument(f"--{name.replace('_', '-')} must be at least 1")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise InvalidArgument(f"--metrics-port must be between 0 and 65535, got {args.metrics_port}")
    if not 0 <= args.telemetry_hz <= 100:
        raise InvalidArgument(f"--telemetry-hz must be between 0 and 100, got {args.telemetry_hz:g}")
    if args.default_max_new_tokens > args.max_new_tokens_limit:
        raise InvalidArgument("--default-max-new-tokens exceeds --max-new-tokens-limit")
    # Checked before the model loads (minutes for a large one), not after.
    from llmwatts.server.gpu import BACKENDS

    check_engine(args.engine, args.continuous)
    if args.continuous and args.shards > 1:
        raise InvalidArgument("--continuous runs on one shard: drop --shards or --continuous")
    if not 0 <= args.batch_wait_ms <= 60000:
        raise InvalidArgument(f"--batch-wait-ms must be between 0 and 60000, got {args.batch_wait_ms:g}")
    if not 0 <= args.stream_interval_ms <= 10000:
        raise InvalidArgument(f"--stream-interval-ms must be between 0 and 10000, got {args.stream_interval_ms:g}")
    if args.continuous_slots < 0:
        raise InvalidArgument(f"--continuous-slots must be 0 or more, got {args.continuous_slots}")
    if args.continuous_join_tokens is not None and not 0 <= args.continuous_join_tokens <= MAX_JOIN_TOKENS:
        raise InvalidArgument(f"--continuous-join-tokens must be between 0 (every join eager) and {MAX_JOIN_TOKENS}, "
                              f"got {args.continuous_join_tokens}")
    if not 0 <= args.continuous_join_rows <= args.max_batch_size:
        raise InvalidArgument(f"--continuous-join-rows must be between 0 (automatic) and --max-batch-size "
                              f"({args.max_batch_size}), got {args.continuous_join_rows}")
    if args.power_backend not in BACKENDS:
        raise InvalidArgument(f"unknown power backend {args.power_backend!r}; choose one of: {', '.join(BACKENDS)}")
    if args.shards < 1:
        raise InvalidArgument("--shards must be at least 1")
    fields = {k: getattr(args, k) for k in ServerConfig.__dataclass_fields__ if hasattr(args, k)}
    fields["control_token"] = credentials.load_token(
        credentials.CONTROL_TOKEN_ENV, credentials.CONTROL_TOKEN_FILE_ENV, path=args.control_token_file)
    fields["inference_token"] = credentials.load_token(
        credentials.INFERENCE_TOKEN_ENV, credentials.INFERENCE_TOKEN_FILE_ENV, path=args.inference_token_file)
    from llmwatts.server.models import check_model_spec

    check_model_spec(args.model)  # a mistyped preset: one line now, not hub retries after the imports
    return ServerConfig(**fields)


def check_leader_resources(args) -> None:
    """What only the serving process (rank 0) holds: its files' folders and its port, checked before the
    model loads (minutes for a large one). Torchrun's other ranks share the argv but hold neither."""
    for flag, path in (("--db", args.db_path), ("--cap-state", args.cap_state_path), ("--port-file", args.port_file)):
        if path is None:
            continue
        if path.is_dir():
            raise InvalidArgument(f"{flag} {path} is a folder: name a file in it, e.g. {path / 'server.db'}")
        if not path.parent.is_dir():
            raise InvalidArgument(f"{flag} {path}: the folder {path.parent} does not exist; create it first")
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                       ("--tls-client-ca", args.tls_client_ca)):
        if path is not None and not path.is_file():
            raise InvalidArgument(f"{flag} {path} is not a file")
    if args.port:
        check_port_free(args.host, args.port)


def run(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    if os.environ.get("RANK", "0") == "0":
        check_leader_resources(args)
    if args.shards > 1:
        import fairscale  # noqa: F401  (the [shards] extra: say so before any rank is spawned)

        from llmwatts.server.sharded import serve_sharded

        return serve_sharded(config, args.shards, port_file=args.port_file)
    from llmwatts.server.lifecycle import serve

    return serve(config, port_file=args.port_file)


def rank_config_from_argv(argv: list[str]) -> tuple[ServerConfig, Path | None]:
    """One torchrun rank's config from ``llmwatts serve``'s flags (``python -m llmwatts.server.sharded``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m llmwatts.server.sharded",
                                     description="One rank of a sharded llmwatts server (run under torchrun).")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", *argv])
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return config_from_args(args), args.port_file
