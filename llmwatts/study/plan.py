"""A study plan (TOML): a grid of cells, each one load run on one server under its settings.

```toml
[study]
name = "caps"              # run ids are <name>-<cell>-a<attempt>
repetitions = 1            # each cell this many times (rep = 0, 1, ...)
warmup_requests = 2        # per cell, before its run (not recorded as a cell)
idle_s = 3                 # idle power per GPU, measured once per server before the first cell
sla_p95_ms = 5000          # the SLA choice of the report
cap_lease_s = 900          # each cell's cap is leased (renewed while the cell runs)

[[servers]]                # one or more; each cell runs on each server whose engine matches
target = "gpu1:50051"

[load]                     # settings shared by every cell (LoadConfig fields)
requests = 64
max_new_tokens = 256
ignore_eos = true

[grid]                     # dimensions: the cells are their cartesian product, in this order
dataset = ["alpaca", "gsm8k"]
batch_size = [1, 8, 64]
rate_rps = [1.0, 4.0]      # or users = [...] (closed loop)
cap_w = [250, 175]
sm_clock_mhz = [1980, 1395] # locked SM clock per cell (leased, reset after the cell)
weights = ["fp16"]          # only servers started with --weights fp16 run these cells
kv_cache = ["fp16", "fp8"]  # and --kv-cache: each value on the servers started with it
```

Dimensions are generic: a grid key is either a ``LoadConfig`` field (dataset, batch_size, users, rate_rps,
max_new_tokens, stream, ...) or a server-side setting the study runner handles, one of ``SERVER_DIMENSIONS``
(``cap_w``; ``sm_clock_mhz``, a locked SM clock leased through ``ClockClient``; ``engine``, ``weights`` and
``kv_cache`` pick the servers that run that engine, weight precision or KV cache precision; a cell no server
matches is refused). ``--preset paper`` fills the paper's grid (4,096 prompts of Alpaca and GSM8K, batch 64,
256 new tokens) under whatever the plan sets.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from llmwatts.client import parse_target
from llmwatts.errors import InvalidArgument, NotFound
from llmwatts.loadgen.config import LoadConfig
from llmwatts.server.config import KV_CACHES  # serve --kv-cache (torch-free)

# Handled by the runner, not by LoadConfig.
SERVER_DIMENSIONS = ("cap_w", "sm_clock_mhz", "engine", "weights", "kv_cache")
LOAD_FIELDS = {f.name for f in fields(LoadConfig)} - {
    "target", "run_id", "labels", "client_db", "master", "worker", "expect_workers", "master_bind_host",
    "master_port", "master_host", "token", "ca", "cert", "key", "quiet", "run_secret_file"}
WEIGHTS = ("fp16", "fp8")  # serve --weights
MAX_CLOCK_MHZ = 10000
MAX_CELLS = 10000
MAX_NAME_CHARS = 40
PRESETS = {
    # Samsi et al. 2023: 4,096 prompts per dataset, batch 64, max length 256.
    "paper": {"load": {"requests": 64, "num_prompts": 4096, "max_new_tokens": 256},
              "grid": {"dataset": ["alpaca", "gsm8k"], "batch_size": [64]}},
}


@dataclass(frozen=True)
class Cell:
    """One point of the grid (``values``: dimension -> value, in grid order) and its repetition."""

    values: tuple[tuple[str, object], ...]
    rep: int

    @property
    def key(self) -> str:
        """A short readable id, stable across reruns of the same plan: ``batch_size=4,cap_w=250,rep=0``."""
        return ",".join(f"{k}={_text(v)}" for k, v in self.values) + f",rep={self.rep}"

    @property
    def cell_id(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()[:10]

    def labels(self) -> dict[str, str]:
        return {**{k: _text(v) for k, v in self.values}, "rep": str(self.rep)}

    def get(self, name, default=None):
        return dict(self.values).get(name, default)


@dataclass
class Plan:
    name: str
    servers: list[str]
    load: dict
    grid: dict[str, list]
    repetitions: int = 1
    warmup_requests: int = 0
    idle_s: float = 3.0
    sla_p95_ms: float | None = None
    cap_lease_s: float = 900.0  # also the lease of each cell's locked clock
    est_request_s: float = 1.0   # dry-run's guess of one request's latency (closed loop)
    data_dir: str | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    def cells(self) -> list[Cell]:
        names = list(self.grid)
        return [Cell(tuple(zip(names, combo)), rep)
                for combo in itertools.product(*(self.grid[n] for n in names))
                for rep in range(self.repetitions)]

    def load_config(self, cell: Cell, **kw) -> LoadConfig:
        """The ``LoadConfig`` of ``cell`` (plan's [load], then the cell's load dimensions, then ``kw``)."""
        settings = {**self.load, **{k: v for k, v in cell.values if k in LOAD_FIELDS}}
        if self.data_dir and "data_dir" not in settings:
            settings["data_dir"] = self.data_dir
        return LoadConfig(**settings, **kw)

    def estimate_s(self, cell: Cell) -> float:
        """A rough duration of one cell: its requests at its rate (open loop) or over its users."""
        settings = {**self.load, **{k: v for k, v in cell.values if k in LOAD_FIELDS}}
        requests = settings.get("requests") or 0
        run_time = settings.get("run_time_s")
        rate = settings.get("rate_rps")
        if rate:
            busy = requests / rate + self.est_request_s
        else:
            busy = requests * self.est_request_s / max(1, settings.get("users", 1))
        if run_time:
            busy = min(busy, run_time) if requests else run_time
        return busy + self.warmup_requests * self.est_request_s + 2.0

    def fingerprint(self) -> str:
        body = json.dumps({"grid": self.grid, "load": self.load, "reps": self.repetitions}, sort_keys=True,
                          default=str)
        return hashlib.sha256(body.encode()).hexdigest()[:12]


def _text(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_plan(path: str | Path, *, preset: str | None = None, servers: list[str] | None = None) -> Plan:
    """Read and check a plan; ``preset`` fills defaults under it, ``servers`` (HOST:PORT) replace its own."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"no study plan at {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{path} is not valid TOML: {e}") from None
    if preset is not None:
        if preset not in PRESETS:
            raise InvalidArgument(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
        raw = _merge(PRESETS[preset], raw)
    return check_plan(raw, source=str(path), servers=servers)


def check_plan(raw: dict, *, source: str = "plan", servers: list[str] | None = None) -> Plan:
    """A ``Plan`` from a parsed TOML document, or ``InvalidArgument`` naming the key to fix."""
    unknown = set(raw) - {"study", "servers", "load", "grid"}
    if unknown:
        raise InvalidArgument(f"{source}: unknown section(s) {', '.join(sorted(unknown))}: use [study], "
                              "[[servers]], [load], [grid]")
    study = dict(raw.get("study", {}))
    name = str(study.pop("name", "study"))
    if not name or len(name) > MAX_NAME_CHARS or not name.replace("-", "").replace("_", "").isalnum():
        raise InvalidArgument(f"{source}: [study] name must be 1-{MAX_NAME_CHARS} letters, digits, - or _")
    targets = servers or [str(s.get("target", "")) for s in raw.get("servers", []) if isinstance(s, dict)]
    if not targets:
        raise InvalidArgument(f"{source}: name at least one server: [[servers]] target = \"HOST:PORT\" "
                              "(or --server HOST:PORT)")
    targets = [parse_target(t, flag=f"{source}: server target") for t in targets]
    load = dict(raw.get("load", {}))
    bad = set(load) - LOAD_FIELDS
    if bad:
        raise InvalidArgument(f"{source}: [load] has unknown setting(s) {', '.join(sorted(bad))}; known: "
                              f"{', '.join(sorted(LOAD_FIELDS))}")
    grid = {}
    for dim, values in raw.get("grid", {}).items():
        if dim not in LOAD_FIELDS and dim not in SERVER_DIMENSIONS:
            raise InvalidArgument(f"{source}: [grid] {dim} is not a dimension; use a load setting "
                                  f"({', '.join(sorted(LOAD_FIELDS))}) or one of {', '.join(SERVER_DIMENSIONS)}")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise InvalidArgument(f"{source}: [grid] {dim} is empty; give at least one value")
        if dim == "cap_w" and not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values):
            raise InvalidArgument(f"{source}: [grid] cap_w wants watts (positive numbers), got {values}")
        if dim == "sm_clock_mhz" and not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_CLOCK_MHZ
                                             for v in values):
            raise InvalidArgument(f"{source}: [grid] sm_clock_mhz wants whole MHz (1-{MAX_CLOCK_MHZ}), got {values}; "
                                  "`llmwatts clocks get` lists the GPU's supported clocks")
        if dim == "weights" and not all(v in WEIGHTS for v in values):
            raise InvalidArgument(f"{source}: [grid] weights must be among {', '.join(WEIGHTS)}, got {values}")
        if dim == "kv_cache" and not all(v in KV_CACHES for v in values):
            raise InvalidArgument(f"{source}: [grid] kv_cache must be among {', '.join(KV_CACHES)}, got {values}")
        grid[dim] = values
    if "users" in grid and "rate_rps" in grid:
        raise InvalidArgument(f"{source}: [grid] has both users (closed loop) and rate_rps (open loop); pick one")
    known = {"repetitions", "warmup_requests", "idle_s", "sla_p95_ms", "cap_lease_s", "est_request_s", "data_dir"}
    bad = set(study) - known
    if bad:
        raise InvalidArgument(f"{source}: [study] has unknown setting(s) {', '.join(sorted(bad))}; known: name, "
                              f"{', '.join(sorted(known))}")
    plan = Plan(name=name, servers=targets, load=load, grid=grid, source=source, **study)
    if plan.repetitions < 1 or plan.warmup_requests < 0 or plan.idle_s < 0 or plan.cap_lease_s <= 0:
        raise InvalidArgument(f"{source}: repetitions >= 1, warmup_requests >= 0, idle_s >= 0, cap_lease_s > 0")
    if plan.sla_p95_ms is not None and not (plan.sla_p95_ms > 0 and math.isfinite(plan.sla_p95_ms)):
        raise InvalidArgument(f"{source}: sla_p95_ms must be a positive number of ms")
    n = len(plan.cells()) if math.prod(len(v) for v in grid.values()) * plan.repetitions <= MAX_CELLS else None
    if n is None:
        raise InvalidArgument(f"{source}: the grid has more than {MAX_CELLS} cells; split the study")
    cell = plan.cells()[0]
    try:
        plan.load_config(cell, target=targets[0]).validate()
    except InvalidArgument as e:
        raise InvalidArgument(f"{source}: a cell's load is not valid: {e}") from None
    except TypeError as e:
        raise InvalidArgument(f"{source}: {e}") from None
    return plan
