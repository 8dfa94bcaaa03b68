"""``run_study``: every cell of a plan, resumably, into one study DB (records pulled over gRPC only).

A cell (``cell.py``): set its power cap and/or lock its SM clock (``sm_clock_mhz``, through ``ClockClient``),
each with a lease renewed while it runs and reset after the cell, a warm-up load, the cell's load (its run
is marked by the load's own BeginRun/EndRun, labelled with the cell's values), then the server's records
are pulled (``Control.ExportRecords``) and ingested. Each load runs in its own process (Locust patches
its process for gevent). The study's state is the study DB table ``study_cells`` (``state.py``): a cell is
skipped once ``done``; a cell left ``running`` by a crash or Ctrl-C is marked ``abandoned`` and run again
under a new attempt's run id. Every load writes its run's secret beside the study DB until its EndRun
succeeded (``LoadConfig.run_secret_file``), so a rerun ends the runs a killed study left open on its
servers (``servers.end_open_runs``): repeated resumes never use up a server's open runs per client. Only
done cells' runs stay in the study DB's ``runs`` (warm-ups, idle windows and abandoned attempts are removed
after each ingest; their raw rows stay in the mirror).

Idle power per GPU is measured once per server start (``idle_s`` seconds, no load) before its first cell
and stored in the study DB table ``idle_power`` (server_id, gpu_uuid, begin_ns, end_ns, power_mw,
energy_j, simulated): the analysis subtracts it to report dynamic energy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmwatts.client import control_token
from llmwatts.errors import InvalidArgument
from llmwatts.study import servers as srv
from llmwatts.study import state as st
from llmwatts.study.cell import run_cell
from llmwatts.study.plan import Cell, Plan
from llmwatts.study.progress import StudyProgress
from llmwatts.study.servers import kv_cache_of, weights_of  # noqa: F401  (weights_of: its historic home)
from llmwatts.v1 import llmwatts_pb2 as pb


@dataclass
class Task:
    """A cell on one server."""

    cell: Cell
    target: str

    @property
    def key(self) -> str:
        return f"{self.cell.key},server={self.target}"


@dataclass
class StudyResult:
    study_db: str
    done: list[str] = field(default_factory=list)      # run ids of the cells run by this call
    skipped: list[str] = field(default_factory=list)   # cell keys already done before it
    abandoned: list[str] = field(default_factory=list)  # run ids of attempts a crash left running
    ended_open_runs: list[str] = field(default_factory=list)  # runs a killed study left open, ended now
    sla: object | None = None                           # analysis.tradeoffs.SlaChoice, when the plan has one
    report_dir: str | None = None


def tasks_of(plan: Plan, servers: dict[str, pb.ServerInfo]) -> list[Task]:
    """Each cell on each server whose engine, weight precision and KV cache precision match the cell's
    ``engine``, ``weights`` and ``kv_cache`` (when the grid has them)."""
    tasks = []
    for cell in plan.cells():
        engine, weights = cell.get("engine"), cell.get("weights")
        matching = [t for t, info in servers.items() if engine is None or info.engine == engine]
        if not matching:
            raise InvalidArgument(f"no server runs engine {engine!r}: the servers run "
                                  f"{sorted({i.engine for i in servers.values()})}")
        matching = [t for t in matching if weights is None or weights_of(servers[t]) == weights]
        if not matching:
            raise InvalidArgument(f"no server{'' if engine is None else f' of engine {engine}'} runs --weights "
                                  f"{weights}: the servers run {sorted({weights_of(i) for i in servers.values()})}; "
                                  f"start one with `llmwatts serve --weights {weights}`")
        kv = cell.get("kv_cache")
        if kv is not None:
            others = sorted({kv_cache_of(servers[t]) for t in matching})
            matching = [t for t in matching if kv_cache_of(servers[t]) == kv]
            if not matching:
                raise InvalidArgument(f"no matching server runs --kv-cache {kv}: they run {others}; start one "
                                      f"with `llmwatts serve --kv-cache {kv}`")
        tasks.extend(Task(cell, t) for t in matching)
    return tasks


def run_study(plan: Plan, study_db: str | Path, *, out: str | Path | None = None, token: str | None = None,
              tls: dict | None = None, show_progress: bool = True, on_simulated=None) -> StudyResult:
    """Run every cell of ``plan`` not yet done in ``study_db``; then the report (when ``out``).
    ``on_simulated(targets)``: called before the first cell with the servers whose GPUs are simulated."""
    study_db = Path(study_db)
    token = token or control_token()
    tls = tls or {}
    state = st.open_state(study_db)
    servers = srv.connect(plan.servers, token, tls)
    result = StudyResult(str(study_db))
    client_db = f"{study_db}.client.db"
    try:
        tasks = tasks_of(plan, {t: s.info for t, s in servers.items()})
        simulated = [t for t, s in servers.items() if s.info.power_source == "simulated"]
        if simulated and on_simulated is not None:
            on_simulated(simulated)
        done = {r[0] for r in state.execute("select cell_key from study_cells where study = ? and status = 'done'",
                                            [plan.name])}
        result.abandoned = st.mark_abandoned(state, plan)
        result.ended_open_runs = srv.end_open_runs(study_db, servers)
        todo = [t for t in tasks if t.key not in done]
        result.skipped = [t.key for t in tasks if t.key in done]
        with StudyProgress(len(tasks), len(tasks) - len(todo), enabled=show_progress) as progress:
            for server in servers.values():
                if todo and plan.idle_s > 0:
                    srv.measure_idle(state, plan, server, study_db, progress)
            for task in todo:
                result.done.append(run_cell(state, plan, servers[task.target], task.cell, task.key, study_db,
                                            client_db, progress, token, tls))
                progress.cell_done()
        st.sync(state, plan, servers, study_db, client_db)
    finally:
        for server in servers.values():
            srv.close(server, plan)
        state.close()
    if plan.sla_p95_ms is not None and (study_db.exists()):
        from llmwatts.analysis.tradeoffs import choose_sla

        result.sla = choose_sla(study_db, latency_p95_ms_max=plan.sla_p95_ms)
    if out is not None:
        from llmwatts.analysis.report import build_report

        build_report(study_db, out, sla_p95_ms=plan.sla_p95_ms)
        result.report_dir = str(out)
    return result
