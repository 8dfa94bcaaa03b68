"""Synthetic study inputs for bench/analysis.py and tests/analysis: a server DB and a client DB in the
project's own schemas (``llmwatts.server.store.open_db`` and ``llmwatts.loadgen.records.open_client_db``
create them), filled with numpy arrays through ``executemany``. Deterministic for a given ``StudySpec``.

The study: ``runs`` runs one after another on one server with ``gpus`` GPUs sampled every
``1 / sample_hz`` s; each run's window covers 90% of its slot (the rest is idle telemetry outside any run).
Requests arrive uniformly in their run's window, are answered in batches of ``batch_requests``, and carry
each batch's joules split by output tokens. A few requests fail on the server (RESOURCE_EXHAUSTED, no
batch) and a few are refused at the door (client row only), so reconciliation has something to count.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

S = 1_000_000_000
T0_NS = 1_750_000_000 * S
CLOCK_OFFSET_NS = 3_000_000  # server − client
GIB = 1 << 30
CHUNK_ROWS = 200_000


@dataclass(frozen=True)
class StudySpec:
    requests: int
    samples: int
    runs: int = 8
    gpus: int = 4
    sample_hz: float = 10.0
    batch_requests: int = 8
    seed: int = 21

    @property
    def name(self) -> str:
        return f"study-{self.requests}r-{self.samples}s-{self.runs}x{self.gpus}-seed{self.seed}"


BENCH_STUDIES = (
    StudySpec(10_000, 1_000_000),
    StudySpec(100_000, 3_000_000),
    StudySpec(300_000, 6_000_000),
    StudySpec(1_000_000, 10_000_000),
)


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info([{table}])")]


def _insert(conn: sqlite3.Connection, table: str, columns: dict[str, np.ndarray | list]) -> None:
    """Insert column arrays (equal length) into ``table``; table columns not given stay NULL."""
    known = set(_columns(conn, table))
    unknown = [c for c in columns if c not in known]
    if unknown:
        raise RuntimeError(f"{table} lacks {unknown}: the project's schema changed; update analysis_study.py")
    names = list(columns)
    n = len(next(iter(columns.values())))
    sql = f"INSERT INTO [{table}] ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
    for lo in range(0, n, CHUNK_ROWS):
        parts = [columns[c][lo:lo + CHUNK_ROWS] for c in names]
        parts = [p.tolist() if isinstance(p, np.ndarray) else list(p) for p in parts]
        conn.executemany(sql, zip(*parts))


def _open(path: Path, opener) -> sqlite3.Connection:
    db = opener(path)
    db.conn.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    return conn


def generate(spec: StudySpec, folder: str | Path) -> tuple[Path, Path]:
    """Write ``server.db`` and ``client.db`` for ``spec`` into ``folder`` (reused when both exist)."""
    from llmwatts.loadgen.records import open_client_db
    from llmwatts.server.store import open_db

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    server_path, client_path = folder / "server.db", folder / "client.db"
    marker = folder / "complete"
    if marker.exists() and server_path.exists() and client_path.exists():
        return server_path, client_path
    for p in folder.glob("*.db*"):
        p.unlink()
    rng = np.random.default_rng(spec.seed)
    server = _open(server_path, open_db)
    client = _open(client_path, open_client_db)
    server_id = f"srv-{spec.seed}"

    ticks = spec.samples // spec.gpus
    dt_ns = int(S / spec.sample_hz)
    span_ns = ticks * dt_ns
    slot_ns = span_ns // spec.runs
    gpu_uuids = [f"GPU-{spec.seed:04d}-{g:04d}" for g in range(spec.gpus)]

    server.execute("BEGIN")
    _insert(server, "servers", {
        "server_id": [server_id], "started_ns": [T0_NS - 60 * S], "node": ["node-a"], "model": ["llama-7b"],
        "dtype": ["float16"], "engine": ["fast"], "power_source": ["nvml"], "shard_count": [spec.gpus],
        "layout": [json.dumps({"ranks": spec.gpus})], "simulated": [0], "versions": ["{}"]})
    _insert(server, "gpus", {
        "server_id": [server_id] * spec.gpus, "gpu_uuid": gpu_uuids, "node": ["node-a"] * spec.gpus,
        "rank": list(range(spec.gpus)), "gpu_index": list(range(spec.gpus)), "name": ["H100"] * spec.gpus,
        "memory_total_bytes": [80 * GIB] * spec.gpus, "simulated": [0] * spec.gpus})

    # Telemetry: per GPU a power series (W), integrated into the energy counter (mJ).
    ts = T0_NS + np.arange(ticks, dtype=np.int64) * dt_ns
    run_of_tick = np.minimum((ts - T0_NS) // slot_ns, spec.runs - 1)
    in_run = ((ts - T0_NS) - run_of_tick * slot_ns) < int(slot_ns * 0.9)
    caps_w = np.array([300 + 50 * (r % 4) for r in range(spec.runs)])
    energy_at = np.zeros((spec.gpus, ticks), dtype=np.int64)
    for g in range(spec.gpus):
        power_w = np.where(in_run, 200 + 20 * g + rng.normal(0, 15, ticks), 80 + rng.normal(0, 2, ticks))
        power_mw = np.round(power_w * 1000).astype(np.int64)
        energy_mj = 1_000_000 * (g + 1) + np.concatenate([[0], np.cumsum(power_mw[:-1]) * dt_ns // S])
        energy_at[g] = energy_mj
        sm = np.where(in_run, np.clip(rng.normal(70, 10, ticks), 0, 100), 0.0).round(1)
        mem = np.where(in_run, np.clip(rng.normal(25, 5, ticks), 0, 100), 0.0).round(1)
        used = np.where(in_run, 40 * GIB + rng.integers(0, 10 * GIB, ticks), 20 * GIB)
        # Interleave GPUs sample by sample, as the server's sampler writes them: write after all GPUs.
        if g == 0:
            tel = {k: [] for k in ("power_mw", "energy_mj", "sm", "mem", "used")}
        for k, v in (("power_mw", power_mw), ("energy_mj", energy_mj), ("sm", sm), ("mem", mem), ("used", used)):
            tel[k].append(v)
    order = lambda name: np.stack(tel[name], axis=1).reshape(-1)  # noqa: E731 - [tick, gpu] row-major
    _insert(server, "telemetry", {
        "server_id": [server_id] * (ticks * spec.gpus),
        "ts_ns": np.repeat(ts, spec.gpus),
        "gpu_uuid": gpu_uuids * ticks,
        "node": ["node-a"] * (ticks * spec.gpus),
        "rank": np.tile(np.arange(spec.gpus), ticks),
        "power_mw": order("power_mw"),
        "power_instant_mw": order("power_mw"),
        "energy_mj": order("energy_mj"),
        "sm_pct": order("sm"),
        "mem_pct": order("mem"),
        "mem_used_bytes": order("used"),
        "sm_clock_mhz": np.full(ticks * spec.gpus, 1980),
        "temp_c": np.full(ticks * spec.gpus, 55),
        "cap_mw": np.repeat(caps_w[run_of_tick] * 1000, spec.gpus),
        "simulated": np.zeros(ticks * spec.gpus, dtype=np.int64),
    })
    del tel

    run_ids = [f"run-{r:02d}-cap{caps_w[r]}" for r in range(spec.runs)]
    begin_ns = T0_NS + np.arange(spec.runs, dtype=np.int64) * slot_ns
    end_ns = begin_ns + int(slot_ns * 0.9) - dt_ns  # the last in-run tick
    tick_of = lambda t: (t - T0_NS) // dt_ns  # noqa: E731
    begin_j = energy_at[:, tick_of(begin_ns)].sum(axis=0) / 1000
    end_j = energy_at[:, tick_of(end_ns)].sum(axis=0) / 1000
    _insert(server, "runs", {
        "run_id": run_ids, "server_id": [server_id] * spec.runs, "begin_ns": begin_ns, "end_ns": end_ns,
        "begin_energy_j": begin_j, "end_energy_j": end_j,
        "labels": [json.dumps({"cap_w": str(caps_w[r]), "batch_size": str(1 + r % 4)}) for r in range(spec.runs)],
        "simulated": [0] * spec.runs})
    _insert(server, "cap_events", {
        "server_id": [server_id] * spec.runs, "ts_ns": begin_ns - S, "gpu_uuid": [gpu_uuids[0]] * spec.runs,
        "node": ["node-a"] * spec.runs, "rank": [0] * spec.runs, "kind": ["set"] * spec.runs,
        "old_cap_w": [700.0] * spec.runs, "new_cap_w": caps_w.astype(float), "who": ["bench"] * spec.runs,
        "reason": ["sweep"] * spec.runs})

    # Requests: run r gets an equal share, arrivals uniform in its window (first 80%, so all finish inside).
    n = spec.requests
    run_of_req = np.sort(rng.integers(0, spec.runs, n))
    received = begin_ns[run_of_req] + (rng.random(n) * 0.8 * (end_ns - begin_ns)[run_of_req]).astype(np.int64)
    order_idx = np.lexsort((received, run_of_req))
    run_of_req, received = run_of_req[order_idx], received[order_idx]
    request_ids = np.array([f"req-{spec.seed}-{i:08d}" for i in rng.permutation(n)])
    failed = rng.random(n) < 0.01       # the server refused (queue full): a row, no batch
    refused = rng.random(n) < 0.005     # refused at the door: a client row only
    served = ~failed & ~refused
    n_prompts = 1 + (run_of_req % 4)
    output_tokens = np.where(served, rng.integers(16, 257, n) * n_prompts, 0)
    prompt_tokens = rng.integers(8, 129, n) * n_prompts

    # Batches: consecutive served requests of a run, batch_requests at a time.
    served_idx = np.flatnonzero(served)
    run_change = np.r_[True, run_of_req[served_idx][1:] != run_of_req[served_idx][:-1]]
    pos_in_run = np.arange(served_idx.size) - np.maximum.accumulate(np.where(run_change, np.arange(served_idx.size), 0))
    new_batch = run_change | (pos_in_run % spec.batch_requests == 0)
    batch_of_served = np.cumsum(new_batch) - 1
    nb = int(batch_of_served[-1] + 1) if served_idx.size else 0
    first = np.flatnonzero(new_batch)
    batch_start = received[served_idx][np.r_[first[1:] - 1, served_idx.size - 1]] + 2_000_000  # last arrival
    batch_dur = (50 + rng.integers(0, 400, nb)) * 1_000_000
    batch_end = batch_start + batch_dur
    batch_tokens = np.bincount(batch_of_served, weights=output_tokens[served_idx], minlength=nb).astype(np.int64)
    batch_energy = np.round(batch_dur / S * (220.0 * spec.gpus), 6)
    batch_ids = np.array([f"b-{spec.seed}-{i:07d}" for i in range(nb)])
    _insert(server, "batches", {
        "batch_id": batch_ids, "server_id": [server_id] * nb, "start_ns": batch_start,
        "first_token_ns": batch_start + 20_000_000, "end_ns": batch_end,
        "n_requests": np.bincount(batch_of_served, minlength=nb),
        "n_sequences": np.bincount(batch_of_served, weights=n_prompts[served_idx], minlength=nb).astype(np.int64),
        "prompt_tokens": np.bincount(batch_of_served, weights=prompt_tokens[served_idx], minlength=nb).astype(np.int64),
        "output_tokens": batch_tokens, "energy_j": batch_energy, "energy_method": ["counter"] * nb,
        "simulated": np.zeros(nb, dtype=np.int64)})
    _insert(server, "batch_gpu_energy", {
        "batch_id": np.repeat(batch_ids, spec.gpus), "gpu_uuid": gpu_uuids * nb,
        "node": ["node-a"] * (nb * spec.gpus), "rank": np.tile(np.arange(spec.gpus), nb),
        "energy_start_mj": np.zeros(nb * spec.gpus, dtype=np.int64),
        "energy_end_mj": np.repeat(np.round(batch_energy * 1000 / spec.gpus).astype(np.int64), spec.gpus),
        "energy_j": np.repeat(batch_energy / spec.gpus, spec.gpus), "method": ["counter"] * (nb * spec.gpus)})

    batch_of_req = np.full(n, -1)
    batch_of_req[served_idx] = batch_of_served
    b = np.maximum(batch_of_req, 0)
    req_energy = np.where(served, batch_energy[b] * output_tokens / np.maximum(batch_tokens[b], 1), 0.0)
    done = np.where(served, batch_end[b], received + 1_000_000)
    first_token = np.where(served, batch_start[b] + 20_000_000, 0)
    on_server = ~refused
    status = np.where(failed, "RESOURCE_EXHAUSTED", "OK")
    _insert(server, "requests", {
        "request_id": request_ids[on_server], "run_id": np.array(run_ids)[run_of_req][on_server],
        "batch_id": np.where(served, batch_ids[b] if nb else "", None)[on_server],
        "server_id": [server_id] * int(on_server.sum()), "received_ns": received[on_server],
        "batch_start_ns": np.where(served, batch_start[b], None)[on_server],
        "first_token_ns": np.where(served, first_token, None)[on_server], "done_ns": done[on_server],
        "n_prompts": n_prompts[on_server], "prompt_tokens": prompt_tokens[on_server],
        "output_tokens": output_tokens[on_server], "energy_j": req_energy[on_server],
        "status": status[on_server], "error": np.where(failed, "queue full", None)[on_server]})
    server.execute("COMMIT")
    server.close()

    # Client rows, on the client's clock (server − offset); streamed, so TTFT/TPOT/ITL are there.
    uplink_ns = rng.integers(200_000, 2_000_000, n)
    send_client = received - uplink_ns - CLOCK_OFFSET_NS
    done_client = np.where(served, done + 500_000, received + 1_000_000) - CLOCK_OFFSET_NS
    latency_ms = (done_client - send_client) / 1e6
    ttft_ms = np.where(served, (first_token + 300_000 - CLOCK_OFFSET_NS - send_client) / 1e6, np.nan)
    longest = np.where(served, output_tokens // n_prompts, 0)
    tpot_ms = np.where(served & (longest > 1), (latency_ms - ttft_ms) / np.maximum(longest - 1, 1), np.nan)
    words = np.where(served, (output_tokens * 3) // 4, 0)
    client_status = np.where(refused, "UNAVAILABLE", np.where(failed, "RESOURCE_EXHAUSTED", "ok"))
    nan_to_none = lambda a: [None if x != x else x for x in a.tolist()]  # noqa: E731
    client.execute("BEGIN")
    have = set(_columns(client, "client_requests"))
    columns = {
        "request_id": request_ids, "run_id": np.array(run_ids)[run_of_req], "worker": ["w0"] * n,
        "dataset": ["alpaca"] * n, "batch_size": n_prompts, "stream": np.ones(n, dtype=np.int64),
        "client_send_ns": send_client, "first_token_ns": np.where(served, first_token + 300_000 - CLOCK_OFFSET_NS, None),
        "done_ns": done_client, "latency_ms": latency_ms, "ttft_ms": nan_to_none(ttft_ms),
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "output_words": words,
        "status": client_status, "error": np.where(client_status == "ok", None, "refused"),
        "batch_id": [None] * n, "clock_offset_ns": np.full(n, CLOCK_OFFSET_NS),
    }
    if "tpot_ms" in have:  # the loadgen's streamed-latency columns (issue 17), where its schema has them
        columns["tpot_ms"] = nan_to_none(tpot_ms)
        columns["longest_output_tokens"] = longest
        columns["scheduled_send_ns"] = send_client - rng.integers(0, 500_000, n)
    _insert(client, "client_requests", columns)
    _insert(client, "client_runs", {
        "run_id": run_ids, "target": ["localhost:50051"] * spec.runs, "started_ns": begin_ns - S - CLOCK_OFFSET_NS,
        "ended_ns": end_ns + S - CLOCK_OFFSET_NS, "labels": [json.dumps({"operator": "bench"})] * spec.runs,
        "clock_offset_ns": [CLOCK_OFFSET_NS] * spec.runs, "users": [32] * spec.runs,
        "batch_size": [1 + r % 4 for r in range(spec.runs)], "dataset": ["alpaca"] * spec.runs,
        "stream": [1] * spec.runs})
    client.execute("COMMIT")
    client.close()
    for path in (server_path, client_path):  # fold the WAL in: the files are complete on their own
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
    marker.write_text(spec.name)
    return server_path, client_path
