"""Trade-offs across runs: latency p95 against J/token with the Pareto front, and the SLA choice (the
lowest-J/token run whose latency p95 meets a bound)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmwatts.analysis.metrics import LABEL_COLUMNS, METRIC_COLUMNS, all_run_metrics
from llmwatts.errors import InvalidArgument


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


__all__ = ["SlaChoice", "TradeoffPoint", "choose_sla", "pareto_front", "tradeoffs"]
