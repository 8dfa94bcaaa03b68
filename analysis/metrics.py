"""Per-run paper metrics ("From Words to Watts", Samsi et al. 2023), reconciliation, trade-offs, SLA.

Definitions, units and clocks are in docs/analysis.md; the short form is on each column in
``METRIC_COLUMNS``. Every row carries ``power`` ("simulated" or the server's power source, e.g. "nvml")
and ``simulated`` so no simulated number is ever shown unlabelled.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from llmwatts.analysis import join as joins
from llmwatts.analysis import views
from llmwatts.analysis.ingest import open_study_db
from llmwatts.errors import InvalidArgument, NotFound
from llmwatts.stats import percentile

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
    "sm_clock_mhz": "locked SM clock, MHz (labels.sm_clock_mhz: a study's clock dimension; empty when unlocked)",
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
    # Issue 17: latency distributions, goodput, per-request joules, idle/dynamic and steady-state energy.
    "latency_p90_ms": "90th percentile client E2E latency_ms of counted requests, ms",
    "latency_mean_ms": "mean client E2E latency_ms, ms",
    "ttft_p90_ms": "90th percentile TTFT, ms",
    "ttft_p99_ms": "99th percentile TTFT, ms",
    "ttft_mean_ms": "mean TTFT, ms",
    "tpot_p50_ms": "median TPOT = (e2e - TTFT) / (longest output tokens - 1), ms",
    "tpot_p90_ms": "90th percentile TPOT, ms",
    "tpot_p95_ms": "95th percentile TPOT, ms",
    "tpot_p99_ms": "99th percentile TPOT, ms",
    "tpot_mean_ms": "mean TPOT, ms",
    "itl_p50_ms": "median inter-chunk gap over every gap of the run (client_chunks), ms",
    "itl_p90_ms": "90th percentile ITL, ms",
    "itl_p95_ms": "95th percentile ITL, ms",
    "itl_p99_ms": "99th percentile ITL, ms",
    "itl_mean_ms": "mean ITL over every gap of the run, ms",
    "lag_p99_ms": "99th percentile of actual - scheduled send time (open loop), ms",
    "slo": "the run's objectives (run_slo), e.g. ttft_ms=500,tpot_ms=50",
    "good_requests": "counted requests meeting every objective of the SLO (all counted ones without an SLO)",
    "good_output_tokens": "output tokens of the good requests",
    "goodput_rps": "good_requests / duration_s, 1/s",
    "goodput_tokens_per_s": "good_output_tokens / duration_s, 1/s",
    "j_per_good_token": "energy_total_j / good_output_tokens, J",
    "j_per_request_p50": "median per-request attributed energy_j of counted requests, J",
    "j_per_request_p95": "95th percentile per-request J",
    "j_per_request_p99": "99th percentile per-request J",
    "j_per_request_mean": "mean per-request J",
    "j_per_output_token_p50": "median over counted requests of energy_j / output_tokens, J",
    "j_per_output_token_p95": "95th percentile per-request J/output token",
    "j_per_output_token_p99": "99th percentile per-request J/output token",
    "idle_power_w": "idle power of the run's GPUs (study_idle_power), W",
    "energy_dynamic_j": "energy_total_j - idle_power_w * duration_s, J",
    "j_per_token_dynamic": "energy_dynamic_j / output_tokens, J",
    "steady_s": "steady-state span: in-flight requests >= 90% of the target concurrency, s",
    "steady_energy_j": "telemetry energy inside the steady span (per-GPU counter deltas), J",
    "steady_output_tokens": "output tokens of counted requests done inside the steady span",
    "steady_tokens_per_s": "steady_output_tokens / steady_s, 1/s",
    "steady_power_w": "steady_energy_j / steady_s, W",
    "steady_j_per_token": "steady_energy_j / steady_output_tokens, J",
    "batch_energy_exceeds_window": "1 if the run's batch energy exceeds its window energy (window too short)",
    "window_ends_before_last_request": "1 if a server request of the run finished after its window ended",
}
# Columns taken as they are from the run_metrics view (views.py), the rest come from labels here.
VIEW_COLUMNS = [c for c in METRIC_COLUMNS if c not in (
    "run_id", "model", "engine", "dtype", "dataset", "batch_size", "shard_count", "cap_w", "sm_clock_mhz", "users",
    "labels", "slo")]
LABEL_COLUMNS = ("model", "engine", "dtype", "dataset", "batch_size", "shard_count", "cap_w", "sm_clock_mhz", "users")
NUMERIC_LABELS = ("batch_size", "shard_count", "cap_w", "sm_clock_mhz", "users")


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


def _dicts(db, sql, params=()) -> list[dict]:
    cursor = db.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


@dataclass
class Reconciliation:
    """Client rows vs server rows and attributed vs batch joules for one run (the ``run_reconciliation`` and
    ``run_metrics`` views)."""

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
    # Issue 16/17: server rows ok whose client row is not (left out of every numerator), server requests
    # done after their window ended, and batch joules above the window's joules.
    status_mismatch: int = 0
    done_after_window: int = 0
    batch_energy_exceeds_window: bool = False

    @property
    def consistent(self) -> bool:
        """Every client row found exactly once, no server row unclaimed, and every counted joule inside
        the run's window."""
        return (self.missing == 0 and self.duplicated == 0 and self.server_only == 0
                and self.done_after_window == 0 and not self.batch_energy_exceeds_window)


def _require_run(db, run_id: str) -> None:
    in_runs = _one(db, "SELECT 1 FROM runs WHERE run_id = ?", [run_id])
    in_client = _one(db, "SELECT 1 FROM client_runs WHERE run_id = ?", [run_id])
    if not (in_runs or in_client):
        known = ", ".join(joins.run_ids(db)) or "none"
        raise NotFound(f"no run {run_id!r} in the study DB (runs: {known})")


def all_reconciliations(study_db, run_ids: list[str] | None = None, runs: list[dict] | None = None
                        ) -> list[Reconciliation]:
    """``Reconciliation`` of every run a server saw (or of ``run_ids``), from the views in one pass.
    ``runs``: the runs' ``run_metrics`` rows when the caller has them (saves reading the view again)."""
    db = open_study_db(study_db, create=False)
    views.ensure_fresh(db)
    run_ids = joins.run_ids(db) if run_ids is None else run_ids
    counts = {r["run_id"]: r for r in _dicts(db, "SELECT * FROM run_reconciliation")}
    if runs is None:
        runs = _dicts(db, "SELECT run_id, energy_busy_j, batch_energy_exceeds_window FROM run_metrics")
    energy = {r["run_id"]: r for r in runs}
    ids: dict[tuple[str, str], list[str]] = {}
    for run_id, request_id, kind in db.execute("""
        SELECT run_id, request_id, CASE WHEN NOT has_client THEN 'server_only'
          WHEN server_rows = 0 THEN 'missing' WHEN server_rows > 1 THEN 'duplicated' ELSE 'outside' END
        FROM request_join_rows
        WHERE NOT has_client OR server_rows <> 1 OR (server_rows = 1 AND outside_window)
        ORDER BY coalesce(send_server_ns, received_ns), request_id"""):
        bucket = ids.setdefault((run_id, kind), [])
        if kind != "duplicated" or request_id not in bucket:
            bucket.append(request_id)
    out = []
    for run_id in run_ids:
        c, e = counts.get(run_id, {}), energy.get(run_id, {})
        batch_j = e.get("energy_busy_j") or 0.0
        attributed_j = c.get("attributed_j") or 0.0
        out.append(Reconciliation(
            run_id=run_id,
            client_sent=c.get("client_sent") or 0, server_ok=c.get("server_ok") or 0,
            server_error=c.get("server_error") or 0, missing=c.get("missing") or 0,
            duplicated=c.get("duplicated") or 0, server_only=c.get("server_only") or 0,
            attributed_j=attributed_j, batch_j=batch_j,
            attribution_rel_diff=_div(attributed_j - batch_j, batch_j),
            missing_ids=ids.get((run_id, "missing"), []),
            duplicated_ids=sorted(ids.get((run_id, "duplicated"), [])),
            server_only_ids=ids.get((run_id, "server_only"), []),
            outside_window=c.get("outside_window") or 0,
            outside_window_ids=ids.get((run_id, "outside"), []),
            status_mismatch=c.get("status_mismatch") or 0,
            done_after_window=c.get("done_after_window") or 0,
            batch_energy_exceeds_window=bool(e.get("batch_energy_exceeds_window")),
        ))
    return out


def reconcile(study_db, run_id: str) -> Reconciliation:
    """Counts of the run's client requests found on a server exactly once (ok / error), missing or
    duplicated, server rows no client claims, Σ per-request attributed J vs Σ batch J, and the window
    checks (requests done after EndRun, batch J above window J)."""
    db = open_study_db(study_db, create=False)
    _require_run(db, run_id)
    return all_reconciliations(db, [run_id])[0]


def _labels(db, run_id: str, windows: list[joins.RunWindow]) -> tuple[dict, dict]:
    """(label columns, other labels). Server run labels win over client ones; then server/client rows."""
    labels: dict = {}
    client_runs = list(db.query("SELECT * FROM client_runs WHERE run_id = ? ORDER BY started_ns", [run_id]))
    for client_run in client_runs:
        for key, value in _json(client_run.get("labels")).items():
            labels.setdefault(key, value)
    for row in db.query("SELECT labels FROM runs WHERE run_id = ? ORDER BY server_id", [run_id]):
        labels.update(_json(row["labels"]))
    labels.pop("slo", None)  # its own column
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
    return columns, labels


def _one_dict(db, sql, params) -> dict | None:
    rows = list(db.query(sql, params))
    return rows[0] if rows else None


def _cap_mode_w(db, run_id: str) -> float | None:
    """The most common telemetry cap over the run's window samples (all GPUs), W."""
    row = _one(db, """
        SELECT c.cap_mw FROM runs w JOIN run_cap_counts c ON c.server_id = w.server_id AND c.run_id = w.run_id
        WHERE w.run_id = ? GROUP BY c.cap_mw ORDER BY sum(c.samples) DESC, min(c.first_ts_ns) LIMIT 1""", [run_id])
    return row[0] / 1000 if row else None


def _slo_text(slo: dict | None) -> str:
    if not slo:
        return ""
    return ",".join(f"{k}={slo[k]:g}" for k in ("ttft_ms", "tpot_ms", "e2e_ms") if slo.get(k) is not None)


def _row(db, run_id: str, view_row: dict | None, slo: dict | None) -> dict:
    windows = joins.run_windows(db, run_id)
    columns, extra = _labels(db, run_id, windows)
    view_row = view_row or {}
    if columns.get("cap_w") is None and view_row.get("cap_mw_min") is not None:
        if view_row["cap_mw_min"] == view_row["cap_mw_max"]:
            columns["cap_w"] = view_row["cap_mw_min"] / 1000
        else:
            columns["cap_w"] = _cap_mode_w(db, run_id)
    row = {"run_id": run_id, **{k: columns.get(k) for k in LABEL_COLUMNS}}
    for column in VIEW_COLUMNS:
        row[column] = view_row.get(column)
    row["power"] = row["power"] or "nvml"
    row["simulated"] = int(row["simulated"] or 0)
    for flag in ("batch_energy_exceeds_window", "window_ends_before_last_request"):
        row[flag] = int(row[flag] or 0)
    for count in ("requests_ok", "requests_failed", "requests_refused", "responses", "output_tokens"):
        row[count] = row[count] or 0
    row["labels"] = json.dumps(extra, sort_keys=True) if extra else ""
    row["slo"] = _slo_text(slo)
    row = {c: row.get(c) for c in METRIC_COLUMNS}
    return row


def _slos(db) -> dict[str, dict]:
    return {r["run_id"]: {k: r[k] for k in ("ttft_ms", "tpot_ms", "e2e_ms") if r[k] is not None}
            for r in _dicts(db, "SELECT * FROM run_slo")}


def run_metrics(study_db, run_id: str) -> dict:
    """All ``METRIC_COLUMNS`` for one run: the ``run_metrics`` view's row plus the run's labels (see
    docs/analysis.md for each definition)."""
    db = open_study_db(study_db, create=False)
    _require_run(db, run_id)
    views.ensure_fresh(db)
    rows = _dicts(db, "SELECT * FROM run_metrics WHERE run_id = ?", [run_id])
    return _row(db, run_id, rows[0] if rows else None, _slos(db).get(run_id))


def all_run_metrics(study_db) -> list[dict]:
    """``run_metrics`` for every run a server saw, in order of BeginRun (one read of the view)."""
    db = open_study_db(study_db, create=False)
    views.ensure_fresh(db)
    by_run = {r["run_id"]: r for r in _dicts(db, "SELECT * FROM run_metrics")}
    slos = _slos(db)
    return [_row(db, run_id, by_run.get(run_id), slos.get(run_id)) for run_id in joins.run_ids(db)]


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
    "all_reconciliations",
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
