"""Per-run paper metrics ("From Words to Watts", Samsi et al. 2023), reconciliation, trade-offs, SLA.

Definitions, units and clocks are in docs/analysis.md; the short form is on each column in
``METRIC_COLUMNS``. Every row carries ``power`` ("simulated" or the server's power source, e.g. "nvml")
and ``simulated`` so no simulated number is ever shown unlabelled.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

from llmwatts.analysis import join as joins
from llmwatts.analysis.ingest import open_study_db
from llmwatts.errors import InvalidArgument, NotFound

# Column -> short definition (units). Order is the order of runs.csv / runs.md.
METRIC_COLUMNS: dict[str, str] = {
    "run_id": "run id (client-made, sent with BeginRun)",
    "model": "model name (servers.model)",
    "engine": "inference engine (servers.engine)",
    "dtype": "weights dtype (servers.dtype)",
    "dataset": "prompt dataset (labels / client_runs.dataset)",
    "batch_size": "prompts per request (labels / client_runs.batch_size)",
    "shard_count": "GPUs the model is sharded over (servers.shard_count)",
    "cap_w": "power cap, W (labels.cap_w, else the most common telemetry cap_mw in the window)",
    "users": "concurrent load users (client_runs.users)",
    "n_gpus": "GPUs with telemetry in the window",
    "power": "'simulated' if any contributing number is simulated, else the power source",
    "duration_s": "run window end_ns - begin_ns (server clock), s",
    "requests_ok": "server request rows with status ok",
    "requests_failed": "server request rows with another status",
    "requests_refused": "client rows of the run with no server row (refused at the door or lost)",
    "responses": "sum of n_prompts over ok server requests",
    "output_tokens": "sum of output_tokens over ok server requests",
    "output_words": "sum of output_words over ok client requests",
    "words_per_s": "output_words / duration_s",
    "tokens_per_s": "output_tokens / duration_s",
    "responses_per_s": "responses / duration_s",
    "energy_total_j": "window energy, J: sum over servers of end_energy_j - begin_energy_j (all GPUs)",
    "energy_busy_j": "sum of batches.energy_j over the run's batches, J",
    "energy_source": "'counter' (BeginRun/EndRun counter readings) or 'telemetry' (per-GPU counter deltas)",
    "avg_power_w": "energy_total_j / duration_s, W (all GPUs together)",
    "j_per_token": "energy_total_j / output_tokens, J",
    "j_per_response": "energy_total_j / responses, J",
    "sm_pct_mean": "mean sm_pct over all GPUs and all samples in the window, %",
    "mem_pct_mean": "mean mem_pct (memory-controller busy, DCGM 'memory utilisation') likewise, %",
    "mem_used_pct_max": "max over GPUs and samples of mem_used_bytes / memory_total_bytes, %",
    "latency_p50_ms": "median client latency_ms of ok client requests (exact, linear interpolation)",
    "latency_p95_ms": "95th percentile client latency_ms, ms",
    "latency_p99_ms": "99th percentile client latency_ms, ms",
    "ttft_p50_ms": "median client ttft_ms (streamed ok requests), ms",
    "ttft_p95_ms": "95th percentile client ttft_ms, ms",
    "gpu_energy_min_j": "least window energy of one GPU (telemetry counter delta), J",
    "gpu_energy_max_j": "most window energy of one GPU, J",
    "gpu_energy_spread": "gpu_energy_max_j / gpu_energy_min_j (1.0 = even load across shards)",
    "attribution_rel_diff": "(sum of request energy_j - sum of batch energy_j) / sum of batch energy_j",
    "simulated": "1 if any server, run, batch or telemetry row in the run is simulated",
    "labels": "other run labels (JSON)",
}
LABEL_COLUMNS = ("model", "engine", "dtype", "dataset", "batch_size", "shard_count", "cap_w", "users")
NUMERIC_LABELS = ("batch_size", "shard_count", "cap_w", "users")


def is_ok(status) -> bool:
    """True for a successful request. The server writes the gRPC code name ``OK``, the client ``ok``."""
    return isinstance(status, str) and status.lower() == "ok"


def _number(value):
    """Run labels travel as strings (a proto ``map<string, string>``): "300" -> 300, "0.5" -> 0.5."""
    if not isinstance(value, str):
        return value
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def percentile(values: list[float], pct: float) -> float | None:
    """Exact percentile with linear interpolation between order statistics (numpy's default method).

    rank = pct/100 * (n - 1); the result interpolates between the values at floor(rank) and ceil(rank).
    None for an empty list.
    """
    if not 0 <= pct <= 100:
        raise InvalidArgument(f"percentile must be within 0..100, got {pct}")
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    rank = pct / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _div(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def _json(value) -> dict:
    if not value:
        return {}
    try:
        parsed = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _one(db, sql, params=()):
    return db.execute(sql, params).fetchone()


@dataclass
class Reconciliation:
    """Client rows vs server rows and attributed vs batch joules for one run."""

    run_id: str
    client_sent: int
    server_ok: int
    server_error: int
    missing: int
    duplicated: int
    server_only: int
    attributed_j: float
    batch_j: float
    attribution_rel_diff: float | None
    missing_ids: list[str] = field(default_factory=list)
    duplicated_ids: list[str] = field(default_factory=list)
    server_only_ids: list[str] = field(default_factory=list)
    # Client rows sent before BeginRun or after EndRun of their server, compared on the server clock
    # (client_send_ns + clock_offset_ns): their energy is outside the run window.
    outside_window: int = 0
    outside_window_ids: list[str] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        """Every client row found exactly once and no server row unclaimed."""
        return self.missing == 0 and self.duplicated == 0 and self.server_only == 0


def _unique_server_rows(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for row in rows:
        key = (row["server_id"], row["request_id"])
        if key not in seen:
            seen.add(key)
            out.append(row)
    return out


def _batch_energy_j(db, server_rows: list[dict]) -> float:
    keys = sorted({(r["server_id"], r["batch_id"]) for r in server_rows if r.get("batch_id") is not None})
    total = 0.0
    for server_id, batch_id in keys:
        row = _one(db, "SELECT energy_j FROM batches WHERE server_id = ? AND batch_id = ?", [server_id, batch_id])
        if row and row[0] is not None:
            total += row[0]
    return total


def reconcile(study_db, run_id: str) -> Reconciliation:
    """Counts of the run's client requests found on a server exactly once (ok / error), missing or
    duplicated, server rows no client claims, and Σ per-request attributed J vs Σ batch J."""
    db = open_study_db(study_db, create=False)
    _require_run(db, run_id)
    join = joins.join_requests(db, run_id)
    server_rows = _unique_server_rows(join.server_rows)
    attributed_j = sum(r.get("energy_j") or 0.0 for r in server_rows)
    batch_j = _batch_energy_j(db, server_rows)
    windows = {w.server_id: w for w in joins.run_windows(db, run_id)}
    outside = []
    for m in join.matched:
        window = windows.get(m["server_server_id"])
        send_ns = joins.client_to_server_ns(m["client_client_send_ns"], m["client_client_clock_offset_ns"])
        if window is None or send_ns is None:
            continue
        if send_ns < window.begin_ns or (window.end_ns is not None and send_ns > window.end_ns):
            outside.append(m["request_id"])
    return Reconciliation(
        run_id=run_id,
        client_sent=len(join.client_rows),
        server_ok=sum(1 for m in join.matched if is_ok(m["server_status"])),
        server_error=sum(1 for m in join.matched if not is_ok(m["server_status"])),
        missing=len(join.client_only),
        duplicated=len(join.duplicated),
        server_only=len(join.server_only),
        attributed_j=attributed_j,
        batch_j=batch_j,
        attribution_rel_diff=_div(attributed_j - batch_j, batch_j),
        missing_ids=[r["request_id"] for r in join.client_only],
        duplicated_ids=sorted(join.duplicated),
        server_only_ids=[r["request_id"] for r in join.server_only],
        outside_window=len(outside),
        outside_window_ids=outside,
    )


def _require_run(db, run_id: str) -> None:
    in_runs = db["runs"].exists() and _one(db, "SELECT 1 FROM runs WHERE run_id = ?", [run_id])
    in_client = db["client_runs"].exists() and _one(db, "SELECT 1 FROM client_runs WHERE run_id = ?", [run_id])
    if not (in_runs or in_client):
        known = ", ".join(joins.run_ids(db)) or "none"
        raise NotFound(f"no run {run_id!r} in the study DB (runs: {known})")


def _labels(db, run_id: str, windows: list[joins.RunWindow]) -> tuple[dict, dict]:
    """(label columns, other labels). Server run labels win over client ones; then server/client rows."""
    labels: dict = {}
    client_runs = (
        list(db.query("SELECT * FROM client_runs WHERE run_id = ? ORDER BY started_ns", [run_id]))
        if db["client_runs"].exists() else []
    )
    for client_run in client_runs:
        for key, value in _json(client_run.get("labels")).items():
            labels.setdefault(key, value)
    for row in db.query("SELECT labels FROM runs WHERE run_id = ? ORDER BY server_id", [run_id]):
        labels.update(_json(row["labels"]))
    columns = {k: labels.pop(k) for k in LABEL_COLUMNS if k in labels}
    for client_run in client_runs:
        for key in ("dataset", "batch_size", "users"):
            if columns.get(key) is None and client_run.get(key) is not None:
                columns[key] = client_run[key]
        if client_run.get("users") is not None and len(client_runs) > 1:
            columns["users"] = sum(c.get("users") or 0 for c in client_runs)
    servers = [
        _one_dict(db, "SELECT * FROM servers WHERE server_id = ?", [w.server_id]) for w in windows
    ]
    servers = [s for s in servers if s]
    for key in ("model", "engine", "dtype", "shard_count"):
        if columns.get(key) is None:
            values = sorted({s.get(key) for s in servers if s.get(key) is not None}, key=str)
            if values:
                columns[key] = values[0] if len(values) == 1 else "/".join(map(str, values))
    for key in NUMERIC_LABELS:
        columns[key] = _number(columns.get(key))
    return columns, {"_servers": servers, **labels}


def _one_dict(db, sql, params) -> dict | None:
    rows = list(db.query(sql, params))
    return rows[0] if rows else None


def _gpu_energy_j(telemetry: list[dict]) -> dict[tuple[str, str], float]:
    """Per (server, GPU) counter delta over the window: last sample's energy_mj - first's, in J."""
    first: dict = {}
    last: dict = {}
    for row in telemetry:  # ordered by gpu_uuid, ts_ns
        if row.get("energy_mj") is None:
            continue
        key = (row["server_id"], row["gpu_uuid"])
        first.setdefault(key, row["energy_mj"])
        last[key] = row["energy_mj"]
    return {key: (last[key] - first[key]) / 1000 for key in first}


def run_metrics(study_db, run_id: str) -> dict:
    """All ``METRIC_COLUMNS`` for one run (see docs/analysis.md for each definition)."""
    db = open_study_db(study_db, create=False)
    _require_run(db, run_id)
    windows = joins.run_windows(db, run_id)
    columns, extra = _labels(db, run_id, windows)
    servers = extra.pop("_servers")
    join = joins.join_requests(db, run_id)
    server_rows = _unique_server_rows(join.server_rows)
    ok_rows = [r for r in server_rows if is_ok(r.get("status"))]

    telemetry = [row for w in windows for row in joins.telemetry_in_window(db, w)]
    durations = [w.duration_s for w in windows if w.duration_s is not None]
    # Several servers in one run (separate hosts): each window is on its own server's clock, so the
    # run lasts as long as the longest one; energies add.
    duration_s = max(durations) if durations else None

    counter = [w for w in windows if w.begin_energy_j is not None and w.end_energy_j is not None]
    gpu_energy = _gpu_energy_j(telemetry)
    if windows and len(counter) == len(windows):
        energy_total_j, energy_source = sum(w.end_energy_j - w.begin_energy_j for w in counter), "counter"
    elif gpu_energy:
        energy_total_j, energy_source = sum(gpu_energy.values()), "telemetry"
    else:
        energy_total_j, energy_source = None, None

    responses = sum(r.get("n_prompts") or 0 for r in ok_rows)
    output_tokens = sum(r.get("output_tokens") or 0 for r in ok_rows)
    client_ok = [r for r in join.client_rows if is_ok(r.get("status"))]
    output_words = sum(r.get("output_words") or 0 for r in client_ok) if join.client_rows else None
    latencies = [r["latency_ms"] for r in client_ok if r.get("latency_ms") is not None]
    ttfts = [r["ttft_ms"] for r in client_ok if r.get("ttft_ms") is not None]
    batch_j = _batch_energy_j(db, server_rows)
    attributed_j = sum(r.get("energy_j") or 0.0 for r in server_rows)

    if columns.get("cap_w") is None:
        caps = Counter(r["cap_mw"] for r in telemetry if r.get("cap_mw") is not None)
        if caps:
            columns["cap_w"] = caps.most_common(1)[0][0] / 1000

    memory_total = {
        (g["server_id"], g["gpu_uuid"]): g["memory_total_bytes"]
        for w in windows
        for g in db.query("SELECT * FROM gpus WHERE server_id = ?", [w.server_id])
    } if db["gpus"].exists() else {}
    mem_used_pct = [
        100 * r["mem_used_bytes"] / memory_total[(r["server_id"], r["gpu_uuid"])]
        for r in telemetry
        if r.get("mem_used_bytes") is not None and memory_total.get((r["server_id"], r["gpu_uuid"]))
    ]
    sm = [r["sm_pct"] for r in telemetry if r.get("sm_pct") is not None]
    mem = [r["mem_pct"] for r in telemetry if r.get("mem_pct") is not None]

    simulated = (
        any(w.simulated for w in windows)
        or any(s.get("simulated") for s in servers)
        or any(r.get("simulated") for r in telemetry)
        or _any_simulated_batch(db, server_rows)
    )
    sources = sorted({s.get("power_source") for s in servers if s.get("power_source")})
    power = "simulated" if simulated else ("/".join(sources) if sources else "nvml")

    gpu_values = list(gpu_energy.values())
    row = {
        "run_id": run_id,
        **{k: columns.get(k) for k in LABEL_COLUMNS},
        "n_gpus": len({(r["server_id"], r["gpu_uuid"]) for r in telemetry}) or None,
        "power": power,
        "duration_s": duration_s,
        "requests_ok": len(ok_rows),
        "requests_failed": len(server_rows) - len(ok_rows),
        "requests_refused": len(join.client_only),
        "responses": responses,
        "output_tokens": output_tokens,
        "output_words": output_words,
        "words_per_s": _div(output_words, duration_s),
        "tokens_per_s": _div(output_tokens, duration_s),
        "responses_per_s": _div(responses, duration_s),
        "energy_total_j": energy_total_j,
        "energy_busy_j": batch_j if server_rows else None,
        "energy_source": energy_source,
        "avg_power_w": _div(energy_total_j, duration_s),
        "j_per_token": _div(energy_total_j, output_tokens),
        "j_per_response": _div(energy_total_j, responses),
        "sm_pct_mean": _div(sum(sm), len(sm)),
        "mem_pct_mean": _div(sum(mem), len(mem)),
        "mem_used_pct_max": max(mem_used_pct) if mem_used_pct else None,
        "latency_p50_ms": percentile(latencies, 50),
        "latency_p95_ms": percentile(latencies, 95),
        "latency_p99_ms": percentile(latencies, 99),
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p95_ms": percentile(ttfts, 95),
        "gpu_energy_min_j": min(gpu_values) if gpu_values else None,
        "gpu_energy_max_j": max(gpu_values) if gpu_values else None,
        "gpu_energy_spread": _div(max(gpu_values), min(gpu_values)) if gpu_values else None,
        "attribution_rel_diff": _div(attributed_j - batch_j, batch_j),
        "simulated": int(simulated),
        "labels": json.dumps(extra, sort_keys=True) if extra else "",
    }
    assert list(row) == list(METRIC_COLUMNS), "METRIC_COLUMNS and run_metrics disagree"
    return row


def _any_simulated_batch(db, server_rows: list[dict]) -> bool:
    for key in {(r["server_id"], r["batch_id"]) for r in server_rows if r.get("batch_id") is not None}:
        row = _one(db, "SELECT simulated FROM batches WHERE server_id = ? AND batch_id = ?", list(key))
        if row and row[0]:
            return True
    return False


def all_run_metrics(study_db) -> list[dict]:
    """``run_metrics`` for every run a server saw, in order of BeginRun."""
    db = open_study_db(study_db, create=False)
    return [run_metrics(db, run_id) for run_id in joins.run_ids(db)]


@dataclass
class TradeoffPoint:
    run_id: str
    latency_p95_ms: float
    j_per_token: float
    pareto: bool
    row: dict


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (x, y) points, both to be minimised: True where no other point is ≤ in both and < in one."""
    flags = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (ox <= x and oy <= y) and (ox < x or oy < y) for j, (ox, oy) in enumerate(points) if j != i
        )
        flags.append(not dominated)
    return flags


def tradeoffs(study_db=None, *, runs: list[dict] | None = None, where: dict | None = None) -> list[TradeoffPoint]:
    """Latency p95 (ms) vs J/token across runs (e.g. differing by cap or batch size), with the Pareto
    front (both minimised). ``runs`` defaults to ``all_run_metrics(study_db)``; ``where`` keeps runs whose
    columns equal the given values (e.g. ``{"model": "llama-7b", "shard_count": 1}``). Runs lacking
    either value are left out. Sorted by latency p95."""
    if runs is None:
        if study_db is None:
            raise InvalidArgument("tradeoffs needs a study DB or a list of run rows")
        runs = all_run_metrics(study_db)
    where = where or {}
    unknown = [k for k in where if k not in METRIC_COLUMNS]
    if unknown:
        raise InvalidArgument(f"unknown run column(s) {', '.join(unknown)}; use one of {', '.join(METRIC_COLUMNS)}")
    chosen = [
        r for r in runs
        if r.get("latency_p95_ms") is not None and r.get("j_per_token") is not None
        and all(r.get(k) == v for k, v in where.items())
    ]
    flags = pareto_front([(r["latency_p95_ms"], r["j_per_token"]) for r in chosen])
    points = [
        TradeoffPoint(r["run_id"], r["latency_p95_ms"], r["j_per_token"], flag, r)
        for r, flag in zip(chosen, flags)
    ]
    return sorted(points, key=lambda p: (p.latency_p95_ms, p.j_per_token))


@dataclass
class SlaChoice:
    """The run with the lowest J/token whose latency p95 meets the bound; ``row`` None when none does."""

    latency_p95_ms_max: float
    row: dict | None
    message: str

    @property
    def met(self) -> bool:
        return self.row is not None


def choose_sla(study_db=None, *, latency_p95_ms_max: float, runs: list[dict] | None = None) -> SlaChoice:
    """Lowest-J/token run with ``latency_p95_ms <= latency_p95_ms_max``; the message says why if none."""
    if latency_p95_ms_max is None or not latency_p95_ms_max > 0 or math.isinf(latency_p95_ms_max):
        raise InvalidArgument(f"latency p95 bound must be a positive number of ms, got {latency_p95_ms_max}")
    points = tradeoffs(study_db, runs=runs)
    if not points:
        return SlaChoice(latency_p95_ms_max, None, "no run has both a latency p95 and a J/token to compare")
    meeting = [p for p in points if p.latency_p95_ms <= latency_p95_ms_max]
    if not meeting:
        fastest = min(points, key=lambda p: p.latency_p95_ms)
        return SlaChoice(
            latency_p95_ms_max,
            None,
            f"no run meets latency p95 <= {latency_p95_ms_max:g} ms; the fastest is {fastest.run_id} "
            f"at {fastest.latency_p95_ms:.1f} ms ({fastest.j_per_token:.4g} J/token)",
        )
    best = min(meeting, key=lambda p: (p.j_per_token, p.latency_p95_ms))
    row = best.row
    config = ", ".join(f"{k}={row[k]}" for k in LABEL_COLUMNS if row.get(k) is not None)
    label = " [SIMULATED power]" if row.get("simulated") else ""
    return SlaChoice(
        latency_p95_ms_max,
        row,
        f"run {best.run_id} ({config}) meets latency p95 <= {latency_p95_ms_max:g} ms at "
        f"{best.latency_p95_ms:.1f} ms with the lowest energy, {best.j_per_token:.4g} J/token{label}",
    )


__all__ = [
    "METRIC_COLUMNS",
    "Reconciliation",
    "SlaChoice",
    "TradeoffPoint",
    "all_run_metrics",
    "choose_sla",
    "pareto_front",
    "percentile",
    "reconcile",
    "run_metrics",
    "tradeoffs",
]
