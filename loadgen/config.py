"""What a load run is: ``LoadConfig``, its Locust options (``--llm-*``) and the result of a run.

Kept free of Locust/gevent imports, so a caller can build a config without monkey-patching its process.
The ``--llm-*`` options travel from a Locust master to its workers, so every value here is a plain
str/int/float/bool/list (msgpack-able).
"""

from __future__ import annotations

import argparse
import json
import typing
import uuid
from dataclasses import dataclass
from dataclasses import field as dataclass_field  # LoadConfig has a `field` attribute

from llmwatts.errors import InvalidArgument
from llmwatts.loadgen.arrivals import ARRIVALS, check_arrivals
from llmwatts.loadgen.prompts import DATASETS, DEFAULT_NUM_PROMPTS, DEFAULT_SEED, GSM8K_SPLITS
from llmwatts.slo import parse_slo
from llmwatts.targets import parse_target, strip_scheme

DEFAULT_DEADLINE_S = 600.0
DEFAULT_TEMPERATURE = 0.8  # paper defaults
DEFAULT_TOP_P = 0.95
DEFAULT_GRACE_S = 60.0
DEFAULT_OPEN_LOOP_CONCURRENCY = 64


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class LoadConfig:
    """One load run. ``target`` is ``HOST:PORT`` of ``llmwatts serve``.

    Bound the run with ``requests`` (exactly that many requests in total, over all users and workers)
    and/or ``run_time_s``; whichever comes first ends it.
    """

    target: str | None = None
    dataset: str = "alpaca"             # alpaca, gsm8k, jsonl, mini
    jsonl_path: str | None = None       # dataset jsonl
    field: str | None = None            # dataset jsonl: the field holding the prompt
    split: str = "test"                 # gsm8k: test or train
    data_dir: str | None = None         # searched first for prompt files
    num_prompts: int = DEFAULT_NUM_PROMPTS
    seed: int = DEFAULT_SEED            # prompt sampling and the server's sampler
    batch_size: int = 1                 # prompts per request
    users: int = 1                      # concurrent closed-loop users (each waits for its reply)
    rate_rps: float | None = None       # open loop: requests/s over all workers (None: closed loop)
    arrival: str = "poisson"            # open loop: poisson, constant or gamma (see arrivals.py)
    burstiness: float = 1.0             # gamma's shape
    max_concurrency: int | None = None  # open loop: requests in flight at most (default 64)
    grace_s: float = DEFAULT_GRACE_S    # --run-time: how long requests in flight at the deadline may finish
    slo: str = ""                       # ttft_ms=..,tpot_ms=..,e2e_ms=.. (goodput in the summary)
    record_chunks: bool = False         # streams: one client_chunks row per token-carrying chunk
    spawn_rate: float | None = None     # users started per second; default: all at once
    run_time_s: float | None = None
    requests: int | None = None
    stream: bool = False                # GenerateStream instead of Generate
    max_new_tokens: int | None = None   # None: the server's default
    ignore_eos: bool = False            # fixed-length outputs
    greedy: bool = False
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    run_id: str | None = None           # default: generated
    labels: dict[str, str] = dataclass_field(default_factory=dict)
    client_db: str | None = None        # default: llmwatts-client-<run_id>.db
    deadline_s: float = DEFAULT_DEADLINE_S
    ca: str | None = None               # TLS: CA bundle of the server's certificate
    cert: str | None = None             # mutual TLS: client certificate and key
    key: str | None = None
    token: str | None = None            # inference bearer token; default $LLMWATTS_INFERENCE_TOKEN (never forwarded)
    # Distributed mode (Locust master/workers, ZeroMQ on master_port).
    master: bool = False
    expect_workers: int = 1
    master_bind_host: str = "*"
    master_port: int = 5557
    worker: bool = False
    master_host: str = "127.0.0.1"
    quiet: bool = False                 # no Locust log lines
    # Library only: BeginRun's run_secret is written here until EndRun succeeds (loadgen/run_secret.py), so
    # whoever started a load that died can still end its run.
    run_secret_file: str | None = None

    def validate(self) -> None:
        """Raise ``InvalidArgument`` with a message naming the flag to fix; ``target`` becomes plain
        ``HOST:PORT`` (``llmwatts.targets.parse_target``: the one target parser)."""
        if self.master and self.worker:
            raise InvalidArgument("--master and --worker exclude each other")
        if not self.worker and not self.target:
            raise InvalidArgument("--target HOST:PORT is required (the address of `llmwatts serve`)")
        if self.target:
            self.target = parse_target(self.target)
        if self.dataset not in DATASETS:
            raise InvalidArgument(f"--dataset must be one of {', '.join(DATASETS)}")
        if self.dataset == "jsonl" and not (self.jsonl_path and self.field):
            raise InvalidArgument("--dataset jsonl needs --jsonl-path FILE and --field NAME")
        if self.split not in GSM8K_SPLITS:
            raise InvalidArgument("--split must be test or train")
        for name in ("batch_size", "users", "num_prompts"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"--{name.replace('_', '-')} must be at least 1")
        if self.requests is not None and self.requests < 1:
            raise InvalidArgument("--requests must be at least 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InvalidArgument("--max-new-tokens must be at least 1")
        if self.run_time_s is not None and self.run_time_s <= 0:
            raise InvalidArgument("--run-time must be positive")
        if not self.worker and self.requests is None and self.run_time_s is None:
            raise InvalidArgument("bound the run: pass --requests N and/or --run-time DURATION")
        if self.deadline_s <= 0:
            raise InvalidArgument("--deadline-s must be positive")
        check_arrivals(self.rate_rps, self.arrival, self.burstiness)
        if self.max_concurrency is not None and (self.rate_rps is None or self.max_concurrency < 1):
            raise InvalidArgument("--max-concurrency must be at least 1 and applies with --rate "
                                  "(closed loop: --users is the concurrency)")
        if not self.grace_s >= 0:
            raise InvalidArgument("--grace must be zero or more seconds")
        slo = parse_slo(self.slo)
        if (slo.ttft_ms is not None or slo.tpot_ms is not None) and not self.stream and not self.worker:
            raise InvalidArgument("--slo ttft_ms/tpot_ms need --stream (a unary call has no first token)")
        if self.record_chunks and not self.stream and not self.worker:
            raise InvalidArgument("--record-chunks needs --stream")
        if (self.cert or self.key) and not self.ca:
            raise InvalidArgument("--cert/--key need --ca (mutual TLS)")

    def concurrency(self) -> int:
        """Locust users to start: the closed loop's ``users``, or the open loop's ``max_concurrency``."""
        if self.rate_rps is None:
            return self.users
        return self.max_concurrency or DEFAULT_OPEN_LOOP_CONCURRENCY

    def closed_loop_users(self) -> int | None:
        """The closed loop's users (its setting); None for an open loop, which is set by its rate and
        arrival process (its Locust users are only its ``max_concurrency``)."""
        return self.users if self.rate_rps is None else None

    def run_labels(self, dataset: str) -> dict[str, str]:
        """The run's labels (client_runs.labels, BeginRun): its settings, then every ``--label``. A closed
        loop is labelled ``users``, an open loop ``rate_rps``, ``arrival`` and ``max_concurrency``."""
        labels = {
            "dataset": dataset,
            "batch_size": str(self.batch_size),
            "stream": str(int(self.stream)),
            "num_prompts": str(self.num_prompts),
            "seed": str(self.seed),
            "ignore_eos": str(int(self.ignore_eos)),
            "sampling": "greedy" if self.greedy else f"temperature={self.temperature},top_p={self.top_p}",
        }
        if self.max_new_tokens is not None:
            labels["max_new_tokens"] = str(self.max_new_tokens)
        if self.rate_rps is None:
            labels["users"] = str(self.users)
        else:
            labels.update(rate_rps=f"{self.rate_rps:g}", arrival=self.arrival, max_concurrency=str(self.concurrency()))
            if self.arrival == "gamma":
                labels["burstiness"] = f"{self.burstiness:g}"
        if self.slo:
            labels["slo"] = self.slo
        labels.update(self.labels)
        return labels

    def resolved_run_id(self) -> str:
        if not self.run_id:
            self.run_id = new_run_id()
        return self.run_id

    def resolved_client_db(self) -> str:
        return self.client_db or f"llmwatts-client-{self.resolved_run_id()}.db"

    def to_options(self) -> dict:
        """The ``llm_*`` Locust options (what a master forwards to its workers)."""
        return {f"llm_{name}": _to_option(name, getattr(self, name)) for name in OPTION_FIELDS}

    @classmethod
    def from_options(cls, options: argparse.Namespace | dict, host: str | None = None) -> LoadConfig:
        values = vars(options) if isinstance(options, argparse.Namespace) else dict(options)
        kwargs = {}
        for name in OPTION_FIELDS:
            key = f"llm_{name}"
            if key in values and values[key] is not None:
                kwargs[name] = _from_option(name, values[key])
        config = cls(target=strip_scheme(host) if host else None, **kwargs)
        if values.get("num_users"):
            config.users = int(values["num_users"])
            if config.rate_rps is not None:
                config.max_concurrency = config.users
        return config


_FIELD_TYPES = typing.get_type_hints(LoadConfig)

# LoadConfig fields that are Locust options (the rest come from Locust's own flags or stay local).
OPTION_FIELDS = (
    "dataset", "jsonl_path", "field", "split", "data_dir", "num_prompts", "seed", "batch_size", "requests",
    "stream", "max_new_tokens", "ignore_eos", "greedy", "temperature", "top_p", "run_id", "labels",
    "client_db", "deadline_s", "ca", "cert", "key", "rate_rps", "arrival", "burstiness", "slo", "record_chunks",
)


def _to_option(name, value):
    if name == "labels":
        return [f"{k}={v}" for k, v in (value or {}).items()]
    return value


def _from_option(name, value):
    """An option's value as LoadConfig's field type. Locust's web UI sends text for an option whose default
    is None (``--llm-rate``, ``--llm-max-new-tokens``...): ``"3"`` becomes 3, ``""`` None."""
    if name == "labels":
        return parse_labels(value)
    if not isinstance(value, str):
        return value
    kinds = [t for t in typing.get_args(_FIELD_TYPES[name]) or (_FIELD_TYPES[name],) if t is not type(None)]
    kind = kinds[0]
    if kind is str:
        return value
    if value.strip() == "":
        return None
    try:
        return value.strip().lower() in ("1", "true", "yes", "on") if kind is bool else kind(value)
    except ValueError:
        raise InvalidArgument(f"--llm-{name.replace('_', '-')} wants a {kind.__name__}, got {value!r}") from None


def parse_labels(items) -> dict[str, str]:
    """``["k=v", ...]`` (or a JSON object string) → dict."""
    if isinstance(items, dict):
        return {str(k): str(v) for k, v in items.items()}
    if isinstance(items, str):
        items = json.loads(items) if items.startswith("{") else [items]
        if isinstance(items, dict):
            return {str(k): str(v) for k, v in items.items()}
    labels = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--label must be KEY=VALUE, got {item!r}")
        labels[key] = value
    return labels


def add_locust_arguments(parser) -> None:
    """The ``--llm-*`` options of ``locust -f loadgen/locustfile.py`` (also shown in the web UI)."""
    # Locust's web UI lists the arguments its own parser's add_argument marked include_in_web_ui; an argument
    # group's add_argument is argparse's and marks nothing (the UI showed none of these). Mark each here.
    group = parser.add_argument_group("llmwatts", "LLM inference load (see docs/loadgen.md)")

    def add(*args, **kwargs):
        action = group.add_argument(*args, **kwargs)
        action.include_in_web_ui, action.is_secret, action.is_required, action.is_multiple = True, False, False, False
        return action

    d = LoadConfig()
    add("--llm-dataset", choices=DATASETS, default=d.dataset, help="prompt source")
    add("--llm-jsonl-path", default=None, help="JSONL file for --llm-dataset jsonl")
    add("--llm-field", default=None, help="JSONL field holding the prompt")
    add("--llm-split", choices=GSM8K_SPLITS, default=d.split, help="GSM8K split")
    add("--llm-data-dir", default=None, help="folder searched first for prompt files")
    add("--llm-num-prompts", type=int, default=d.num_prompts, help="prompts sampled (4096)")
    add("--llm-seed", type=int, default=d.seed, help="sampling seed")
    add("--llm-batch-size", type=int, default=d.batch_size, help="prompts per request")
    add("--llm-requests", type=int, default=None, help="stop after exactly N requests in total")
    add("--llm-stream", action="store_true", default=False, help="use GenerateStream")
    add("--llm-max-new-tokens", type=int, default=None, help="default: the server's")
    add("--llm-ignore-eos", action="store_true", default=False, help="fixed-length outputs")
    add("--llm-greedy", action="store_true", default=False, help="greedy decoding")
    add("--llm-temperature", type=float, default=d.temperature)
    add("--llm-top-p", type=float, default=d.top_p)
    add("--llm-run-id", default="", help="default: generated per test")
    add("--llm-label", dest="llm_labels", action="append", default=[], metavar="K=V",
        help="run label (repeatable)")
    add("--llm-client-db", default="", help="client DB (default llmwatts-client-<run_id>.db)")
    add("--llm-deadline-s", type=float, default=d.deadline_s, help="per-call deadline")
    add("--llm-rate", dest="llm_rate_rps", type=float, default=None,
        help="open loop: requests/s over all workers (Number of users = max concurrency)")
    add("--llm-arrival", choices=ARRIVALS, default=d.arrival, help="open loop: arrival process")
    add("--llm-burstiness", type=float, default=d.burstiness, help="gamma arrivals: shape")
    add("--llm-slo", default="", help="goodput objectives, e.g. ttft_ms=500,tpot_ms=50,e2e_ms=5000")
    add("--llm-record-chunks", action="store_true", default=False,
        help="streams: keep every chunk's arrival time (table client_chunks)")
    add("--llm-ca", default=None, help="TLS: server CA bundle")
    add("--llm-cert", default=None, help="mutual TLS: client certificate")
    add("--llm-key", default=None, help="mutual TLS: client key")
