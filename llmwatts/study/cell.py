"""One cell of a study: its settings leased on the server, its warm-up and load in a child process (Locust
patches its process for gevent) with live tokens/s and watts, then its records pulled and ingested."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import time
from pathlib import Path

from llmwatts.analysis.pull import mirror_path, pull_records
from llmwatts.errors import LlmwattsError
from llmwatts.study import servers as srv
from llmwatts.study import state as st
from llmwatts.study.plan import Cell, Plan
from llmwatts.study.progress import StudyProgress

POLL_S = 1.0
LIVE_PULL_S = 3.0


def run_cell(state, plan: Plan, server: srv.Server, cell: Cell, key: str, study_db: Path, client_db: str,
             progress: StudyProgress, token: str | None = None, tls: dict | None = None) -> str:
    """Run ``cell`` (study_cells key ``key``) on ``server`` as a new attempt -> its run id."""
    attempt = 1 + (state.execute("select coalesce(max(attempt), 0) from study_cells where study = ? and "
                                 "cell_key = ?", [plan.name, key]).fetchone()[0])
    run_id = f"{plan.name}-{st.instance(state, plan)}-{cell.cell_id}-a{attempt}"
    labels = {**cell.labels(), "study": plan.name, "cell": cell.cell_id, "server": server.target}
    state.execute("insert into study_cells (study, cell_key, attempt, run_id, target, status, labels, started_ns) "
                  "values (?, ?, ?, ?, ?, 'running', ?, ?)",
                  [plan.name, key, attempt, run_id, server.target, json.dumps(labels, sort_keys=True),
                   time.time_ns()])
    cap_w = cell.get("cap_w")
    progress.start_cell(key)
    srv.set_cap(server, plan, cap_w, f"study {plan.name} cell {cell.cell_id}")
    sm_clock_mhz = cell.get("sm_clock_mhz")
    configs = []
    if plan.warmup_requests:
        warm = plan.load_config(cell, target=server.target, run_id=f"{run_id}-warmup", client_db=client_db,
                                labels={"study": plan.name, "warmup": "1"}, quiet=True,
                                run_secret_file=str(srv.secret_file(study_db, f"{run_id}-warmup")))
        warm.requests, warm.run_time_s = plan.warmup_requests, None
        configs.append(warm)
    configs.append(plan.load_config(cell, target=server.target, run_id=run_id, client_db=client_db,
                                    labels=labels, quiet=True, run_secret_file=str(srv.secret_file(study_db, run_id))))
    try:
        if sm_clock_mhz is None:
            ok = _load(configs, server, plan, cap_w, progress, study_db)
        else:
            clocks = srv.clocks_of(server, token, tls or {})
            reason = f"study {plan.name} cell {cell.cell_id}"
            with clocks.locked(sm_clock_mhz, lease_s=plan.cap_lease_s, reason=reason):  # reset after the cell
                ok = _load(configs, server, plan, cap_w, progress, study_db,
                           renew=lambda: clocks.lock(sm_clock_mhz, lease_s=plan.cap_lease_s,
                                                     reason=f"{reason}: lease renewed"))
    finally:
        srv.end_open_runs(study_db, {server.target: server})  # what a failed or dead load left open
    pull_records(server.target, mirror_path(study_db, server.target), channel=server.channel)
    st.ingest(study_db, [mirror_path(study_db, server.target)], [client_db])
    state.execute("update study_cells set status = 'done', ended_ns = ?, requests_ok = ? where study = ? and "
                  "cell_key = ? and attempt = ?", [time.time_ns(), ok, plan.name, key, attempt])
    st.drop_stray_runs(state, plan)
    return run_id


def _load_child(configs, results) -> None:
    """The loads' own process (Locust patches it for gevent): the warm-up, then the cell's run. The answer
    goes through a pipe, written at once: a multiprocessing Queue's feeder thread is a greenlet here and
    never runs."""
    try:
        from llmwatts.loadgen.runner import run_load

        for config in configs:
            ok = run_load(config).requests_ok
        results.send(("ok", ok))
    except LlmwattsError as e:
        results.send(("error", str(e)))
    except BaseException as e:  # noqa: BLE001 (the parent reports it in one line)
        results.send(("error", f"{type(e).__name__}: {e}"))


def _load(configs: list, server: srv.Server, plan: Plan, cap_w, progress: StudyProgress, study_db: Path,
          renew=None) -> int:
    """Run the loads in a child process; meanwhile show live tok/s and W, and renew the cap's (and the
    clock lock's, through ``renew``) lease."""
    config = configs[-1]
    ctx = multiprocessing.get_context("spawn")
    results, child_end = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_load_child, args=(configs, child_end), daemon=True)
    child.start()
    child_end.close()  # the child's copy: a dead child then reads as end of file, not a silent wait
    started = time.monotonic()
    renewed, pulled = started, started
    mirror = mirror_path(study_db, server.target)
    try:
        while True:
            if results.poll(POLL_S):
                try:
                    kind, value = results.recv()
                except EOFError:
                    child.join(timeout=10)
                    raise LlmwattsError(f"the load of run {config.run_id} died (exit code {child.exitcode})") from None
                break
            if not child.is_alive() and not results.poll(0):
                raise LlmwattsError(f"the load of run {config.run_id} died (exit code {child.exitcode})")
            now = time.monotonic()
            if (cap_w is not None or renew is not None) and now - renewed > plan.cap_lease_s / 3:
                srv.set_cap(server, plan, cap_w, f"study {plan.name}: lease renewed")
                if renew is not None:
                    renew()
                renewed = now
            if now - pulled > LIVE_PULL_S:
                pull_records(server.target, mirror, channel=server.channel)
                pulled = now
                progress.live(_tokens_per_s(config.client_db, config.run_id, now - started),
                              srv.watts(mirror, server.info.server_id))
    finally:
        if child.is_alive():
            child.terminate()
        child.join(timeout=10)
    if kind == "error":
        raise LlmwattsError(f"the load of run {config.run_id} failed: {value}")
    return int(value)


def _tokens_per_s(client_db: str, run_id: str, elapsed_s: float) -> float | None:
    try:
        conn = sqlite3.connect(f"file:{client_db}?mode=ro", uri=True, timeout=1)
        try:
            tokens = conn.execute("select sum(output_tokens) from client_requests where run_id = ? and "
                                  "status = 'ok'", [run_id]).fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return (tokens or 0) / elapsed_s if elapsed_s > 0 else None
