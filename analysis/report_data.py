"""What report.html shows, computed from the study DB's views: workload groups, per-group SLA choices with
their saving against the default cap and the runner-up, Pareto tables, cap-change comparisons beside the
seed paper's published figures (``reference/samsi2023.toml``), and the words for simulated power.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from llmwatts.analysis import tradeoffs

REFERENCE = Path(__file__).with_name("reference") / "samsi2023.toml"
# A workload: what a run serves (never mixed in one series or one choice). ``sampling`` is the load's label
# ("greedy" or "temperature=T,top_p=P"), ``max_new_tokens`` and ``ignore_eos`` set the output length.
WORKLOAD_KEYS = ("model", "engine", "dtype", "dataset", "stream", "sampling", "max_new_tokens", "ignore_eos")
# Settings swept within a workload (the x-axes and the series).
SETTING_KEYS = ("batch_size", "users", "rate_rps", "arrival", "cap_w", "sm_clock_mhz")
# The energy levers the SLA choice weighs: the power cap and the locked SM clock (their default: the highest
# value swept, or none set).
LEVERS = {"cap_w": "power cap", "sm_clock_mhz": "locked SM clock"}
COLUMN_NAMES = {
    "run_id": "run", "dataset": "dataset", "batch_size": "batch size (prompts per request)",
    "cap_w": "power cap (W)", "sm_clock_mhz": "locked SM clock (MHz)", "rate_rps": "arrival rate (requests/s)",
    "arrival": "arrival process", "users": "closed-loop users",
    "power": "power source", "duration_s": "duration (s)", "responses": "responses",
    "tokens_per_s": "throughput (output tokens/s)", "words_per_s": "throughput (words/s)",
    "responses_per_s": "responses per second", "avg_power_w": "mean power, all GPUs (W)",
    "energy_total_j": "energy in the run's window (J)", "j_per_token": "energy per output token (J)",
    "j_per_token_dynamic": "energy above idle per output token (J)", "j_per_response": "energy per response (J)",
    "latency_p50_ms": "latency p50 (ms)", "latency_p95_ms": "latency p95 (ms)", "latency_p99_ms": "latency p99 (ms)",
    "ttft_p50_ms": "time to first token p50 (ms)", "ttft_p95_ms": "time to first token p95 (ms)",
    "tpot_p50_ms": "time per output token p50 (ms)", "j_per_request_p50": "energy per request p50 (J)",
    "sm_pct_mean": "SM busy, mean (%)", "mem_pct_mean": "memory controller busy, mean (%)",
    "mem_used_pct_max": "GPU memory used, max (%)", "gpu_energy_spread": "energy spread across GPUs (max/min)",
    "n_gpus": "GPUs", "idle_power_w": "idle power, all GPUs (W)",
}
SETTINGS = ["run_id", "dataset", "batch_size", "rate_rps", "arrival", "users", "cap_w", "sm_clock_mhz"]
TABLES = {
    "Throughput and energy": SETTINGS + ["duration_s", "responses", "tokens_per_s", "avg_power_w",
                                         "energy_total_j", "j_per_token", "j_per_token_dynamic", "j_per_response"],
    "Latency": SETTINGS + ["latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "ttft_p50_ms", "ttft_p95_ms",
                           "tpot_p50_ms"],
    "Utilisation": SETTINGS + ["n_gpus", "sm_pct_mean", "mem_pct_mean", "mem_used_pct_max", "gpu_energy_spread",
                               "idle_power_w"],
}
SIMULATED_COLUMNS = {"avg_power_w", "energy_total_j", "j_per_token", "j_per_token_dynamic", "j_per_response",
                     "sm_pct_mean", "mem_pct_mean", "idle_power_w", "j_per_request_p50"}


@dataclass
class GroupChoice:
    """The SLA choice of one workload group."""

    best: dict | None
    runner_up: dict | None
    default: dict | None        # the same settings at the default (highest or unset) cap and clock
    saving_pct: float | None    # energy per token saved by ``best`` against ``default``
    message: str
    lever: str | None = None    # which lever won: "power cap", "locked SM clock", "both" or "neither"


@dataclass
class Group:
    name: str
    workload: dict
    runs: list[dict]
    pareto: list[dict] = field(default_factory=list)
    choice: GroupChoice | None = None
    cap_change: dict | None = None


def with_labels(db, runs: list[dict]) -> list[dict]:
    """Each run row plus its BeginRun labels (rate_rps, rep, ...) where the row lacks them."""
    labels = {}
    if db["runs"].exists():
        for run_id, text in db.execute("SELECT run_id, labels FROM runs"):
            try:
                labels[run_id] = json.loads(text or "{}")
            except ValueError:
                labels[run_id] = {}
    out = []
    for row in runs:
        extra = {k: v for k, v in labels.get(row["run_id"], {}).items() if row.get(k) is None}
        out.append(open_loop_settings({**extra, **row}))
    return out


def open_loop_settings(row: dict) -> dict:
    """An open-loop run (``rate_rps``) is set by its arrival rate and process, not by users: its Locust
    user count (the max concurrency, 64 by default) is no closed-loop ``users`` setting."""
    if row.get("rate_rps") is not None:
        row = {**row, "users": None}
        if row.get("arrival") == "gamma" and row.get("burstiness") is not None:
            row["arrival"] = f"gamma (burstiness {row['burstiness']})"
    else:
        row = {**row, "arrival": None}
    return row


def _num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def groups_of(runs: list[dict]) -> list[Group]:
    by_key: dict[tuple, list[dict]] = {}
    for row in runs:
        by_key.setdefault(tuple(str(row.get(k)) for k in WORKLOAD_KEYS), []).append(row)
    groups = []
    for key, rows in by_key.items():
        workload = {k: v for k, v in zip(WORKLOAD_KEYS, key) if v != "None"}
        name = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in workload.items()) or "all runs"
        groups.append(Group(name, workload, rows))
    return groups


def settings_text(row: dict) -> str:
    """A run's settings in words: ``batch 4, 8 req/s poisson, 250 W cap`` (open loop: rate and arrival
    process) or ``batch 4, 2 users, 250 W cap`` (closed loop); numbers as run (``250``, never ``250.0``)."""
    parts = []
    for k, unit in (("batch_size", "batch"), ("rate_rps", "req/s"), ("users", "users"), ("cap_w", "W cap"),
                    ("sm_clock_mhz", "MHz SM clock")):
        if row.get(k) is not None:
            value = f"{_num(row[k]):g}" if _num(row[k]) is not None else str(row[k])
            if k == "users" and value == "1":
                unit = "user"
            parts.append(f"{unit} {value}" if k == "batch_size" else f"{value} {unit}")
            if k == "rate_rps" and row.get("arrival"):
                parts[-1] += f" {row['arrival']}"
    return ", ".join(parts) or row.get("run_id", "")


def pareto_rows(rows: list[dict]) -> list[dict]:
    usable = sorted((r for r in rows if r.get("latency_p95_ms") is not None and r.get("j_per_token") is not None),
                    key=lambda r: (r["latency_p95_ms"], r["j_per_token"]))
    flags = tradeoffs.pareto_front([(r["latency_p95_ms"], r["j_per_token"]) for r in usable])
    return [r for r, on in zip(usable, flags) if on]


def _default_of(rows: list[dict], lever: str) -> float | None:
    """A lever's default in a sweep: its highest value run (None when no run sets it)."""
    values = [c for c in (_num(r.get(lever)) for r in rows) if c is not None]
    return max(values) if values else None


def _same_settings(a: dict, b: dict, *, but: tuple[str, ...] = ("cap_w",)) -> bool:
    return all(str(a.get(k)) == str(b.get(k)) for k in SETTING_KEYS if k not in but)


def _swept(rows: list[dict], lever: str) -> bool:
    return len({c for c in (_num(r.get(lever)) for r in rows) if c is not None}) > 1


def lever_of(best: dict, defaults: dict[str, float | None]) -> str:
    """Which lever the choice moved off its default: one of ``LEVERS``' words, "both" or "neither"."""
    moved = [word for lever, word in LEVERS.items()
             if defaults[lever] is not None and _num(best.get(lever)) != defaults[lever]]
    return moved[0] if len(moved) == 1 else ("both" if moved else "neither")


def choose(group: Group, sla_p95_ms: float) -> GroupChoice:
    """Lowest J/token with latency p95 within the SLA over every setting (both levers: cap and locked
    clock), the runner-up, which lever won, and the saving against the same settings at the default cap and
    clock (the highest of each sweep, or none set)."""
    usable = [r for r in group.runs if r.get("latency_p95_ms") is not None and r.get("j_per_token") is not None]
    meeting = sorted((r for r in usable if r["latency_p95_ms"] <= sla_p95_ms),
                     key=lambda r: (r["j_per_token"], r["latency_p95_ms"]))
    if not meeting:
        return GroupChoice(None, None, None, None, f"no run meets latency p95 ≤ {sla_p95_ms:g} ms")
    best = meeting[0]
    runner_up = meeting[1] if len(meeting) > 1 else None
    tops = {lever: _default_of(group.runs, lever) for lever in LEVERS}
    defaults = [r for r in usable if all(_num(r.get(k)) == v for k, v in tops.items())
                and _same_settings(r, best, but=tuple(LEVERS))]
    default = min(defaults, key=lambda r: r["j_per_token"]) if defaults else None
    saving = (1 - best["j_per_token"] / default["j_per_token"]) * 100 if default and default["j_per_token"] else None
    swept = [word for lever, word in LEVERS.items() if _swept(group.runs, lever)]
    lever = lever_of(best, {k: v if _swept(group.runs, k) else None for k, v in tops.items()}) if swept else None
    text = (f"{settings_text(best)}: {best['j_per_token']:.4g} J/token at latency p95 "
            f"{best['latency_p95_ms']:.0f} ms")
    if lever is not None:
        text += f"; lever that won: {lever}"
    default_words = " and ".join(f"default {w}" for w in swept) or "default settings"
    if saving is not None and default is not best:
        text += f"; {saving:.1f}% less energy per token than the {default_words} ({settings_text(default)})"
    elif default is best:
        text += f"; the {default_words} is itself the best choice"
    return GroupChoice(best, runner_up, default, saving, text, lever)


def clock_sweep(group: Group) -> bool:
    """Whether the group's runs locked at least two SM clocks."""
    return _swept(group.runs, "sm_clock_mhz")


def cap_change(group: Group) -> dict | None:
    """Highest vs lowest cap at otherwise equal settings: % change of time per token and energy per token
    (the paper's comparison), averaged over the settings where both caps ran."""
    caps = sorted({c for c in (_num(r.get("cap_w")) for r in group.runs) if c is not None})
    if len(caps) < 2:
        return None
    high, low = caps[-1], caps[0]
    time_pct, energy_pct = [], []
    for a in (r for r in group.runs if _num(r.get("cap_w")) == high):
        for b in (r for r in group.runs if _num(r.get("cap_w")) == low and _same_settings(r, a)):
            if a.get("tokens_per_s") and b.get("tokens_per_s") and a.get("j_per_token") and b.get("j_per_token"):
                time_pct.append((a["tokens_per_s"] / b["tokens_per_s"] - 1) * 100)
                energy_pct.append((b["j_per_token"] / a["j_per_token"] - 1) * 100)
    if not time_pct:
        return None
    return {"cap_from_w": high, "cap_to_w": low, "pairs": len(time_pct),
            "time_change_pct": sum(time_pct) / len(time_pct), "energy_change_pct": sum(energy_pct) / len(energy_pct)}


def reference() -> list[dict]:
    return tomllib.loads(REFERENCE.read_text())["cap_change"]


def simulated_note(runs: list[dict], cpu_only: bool) -> str | None:
    """The truth about simulated numbers: none, some (named), or all; and what J/token means on a CPU."""
    sim = [r["run_id"] for r in runs if r.get("simulated")]
    if not sim:
        return None
    what = ("watts, joules, SM % and memory-controller % come from a model of a GPU (docs/power-caps.md), "
            "not from NVML")
    text = (f"All runs use SIMULATED power: {what}." if len(sim) == len(runs)
            else f"{len(sim)} of {len(runs)} runs use SIMULATED power ({', '.join(sim[:8])}"
                 f"{'…' if len(sim) > 8 else ''}): {what}; the tables' power source column says which.")
    if cpu_only:
        text += (" The model ran on a CPU: a simulated J/token here is the modelled GPU's watts times this "
                 "CPU's wall time, so it shows the pipeline at work, not what a GPU would spend.")
    return text
