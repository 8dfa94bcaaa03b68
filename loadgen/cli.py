"""``llmwatts load``: a thin wrapper over ``run_load`` (Locust is imported only when the command runs)."""

from __future__ import annotations

import json
import sys

from llmwatts.errors import InvalidArgument
from llmwatts.loadgen.arrivals import ARRIVALS
from llmwatts.loadgen.config import DEFAULT_DEADLINE_S, LoadConfig, parse_labels
from llmwatts.loadgen.prompts import DATASETS, DEFAULT_NUM_PROMPTS, DEFAULT_SEED, GSM8K_SPLITS, load_prompts

def parse_duration_s(text: str, flag: str = "--run-time") -> float:
    """``"90"``, ``"30s"``, ``"5m"``, ``"1h30m"`` → seconds, by Locust's own ``parse_timespan`` (so
    ``llmwatts load --run-time`` reads exactly what ``locust -t`` reads)."""
    from locust.util.timespan import parse_timespan  # imports Locust: only once a run is asked for

    try:
        return float(parse_timespan(text.strip().lower()))
    except ValueError:
        raise InvalidArgument(f"{flag} must look like 30s, 5m or 1h30m, got {text!r}") from None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "load",
        help="replay prompts against `llmwatts serve` with Locust and record every request",
        description="Headless Locust load run against an llmwatts server. Every request leaves one exact row "
        "in the client DB (SQLite). Bound the run with --requests and/or --run-time. Distributed: one "
        "`--master --expect-workers K` and K `--worker --master-host HOST`.",
    )
    add_load_arguments(p, distributed=True)
    p.set_defaults(func=run)

    s = subparsers.add_parser(
        "sweep",
        help="one load run per power cap (set over the Control RPC) and/or arrival rate, for latency-vs-energy studies",
        description="For each cap in --caps: set it on the server's GPUs (leased, needs the control token from "
        "--control-token-file, $LLMWATTS_CONTROL_TOKEN_FILE or $LLMWATTS_CONTROL_TOKEN), run the load, label the run cap_w=W. The caps are "
        "reset when the sweep ends. Then `llmwatts report` shows the runs side by side, the trade-off and the "
        "SLA choice.",
    )
    s.add_argument("--caps", metavar="W,W,...", help="caps in watts, in the order to run them")
    s.add_argument("--rates", metavar="R,R,...",
                   help="open-loop rates in requests/s: one run per rate (under each cap); see --arrival")
    s.add_argument("--gpus", metavar="SEL[,SEL...]",
                   help="GPUs to cap by uuid, index or rank:index, comma-separated (default all)")
    s.add_argument("--lease-s", type=float, default=0.0, help="lease of each cap (default: the server's)")
    s.add_argument("--control-token-file", metavar="PATH",
                   help="file holding the control token (default $LLMWATTS_CONTROL_TOKEN_FILE, then "
                        "$LLMWATTS_CONTROL_TOKEN)")
    add_load_arguments(s, distributed=False)
    s.set_defaults(func=run_sweep)


def add_load_arguments(p, *, distributed: bool) -> None:
    """The flags of one load run (shared by ``load`` and ``sweep``)."""
    p.add_argument("--target", metavar="HOST:PORT",
                   help="address of `llmwatts serve`" + (" (required unless --worker)" if distributed else " (required)"))
    g = p.add_argument_group("prompts")
    g.add_argument("--dataset", choices=DATASETS, default="alpaca",
                   help="alpaca, gsm8k, a JSONL file (jsonl) or the embedded demo set (mini); default alpaca")
    g.add_argument("--jsonl-path", metavar="FILE", help="JSONL file for --dataset jsonl")
    g.add_argument("--field", help="JSONL field holding the prompt (--dataset jsonl)")
    g.add_argument("--split", choices=GSM8K_SPLITS, default="test", help="GSM8K split (default test)")
    g.add_argument("--data-dir", metavar="DIR", help="folder searched first for prompt files")
    g.add_argument("--num-prompts", type=int, default=DEFAULT_NUM_PROMPTS, help="prompts sampled (default 4096)")
    g.add_argument("--seed", type=int, default=DEFAULT_SEED, help="prompt sampling and sampler seed (default 0)")
    g = p.add_argument_group("load")
    g.add_argument("--batch-size", type=int, default=1, help="prompts per request (default 1)")
    g.add_argument("--users", type=int, default=1, help="concurrent closed-loop users (default 1)")
    g.add_argument("--spawn-rate", type=float, help="users started per second (default: all at once)")
    g.add_argument("--run-time", metavar="DURATION", help="stop sending after this long, e.g. 30s, 5m")
    g.add_argument("--grace", metavar="DURATION", default="60s",
                   help="--run-time: requests in flight at the deadline may finish within this long (default "
                        "60s); any still running then is cancelled and counts as failed")
    g.add_argument("--rate", type=float, metavar="R", help="open loop: R requests/s in total (default: closed "
                   "loop, --users)")
    g.add_argument("--arrival", choices=ARRIVALS, default="poisson",
                   help="open loop: arrival process (default poisson)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="--arrival gamma: shape B, scale 1/(rate*B); 1 is Poisson, <1 burstier (vLLM's)")
    g.add_argument("--max-concurrency", type=int, metavar="N",
                   help="open loop: requests in flight at most (default 64); arrivals wait, and their lag shows")
    g.add_argument("--slo", metavar="K=MS,...", default="",
                   help="goodput objectives: ttft_ms, tpot_ms, e2e_ms (ttft/tpot need --stream)")
    g.add_argument("--requests", type=int, metavar="N", help="stop after exactly N requests in total")
    g.add_argument("--stream", action="store_true", help="GenerateStream (records time to first token)")
    g.add_argument("--max-new-tokens", type=int, help="tokens per completion (default: the server's)")
    g.add_argument("--ignore-eos", action="store_true", help="fixed-length: always generate max-new-tokens")
    g.add_argument("--greedy", action="store_true", help="greedy decoding (default: temperature 0.8, top-p 0.95)")
    g.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S, help="per-call deadline (default 600)")
    g = p.add_argument_group("records")
    g.add_argument("--run-id", help="run id (default: generated)")
    g.add_argument("--label", action="append", default=[], metavar="K=V", help="run label (repeatable)")
    g.add_argument("--client-db", metavar="PATH", help="client DB (default llmwatts-client-<run_id>.db)")
    g.add_argument("--record-chunks", action="store_true",
                   help="--stream: keep every chunk's arrival time (table client_chunks; large)")
    g.add_argument("--json", action="store_true", help="print the result as JSON instead of a summary")
    g.add_argument("--quiet", action="store_true", help="no Locust log lines")
    g = p.add_argument_group("security", "the inference token is read from --inference-token-file, "
                                         "$LLMWATTS_INFERENCE_TOKEN_FILE or $LLMWATTS_INFERENCE_TOKEN")
    g.add_argument("--ca", metavar="PEM", help="TLS: CA bundle that signed the server's certificate")
    g.add_argument("--cert", metavar="PEM", help="mutual TLS: client certificate")
    g.add_argument("--key", metavar="PEM", help="mutual TLS: client private key")
    g.add_argument("--inference-token-file", metavar="PATH", help="file holding the inference token")
    if not distributed:
        p.set_defaults(master=False, expect_workers=1, master_bind_host="*", master_port=5557, worker=False,
                       master_host="127.0.0.1")
        return
    g = p.add_argument_group("distributed")
    g.add_argument("--master", action="store_true", help="run as master: hands out work, writes the client DB")
    g.add_argument("--expect-workers", type=int, default=1, help="master: workers to wait for (default 1)")
    g.add_argument("--master-bind-host", default="*", help="master: interface to listen on (default all)")
    g.add_argument("--master-port", type=int, default=5557, help="master port (default 5557)")
    g.add_argument("--worker", action="store_true", help="run as worker of --master-host")
    g.add_argument("--master-host", default="127.0.0.1", help="worker: the master's address")


def config_from_args(args) -> LoadConfig:
    from llmwatts.client import inference_token, parse_target

    token = inference_token(args.inference_token_file)
    return LoadConfig(
        target=parse_target(args.target) if args.target else None, dataset=args.dataset, jsonl_path=args.jsonl_path, field=args.field, split=args.split,
        data_dir=args.data_dir, num_prompts=args.num_prompts, seed=args.seed, batch_size=args.batch_size,
        users=args.users, spawn_rate=args.spawn_rate,
        run_time_s=parse_duration_s(args.run_time) if args.run_time else None, requests=args.requests,
        rate_rps=args.rate, arrival=args.arrival, burstiness=args.burstiness, max_concurrency=args.max_concurrency,
        grace_s=parse_duration_s(args.grace, "--grace"), slo=args.slo, record_chunks=args.record_chunks,
        stream=args.stream, max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos, greedy=args.greedy,
        run_id=args.run_id, labels=parse_labels(args.label), client_db=args.client_db, deadline_s=args.deadline_s,
        ca=args.ca, cert=args.cert, key=args.key, token=token, master=args.master,
        expect_workers=args.expect_workers, master_bind_host=args.master_bind_host, master_port=args.master_port,
        worker=args.worker, master_host=args.master_host, quiet=args.quiet,
    )


def check_prompts(config: LoadConfig) -> None:
    """Load the run's prompts once here, so a missing file is one line before Locust starts."""
    load_prompts(config.dataset, num_prompts=config.num_prompts, seed=config.seed, data_dir=config.data_dir,
                 split=config.split, jsonl_path=config.jsonl_path, field=config.field)


def run(args) -> int:
    config = config_from_args(args)
    config.validate()  # before importing Locust: a usage mistake should not cost a gevent start
    if not (config.master or config.worker):  # a missing prompt file, too (workers load their own)
        check_prompts(config)
    from llmwatts.loadgen.runner import run_load

    result = run_load(config)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(result.summary())
    return 1 if result.requests_failed else 0


def run_sweep(args) -> int:
    from llmwatts.loadgen.sweep import parse_caps, parse_rates
    from llmwatts.client import control_token

    if not (args.caps or args.rates):
        raise InvalidArgument("sweep what? pass --caps W,W,... and/or --rates R,R,...")
    caps = parse_caps(args.caps) if args.caps else None
    rates = parse_rates(args.rates) if args.rates else None
    config = config_from_args(args)
    if rates:
        config.rate_rps = rates[0]  # validated as an open-loop run
    config.validate()
    check_prompts(config)
    token = control_token(args.control_token_file) if caps else None
    from llmwatts.loadgen.sweep import run_sweep as sweep

    steps = sweep(config, caps_w=caps, rates_rps=rates, gpus=args.gpus, lease_s=args.lease_s, control_token=token)
    for step in steps:
        print(f"{step.title()}: {step.result.summary().splitlines()[0]}")
    if any(s.result.power_source == "simulated" for s in steps):
        from llmwatts.console import simulated_power_notice

        print(simulated_power_notice([config.target]))
    return 1 if any(s.result.requests_failed for s in steps) else 0
