"""A load run's summary (``LoadResult``) computed from its exact rows in the client DB, and the SLO rule.

Free of Locust imports: the study runner and analysis may import it. Percentiles are ``llmwatts.stats``
(numpy ``linear``), the same function the report uses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field

from llmwatts.loadgen import records
from llmwatts.slo import SLO_KEYS, Slo, parse_slo  # noqa: F401  (the SLO's home is llmwatts/slo.py)
from llmwatts.stats import percentiles

PCTS = (50, 90, 95, 99)


@dataclass
class LoadResult:
    """Summary of a finished run, computed from the exact client rows (not Locust's rounded stats).

    Latencies in ms over ``ok`` requests: ``latency_*`` is E2E; ``ttft_*``, ``tpot_*`` and ``itl_*`` only
    for streamed runs (``itl_mean_ms`` pools every gap of the run; ``itl_max_ms`` is the largest).
    ``lag_*`` (open loop): actual minus scheduled send time. Goodput: requests (and their output tokens)
    per second that met every objective of ``slo``; without an SLO every ok request is good.
    """

    run_id: str
    client_db: str | None       # None on a worker (its rows went to the master)
    role: str                   # local, master or worker
    requests_ok: int = 0
    requests_failed: int = 0
    requests_good: int = 0
    duration_s: float = 0.0     # first send to last done
    rps: float = 0.0
    output_tokens: int = 0
    output_tokens_per_s: float = 0.0
    goodput_rps: float = 0.0
    goodput_tokens_per_s: float = 0.0
    slo: str = ""               # the objectives, as --slo takes them
    rate_rps: float | None = None           # offered (open loop), None in closed loop
    latency_mean_ms: float | None = None
    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    ttft_mean_ms: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p90_ms: float | None = None
    ttft_p95_ms: float | None = None
    ttft_p99_ms: float | None = None
    tpot_mean_ms: float | None = None
    tpot_p50_ms: float | None = None
    tpot_p90_ms: float | None = None
    tpot_p95_ms: float | None = None
    tpot_p99_ms: float | None = None
    itl_mean_ms: float | None = None
    itl_max_ms: float | None = None
    lag_p50_ms: float | None = None
    lag_p99_ms: float | None = None
    lag_max_ms: float | None = None
    clock_offset_ns: int | None = None
    failures: dict[str, int] = dataclass_field(default_factory=dict)  # status → count
    power_source: str | None = None  # the server's (GetServerInfo): "simulated" = modelled joules, not measured

    @property
    def requests(self) -> int:
        return self.requests_ok + self.requests_failed

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """A few human lines."""
        def ms(v):
            return "-" if v is None else f"{v:.1f} ms"

        def line(name, key):
            values = [getattr(self, f"{key}_{s}_ms") for s in ("mean", "p50", "p90", "p95", "p99")]
            if values[0] is None:
                return None
            return f"{name}: mean {ms(values[0])}, p50 {ms(values[1])}, p90 {ms(values[2])}, " \
                   f"p95 {ms(values[3])}, p99 {ms(values[4])}"

        lines = [
            f"run {self.run_id} ({self.role}): {self.requests_ok} ok, {self.requests_failed} failed"
            f" in {self.duration_s:.1f} s ({self.rps:.2f} req/s), {self.output_tokens} output tokens"
            f" ({self.output_tokens_per_s:.1f} tokens/s)",
        ]
        for name, key in (("latency (E2E)", "latency"), ("time to first token", "ttft"),
                          ("time per output token", "tpot")):
            text = line(name, key)
            if text:
                lines.append(text)
        if self.itl_mean_ms is not None:
            lines.append(f"inter-chunk latency: mean {ms(self.itl_mean_ms)}, max {ms(self.itl_max_ms)}")
        if self.rate_rps is not None:
            lines.append(f"offered rate {self.rate_rps:g} req/s; generator lag (actual − scheduled send): "
                         f"p50 {ms(self.lag_p50_ms)}, p99 {ms(self.lag_p99_ms)}, max {ms(self.lag_max_ms)}")
        if self.slo:
            lines.append(f"goodput ({self.slo}): {self.requests_good} good requests, {self.goodput_rps:.2f} req/s, "
                         f"{self.goodput_tokens_per_s:.1f} tokens/s")
        if self.failures:
            lines.append("failures: " + ", ".join(f"{k} × {v}" for k, v in sorted(self.failures.items())))
        if self.client_db:
            lines.append(f"client records: {self.client_db}")
        return "\n".join(lines)


def _stats(values: list[float]) -> dict[str, float | None]:
    present = [v for v in values if v is not None]
    mean = sum(present) / len(present) if present else None
    return {"mean": mean, **dict(zip((f"p{p}" for p in PCTS), percentiles(present, PCTS)))}


def summarise(client_db: str, run_id: str, role: str = "local", slo: Slo | None = None,
              rate_rps: float | None = None) -> LoadResult:
    """A run's ``LoadResult`` from its rows in the client DB."""
    slo = slo or Slo()
    db = records.open_client_db(client_db)
    try:
        rows = list(db.query(
            "select status, client_send_ns, scheduled_send_ns, done_ns, latency_ms, ttft_ms, tpot_ms, "
            "itl_count, itl_mean_ms, itl_max_ms, output_tokens from client_requests where run_id = ?", [run_id]))
        run = next(db.query("select clock_offset_ns from client_runs where run_id = ?", [run_id]), {})
    finally:
        db.close()
    ok = [r for r in rows if r["status"] == "ok"]
    good = [r for r in ok if slo.met(r["status"], r["ttft_ms"], r["tpot_ms"], r["latency_ms"])]
    failures: dict[str, int] = {}
    for r in rows:
        if r["status"] != "ok":
            failures[r["status"]] = failures.get(r["status"], 0) + 1
    sends = [r["client_send_ns"] for r in rows if r["client_send_ns"] is not None]
    dones = [r["done_ns"] for r in rows if r["done_ns"] is not None]
    duration_s = (max(dones) - min(sends)) / 1e9 if sends and dones else 0.0

    def per_s(n):
        return n / duration_s if duration_s > 0 else 0.0

    result = LoadResult(
        run_id=run_id, client_db=str(client_db), role=role, requests_ok=len(ok),
        requests_failed=len(rows) - len(ok), requests_good=len(good), duration_s=duration_s, rps=per_s(len(rows)),
        output_tokens=sum(r["output_tokens"] or 0 for r in ok), slo=slo.to_text(), rate_rps=rate_rps,
        clock_offset_ns=run.get("clock_offset_ns"), failures=failures,
    )
    result.output_tokens_per_s = per_s(result.output_tokens)
    result.goodput_rps = per_s(len(good))
    result.goodput_tokens_per_s = per_s(sum(r["output_tokens"] or 0 for r in good))
    for key, column in (("latency", "latency_ms"), ("ttft", "ttft_ms"), ("tpot", "tpot_ms")):
        for stat, value in _stats([r[column] for r in ok]).items():
            setattr(result, f"{key}_{stat}_ms", value)
    itl = [r for r in ok if r["itl_count"]]
    if itl:
        result.itl_mean_ms = sum(r["itl_mean_ms"] * r["itl_count"] for r in itl) / sum(r["itl_count"] for r in itl)
        result.itl_max_ms = max(r["itl_max_ms"] for r in itl)
    lags = [(r["client_send_ns"] - r["scheduled_send_ns"]) / 1e6 for r in rows
            if r["scheduled_send_ns"] is not None and r["client_send_ns"] is not None]
    if lags:
        result.lag_p50_ms, result.lag_p99_ms = percentiles(lags, (50, 99))
        result.lag_max_ms = max(lags)
    return result
