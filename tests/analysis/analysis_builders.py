"""Realistic server and client DBs for the analysis tests.

Server DBs are written through ``llmwatts.server.store`` and client DBs through
``llmwatts.loadgen.records`` (each box's own schema and writer), so these tests break when either schema
drifts from what the analysis reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import sqlite_utils

from llmwatts.server.store import ServerStore

S = 1_000_000_000  # ns per s
T0 = 1_700_000_000 * S  # server clock at the small run's BeginRun
CLOCK_OFFSET_NS = 5_000_000  # server − client: the client's clock is 5 ms behind
GIB = 1 << 30

CLIENT_SCHEMA = {
    "client_requests": (
        {"request_id": str, "run_id": str, "worker": str, "dataset": str, "batch_size": int, "stream": int,
         "client_send_ns": int, "first_token_ns": int, "done_ns": int, "latency_ms": float,
         "ttft_ms": float, "prompt_tokens": int, "output_tokens": int, "output_words": int,
         "status": str, "error": str, "batch_id": str},
        "request_id",
    ),
    "client_runs": (
        {"run_id": str, "target": str, "started_ns": int, "ended_ns": int, "labels": str,
         "clock_offset_ns": int, "users": int, "batch_size": int, "dataset": str, "stream": int},
        "run_id",
    ),
}


def write_client_db(path: Path, runs: list[dict], requests: list[dict]) -> Path:
    """A client DB written by the loadgen's own writer (``llmwatts.loadgen.records``); the local copy of
    the schema is only for a tree where that module does not exist yet."""
    try:
        from llmwatts.loadgen import records
    except ImportError:
        records = None
    if records is not None:
        db = records.open_client_db(path)
        for run in runs:
            records.write_run_start(db, {k: v for k, v in run.items() if k != "ended_ns"})
            records.write_run_end(db, run["run_id"], run["ended_ns"])
        records.db_sink(db)(requests)
    else:
        db = sqlite_utils.Database(path)
        db.enable_wal()
        for name, (columns, pk) in CLIENT_SCHEMA.items():
            db.create_table(name, columns, pk=pk, strict=True)
        db["client_runs"].insert_all(
            [dict(r, labels=json.dumps(r.get("labels") or {}, sort_keys=True)) for r in runs]
        )
        db["client_requests"].insert_all(requests)
    db.conn.close()
    return path


@dataclass
class Built:
    server_db: Path
    client_db: Path
    server_id: str
    run_ids: list[str] = field(default_factory=list)


def _telemetry(gpu_uuid: str, rank: int, ts_ns: int, energy_mj: int, sm: float, mem: float,
               used: int, power_mw: int, cap_mw: int, simulated: bool) -> dict:
    return {
        "ts_ns": ts_ns, "gpu_uuid": gpu_uuid, "node": "node-a", "rank": rank, "power_mw": power_mw,
        "power_instant_mw": power_mw, "energy_mj": energy_mj, "sm_pct": sm, "mem_pct": mem,
        "mem_used_bytes": used, "sm_clock_mhz": 1980, "temp_c": 50, "cap_mw": cap_mw,
        "simulated": int(simulated),
    }


def build_small(tmp_path: Path, simulated: bool = False, server_id: str = "srv-a") -> Built:
    """One run, 2 GPUs, 10 s, 3 batches, 5 server requests (4 ok, 1 refused by the server) and one more
    client request refused at the door (no server row). Hand-computed metrics: see test_metrics.py."""
    server_db = tmp_path / f"{server_id}.db"
    store = ServerStore(server_db, server_id)
    store.record_server({
        "started_ns": T0 - 60 * S, "node": "node-a", "model": "llama-7b", "dtype": "float16",
        "engine": "transformers", "power_source": "simulated" if simulated else "nvml",
        "shard_count": 2, "layout": {"ranks": 2}, "simulated": int(simulated), "versions": {"torch": "x"},
    })
    gpus = [("GPU-0000", 0), ("GPU-1111", 1)]
    store.record_gpus([
        {"gpu_uuid": u, "node": "node-a", "rank": r, "gpu_index": r, "name": "H100",
         "memory_total_bytes": 80 * GIB, "simulated": int(simulated)} for u, r in gpus
    ])
    # Labels travel as strings (proto map<string, string>), as the real BeginRun stores them.
    store.begin_run("run-1", T0, 1000.0, {"dataset": "alpaca", "batch_size": "4", "note": "small"}, simulated)
    rows = []
    # Out-of-window samples (1 s before and after) carry values that would spoil every mean if counted.
    for k in range(-1, 12):
        inside = 0 <= k <= 10
        for uuid, rank in gpus:
            per_s_mj = 120_000 if rank == 0 else 80_000
            sm = (10.0 * k if rank == 0 else 30.0) if inside else 100.0
            mem = (20.0 if rank == 0 else 30.0) if inside else 99.0
            used = (60 * GIB if (rank == 0 and k == 5) else 40 * GIB) if inside else 80 * GIB
            rows.append(_telemetry(uuid, rank, T0 + k * S, 500_000 + per_s_mj * k, sm, mem, used,
                                   per_s_mj, 300_000, simulated))
    store.add_telemetry(rows)
    store.flush()
    batches = [("b1", 1, 400.0, [("r1", 2, 200, 250.0), ("r2", 2, 100, 150.0)]),
               ("b2", 3, 500.0, [("r3", 4, 400, 500.0)]),
               ("b3", 6, 300.0, [("r4", 4, 300, 300.0)])]
    for batch_id, start_s, energy_j, reqs in batches:
        start_ns, end_ns = T0 + start_s * S, T0 + (start_s + 1) * S
        store.record_batch(
            {"batch_id": batch_id, "start_ns": start_ns, "first_token_ns": start_ns + S // 10,
             "end_ns": end_ns, "n_requests": len(reqs), "n_sequences": sum(r[1] for r in reqs),
             "prompt_tokens": 50, "output_tokens": sum(r[2] for r in reqs), "energy_j": energy_j,
             "energy_method": "counter", "simulated": int(simulated)},
            [{"batch_id": batch_id, "gpu_uuid": u, "node": "node-a", "rank": r, "energy_start_mj": 0,
              "energy_end_mj": int(energy_j * 500), "energy_j": energy_j / 2, "method": "counter"}
             for u, r in gpus],
            [{"request_id": rid, "run_id": "run-1", "batch_id": batch_id, "received_ns": start_ns - S // 2,
              "batch_start_ns": start_ns, "first_token_ns": start_ns + S // 10, "done_ns": end_ns,
              "n_prompts": n, "prompt_tokens": 10, "output_tokens": out, "energy_j": ej, "status": "OK",
              "error": None} for rid, n, out, ej in reqs],
        )
    store.record_requests([
        {"request_id": "r5", "run_id": "run-1", "batch_id": None, "received_ns": T0 + 8 * S,
         "n_prompts": 1, "prompt_tokens": 10, "output_tokens": 0, "energy_j": 0.0,
         "status": "RESOURCE_EXHAUSTED", "error": "queue full"},
    ])
    store.record_cap_event({"ts_ns": T0 - 30 * S, "gpu_uuid": "GPU-0000", "node": "node-a", "rank": 0,
                            "kind": "set", "old_cap_w": 700.0, "new_cap_w": 300.0, "who": "test",
                            "reason": "sweep"})
    store.end_run("run-1", T0 + 10 * S, 3000.0)
    store.close()

    def client(rid, latency_ms, ttft_ms, words, status="ok", received_s=None):
        send_server_ns = T0 + int((received_s if received_s is not None else 0.5) * S) - 1_000_000
        send_ns = send_server_ns - CLOCK_OFFSET_NS  # on the client's clock
        return {"request_id": rid, "run_id": "run-1", "worker": "w0", "dataset": "alpaca", "batch_size": 4,
                "stream": int(ttft_ms is not None), "client_send_ns": send_ns,
                "first_token_ns": None if ttft_ms is None else send_ns + int(ttft_ms * 1e6),
                "done_ns": send_ns + int(latency_ms * 1e6), "latency_ms": latency_ms, "ttft_ms": ttft_ms,
                "prompt_tokens": 10, "output_tokens": 0, "output_words": words, "status": status,
                "error": None if status == "ok" else "refused", "batch_id": None}

    client_db = write_client_db(
        tmp_path / "client.db",
        [{"run_id": "run-1", "target": "localhost:50051", "started_ns": T0 - CLOCK_OFFSET_NS - S,
          "ended_ns": T0 + 11 * S, "labels": {"operator": "test"}, "clock_offset_ns": CLOCK_OFFSET_NS,
          "users": 4, "batch_size": 4, "dataset": "alpaca", "stream": 1}],
        [client("r1", 100.0, 20.0, 150, received_s=0.5), client("r2", 200.0, 40.0, 75, received_s=0.5),
         client("r3", 300.0, None, 300, received_s=2.5), client("r4", 400.0, 80.0, 225, received_s=5.5),
         client("r5", 5.0, None, 0, status="RESOURCE_EXHAUSTED", received_s=8.0),
         client("r6", 3.0, None, 0, status="UNAVAILABLE", received_s=9.0)],
    )
    return Built(server_db, client_db, server_id, ["run-1"])


def build_sweep(tmp_path: Path, points: list[tuple[int, int, float, float]], simulated: bool = True,
                datasets: list[str] | None = None) -> Built:
    """A sweep over (cap_w, batch_size): each point gets a 2 s run with 4 one-batch requests of
    ``batch_size`` prompts, 100 output tokens per prompt, window energy = j_per_token × tokens and client
    latencies spread around ``latency_ms``; ``datasets`` (one per point, default gsm8k) the run's dataset.
    A repeated (cap_w, batch_size, dataset) gets run id suffix ``-r2``, ``-r3``…"""
    server_db = tmp_path / "sweep-server.db"
    store = ServerStore(server_db, "srv-sweep")
    store.record_server({"started_ns": T0, "node": "n", "model": "llama-7b", "dtype": "float16",
                         "engine": "transformers", "power_source": "simulated" if simulated else "nvml",
                         "shard_count": 1, "layout": {}, "simulated": int(simulated), "versions": {}})
    store.record_gpus([{"gpu_uuid": "GPU-S", "node": "n", "rank": 0, "gpu_index": 0, "name": "H100",
                        "memory_total_bytes": 80 * GIB, "simulated": int(simulated)}])
    client_runs, client_requests, run_ids = [], [], []
    energy_j = 0.0
    for i, (cap_w, batch_size, j_per_token, latency_ms) in enumerate(points):
        dataset = datasets[i] if datasets else "gsm8k"
        run_id = f"sweep-{cap_w}w-b{batch_size}" + (f"-{dataset}" if datasets else "")
        if run_id in run_ids:
            run_id += f"-r{sum(r.startswith(run_id) for r in run_ids) + 1}"
        run_ids.append(run_id)
        begin = T0 + i * 10 * S
        tokens = 4 * batch_size * 100
        run_energy = j_per_token * tokens
        store.begin_run(run_id, begin, energy_j, {"cap_w": str(cap_w), "batch_size": str(batch_size),
                                                 "dataset": dataset}, simulated)
        store.add_telemetry([
            _telemetry("GPU-S", 0, begin + k * S // 2, int((energy_j + run_energy * k / 4) * 1000), 50.0,
                       25.0, 10 * GIB, int(run_energy / 2 * 1000), cap_w * 1000, simulated)
            for k in range(5)
        ])
        store.flush()
        store.record_cap_event({"ts_ns": begin - S, "gpu_uuid": "GPU-S", "node": "n", "rank": 0,
                                "kind": "set", "old_cap_w": 700.0, "new_cap_w": float(cap_w),
                                "who": "sweep", "reason": "test"})
        for j in range(4):
            rid = f"{run_id}-q{j}"
            store.record_batch(
                {"batch_id": f"{run_id}-b{j}", "start_ns": begin + j * S // 4, "first_token_ns": None,
                 "end_ns": begin + (j + 1) * S // 4, "n_requests": 1, "n_sequences": batch_size,
                 "prompt_tokens": 10, "output_tokens": batch_size * 100, "energy_j": run_energy / 5,
                 "energy_method": "counter", "simulated": int(simulated)},
                [],
                [{"request_id": rid, "run_id": run_id, "batch_id": f"{run_id}-b{j}",
                  "received_ns": begin + j * S // 4, "n_prompts": batch_size, "prompt_tokens": 10,
                  "output_tokens": batch_size * 100, "energy_j": run_energy / 5, "status": "OK", "error": None}],
            )
            client_requests.append({
                "request_id": rid, "run_id": run_id, "worker": "w0", "dataset": dataset,
                "batch_size": batch_size, "stream": 0, "client_send_ns": begin + j * S // 4 - CLOCK_OFFSET_NS,
                "first_token_ns": None, "done_ns": None, "latency_ms": latency_ms * (0.9 + 0.05 * j),
                "ttft_ms": None, "prompt_tokens": 10, "output_tokens": batch_size * 100,
                "output_words": batch_size * 75, "status": "ok", "error": None, "batch_id": None})
        energy_j += run_energy
        store.end_run(run_id, begin + 2 * S, energy_j)
        client_runs.append({"run_id": run_id, "target": "t", "started_ns": begin - S, "ended_ns": begin + 3 * S,
                            "labels": {}, "clock_offset_ns": CLOCK_OFFSET_NS, "users": 1,
                            "batch_size": batch_size, "dataset": dataset, "stream": 0})
    store.close()
    client_db = write_client_db(tmp_path / "sweep-client.db", client_runs, client_requests)
    return Built(server_db, client_db, "srv-sweep", run_ids)
