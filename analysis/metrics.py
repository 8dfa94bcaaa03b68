"""Per-run paper metrics ("From Words to Watts", Samsi et al. 2023): the ``run_metrics`` view's row of each
run plus its labels (reconciliation: reconcile.py; trade-offs and the SLA choice: tradeoffs.py).

Definitions, units and clocks are in docs/analysis.md; the short form is on each column in
``METRIC_COLUMNS``. Every row carries ``power`` ("simulated" or the server's power source, e.g. "nvml")
and ``simulated`` so no simulated number is ever shown unlabelled.
"""

from __future__ import annotations

import json

from llmwatts.analysis import join as joins
from llmwatts.analysis import views
from llmwatts.analysis.study_db import open_study_db
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
    joins.require_run(db, run_id)
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


__all__ = ["METRIC_COLUMNS", "all_run_metrics", "is_ok", "percentile", "run_metrics"]
