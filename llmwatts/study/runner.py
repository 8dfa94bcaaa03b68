"""``run_study``: every cell of a plan, resumably, into one study DB (records pulled over gRPC only).

A cell: set its power cap and/or lock its SM clock (``sm_clock_mhz``, through ``ClockClient``), each with a
lease renewed while it runs and reset after the cell, a warm-up load, the cell's load (its run
is marked by the load's own BeginRun/EndRun, labelled with the cell's values), then the server's records
are pulled (``Control.ExportRecords``) and ingested. Each load runs in its own process (Locust patches
its process for gevent). The study's state is the study DB table ``study_cells``: a cell is skipped once
``done``; a cell left ``running`` by a crash or Ctrl-C is closed (EndRun), marked ``abandoned`` and run
again under a new attempt's run id. Only done cells' runs stay in the study DB's ``runs`` (warm-ups,
idle windows and abandoned attempts are removed after each ingest; their raw rows stay in the mirror).

Idle power per GPU is measured once per server start (``idle_s`` seconds, no load) before its first cell
and stored in the study DB table ``idle_power`` (server_id, gpu_uuid, begin_ns, end_ns, power_mw,
energy_j, simulated): the analysis subtracts it to report dynamic energy.
"""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from llmwatts.analysis.pull import mirror_path, pull_records
from llmwatts.clock_client import ClockClient
from llmwatts.client import client_channel, control_token, rpc_error
from llmwatts.errors import FailedPrecondition, InvalidArgument, LlmwattsError, Unavailable
from llmwatts.study.plan import Cell, Plan
from llmwatts.study.progress import StudyProgress
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

CONTROL_TIMEOUT_S = 30.0
POLL_S = 1.0
LIVE_PULL_S = 3.0
STATE_SQL = """
create table if not exists studies (study TEXT PRIMARY KEY, instance TEXT NOT NULL, created_ns INTEGER) STRICT;
create table if not exists study_cells (
  study TEXT NOT NULL, cell_key TEXT NOT NULL, attempt INTEGER NOT NULL, run_id TEXT NOT NULL,
  target TEXT NOT NULL, status TEXT NOT NULL, labels TEXT NOT NULL, started_ns INTEGER, ended_ns INTEGER,
  requests_ok INTEGER, PRIMARY KEY (study, cell_key, attempt)) STRICT;
create table if not exists idle_power (
  server_id TEXT NOT NULL, gpu_uuid TEXT NOT NULL, begin_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL,
  power_mw INTEGER, energy_j REAL, simulated INTEGER, PRIMARY KEY (server_id, gpu_uuid)) STRICT;
"""


@dataclass
class Task:
    """A cell on one server."""

    cell: Cell
    target: str

    @property
    def key(self) -> str:
        return f"{self.cell.key},server={self.target}"


@dataclass
class Server:
    target: str
    channel: grpc.Channel
    control: pb_grpc.ControlStub
    info: pb.ServerInfo
    capped: bool = False
    clocks: ClockClient | None = None  # opened at the first cell that locks a clock


def weights_of(info: pb.ServerInfo) -> str:
    """A server's weight precision (serve --weights): its dtype names fp8 weights (``float16+fp8-weights``)."""
    return "fp8" if "fp8-weights" in info.dtype else "fp16"


@dataclass
class StudyResult:
    study_db: str
    done: list[str] = field(default_factory=list)      # run ids of the cells run by this call
    skipped: list[str] = field(default_factory=list)   # cell keys already done before it
    abandoned: list[str] = field(default_factory=list)  # run ids of attempts a crash left running
    sla: object | None = None                           # analysis.metrics.SlaChoice, when the plan has one
    report_dir: str | None = None


def tasks_of(plan: Plan, servers: dict[str, pb.ServerInfo]) -> list[Task]:
    """Each cell on each server whose engine and weight precision match the cell's ``engine`` and
    ``weights`` (when the grid has them)."""
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
        tasks.extend(Task(cell, t) for t in matching)
    return tasks


def _open_state(study_db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(study_db), isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(STATE_SQL)
    return conn


def _instance(state, plan: Plan) -> str:
    """This study DB's id for the plan: part of every run id, so a new study DB never reuses a run id a
    server has already seen (BeginRun refuses them)."""
    state.execute("insert or ignore into studies values (?, ?, ?)", [plan.name, uuid.uuid4().hex[:6], time.time_ns()])
    return state.execute("select instance from studies where study = ?", [plan.name]).fetchone()[0]


def _connect(targets: list[str], token: str | None, tls: dict) -> dict[str, Server]:
    servers = {}
    for target in targets:
        channel = client_channel(target, token=token, **tls)
        control = pb_grpc.ControlStub(channel)
        try:
            info = control.GetServerInfo(pb.GetServerInfoRequest(), timeout=CONTROL_TIMEOUT_S)
        except grpc.RpcError as e:
            channel.close()
            raise rpc_error(e, target) from None
        servers[target] = Server(target, channel, control, info)
    return servers


def run_study(plan: Plan, study_db: str | Path, *, out: str | Path | None = None, token: str | None = None,
              tls: dict | None = None, show_progress: bool = True) -> StudyResult:
    """Run every cell of ``plan`` not yet done in ``study_db``; then the report (when ``out``)."""
    study_db = Path(study_db)
    token = token or control_token()
    tls = tls or {}
    state = _open_state(study_db)
    servers = _connect(plan.servers, token, tls)
    result = StudyResult(str(study_db))
    client_db = f"{study_db}.client.db"
    try:
        tasks = tasks_of(plan, {t: s.info for t, s in servers.items()})
        done = {r[0] for r in state.execute("select cell_key from study_cells where study = ? and status = 'done'",
                                            [plan.name])}
        result.abandoned = _close_abandoned(state, plan, servers)
        todo = [t for t in tasks if t.key not in done]
        result.skipped = [t.key for t in tasks if t.key in done]
        with StudyProgress(len(tasks), len(tasks) - len(todo), enabled=show_progress) as progress:
            for target, server in servers.items():
                if todo and plan.idle_s > 0:
                    _measure_idle(state, plan, server, study_db, progress)
            for task in todo:
                run_id = _run_cell(state, plan, servers[task.target], task, study_db, client_db, progress, token, tls)
                result.done.append(run_id)
                progress.cell_done()
        _sync(state, plan, servers, study_db, client_db)
    finally:
        for server in servers.values():
            _reset_caps(server, plan)
            if server.clocks is not None:
                server.clocks.close()
            server.channel.close()
        state.close()
    if plan.sla_p95_ms is not None and (study_db.exists()):
        from llmwatts.analysis.metrics import choose_sla

        result.sla = choose_sla(study_db, latency_p95_ms_max=plan.sla_p95_ms)
    if out is not None:
        from llmwatts.analysis.report import build_report

        build_report(study_db, out, sla_p95_ms=plan.sla_p95_ms)
        result.report_dir = str(out)
    return result


def _close_abandoned(state, plan: Plan, servers: dict[str, Server]) -> list[str]:
    """Attempts a crash left ``running``: end their runs (best effort) and mark them abandoned."""
    rows = state.execute("select cell_key, attempt, run_id, target from study_cells where study = ? and "
                         "status = 'running'", [plan.name]).fetchall()
    for key, attempt, run_id, target in rows:
        server = servers.get(target)
        if server is not None:
            try:
                server.control.EndRun(pb.EndRunRequest(run_id=run_id), timeout=CONTROL_TIMEOUT_S)
            except grpc.RpcError:
                pass  # never begun (killed before BeginRun), already ended, or another server start
        state.execute("update study_cells set status = 'abandoned', ended_ns = ? where study = ? and cell_key = ? "
                      "and attempt = ?", [time.time_ns(), plan.name, key, attempt])
    return [r[2] for r in rows]


def _set_cap(server: Server, plan: Plan, cap_w: float | None, reason: str) -> None:
    if cap_w is None:
        return
    try:
        server.control.SetPowerCap(pb.SetPowerCapRequest(cap_w=float(cap_w), lease_s=plan.cap_lease_s,
                                                         reason=reason), timeout=CONTROL_TIMEOUT_S)
    except grpc.RpcError as e:
        raise rpc_error(e, server.target) from None
    server.capped = True


def _reset_caps(server: Server, plan: Plan) -> None:
    if not server.capped:
        return
    try:
        server.control.ResetPowerCap(pb.ResetPowerCapRequest(reason=f"study {plan.name} done"),
                                     timeout=CONTROL_TIMEOUT_S)
        server.capped = False
    except grpc.RpcError:
        pass  # the lease restores it


def _clocks(server: Server, token: str | None, tls: dict) -> ClockClient:
    if server.clocks is None:
        server.clocks = ClockClient(server.target, token=token, **tls)
    return server.clocks


def _run_cell(state, plan: Plan, server: Server, task: Task, study_db: Path, client_db: str,
              progress: StudyProgress, token: str | None = None, tls: dict | None = None) -> str:
    attempt = 1 + (state.execute("select coalesce(max(attempt), 0) from study_cells where study = ? and "
                                 "cell_key = ?", [plan.name, task.key]).fetchone()[0])
    run_id = f"{plan.name}-{_instance(state, plan)}-{task.cell.cell_id}-a{attempt}"
    labels = {**task.cell.labels(), "study": plan.name, "cell": task.cell.cell_id, "server": task.target}
    state.execute("insert into study_cells (study, cell_key, attempt, run_id, target, status, labels, started_ns) "
                  "values (?, ?, ?, ?, ?, 'running', ?, ?)",
                  [plan.name, task.key, attempt, run_id, task.target, json.dumps(labels, sort_keys=True),
                   time.time_ns()])
    cap_w = task.cell.get("cap_w")
    progress.start_cell(task.key)
    _set_cap(server, plan, cap_w, f"study {plan.name} cell {task.cell.cell_id}")
    sm_clock_mhz = task.cell.get("sm_clock_mhz")
    configs = []
    if plan.warmup_requests:
        warm = plan.load_config(task.cell, target=server.target, run_id=f"{run_id}-warmup", client_db=client_db,
                                labels={"study": plan.name, "warmup": "1"}, quiet=True)
        warm.requests, warm.run_time_s = plan.warmup_requests, None
        configs.append(warm)
    configs.append(plan.load_config(task.cell, target=server.target, run_id=run_id, client_db=client_db,
                                    labels=labels, quiet=True))
    if sm_clock_mhz is None:
        ok = _load(configs, server, plan, cap_w, progress, study_db)
    else:
        clocks = _clocks(server, token, tls or {})
        reason = f"study {plan.name} cell {task.cell.cell_id}"
        with clocks.locked(sm_clock_mhz, lease_s=plan.cap_lease_s, reason=reason):  # reset after the cell
            ok = _load(configs, server, plan, cap_w, progress, study_db,
                       renew=lambda: clocks.lock(sm_clock_mhz, lease_s=plan.cap_lease_s, reason=f"{reason}: lease renewed"))
    pull_records(server.target, mirror_path(study_db, server.target), channel=server.channel)
    _ingest(state, plan, study_db, [mirror_path(study_db, server.target)], [client_db])
    state.execute("update study_cells set status = 'done', ended_ns = ?, requests_ok = ? where study = ? and "
                  "cell_key = ? and attempt = ?", [time.time_ns(), ok, plan.name, task.key, attempt])
    _drop_stray_runs(state, plan)
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


def _load(configs: list, server: Server, plan: Plan, cap_w, progress: StudyProgress, study_db: Path,
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
                _set_cap(server, plan, cap_w, f"study {plan.name}: lease renewed")
                if renew is not None:
                    renew()
                renewed = now
            if now - pulled > LIVE_PULL_S:
                pull_records(server.target, mirror, channel=server.channel)
                pulled = now
                progress.live(_tokens_per_s(config.client_db, config.run_id, now - started),
                              _watts(mirror, server.info.server_id))
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


def _watts(mirror: Path, server_id: str) -> float | None:
    """Sum over GPUs of each one's latest sampled power."""
    conn = sqlite3.connect(str(mirror), timeout=1)
    try:
        row = conn.execute("select sum(p) from (select power_mw as p, max(ts_ns) from telemetry where server_id = ? "
                           "group by gpu_uuid)", [server_id]).fetchone()
    finally:
        conn.close()
    return row[0] / 1000 if row and row[0] is not None else None


def _measure_idle(state, plan: Plan, server: Server, study_db: Path, progress: StudyProgress) -> None:
    """Idle power per GPU over ``idle_s`` with no load, once per server start."""
    server_id = server.info.server_id
    if state.execute("select 1 from idle_power where server_id = ?", [server_id]).fetchone():
        return
    progress.start_cell(f"idle power on {server.target} ({plan.idle_s:g} s)")
    run_id = f"{plan.name}-idle-{server_id}-{time.time_ns()}"
    try:
        begin = server.control.BeginRun(pb.BeginRunRequest(run_id=run_id, labels={"study": plan.name, "idle": "1"}),
                                        timeout=CONTROL_TIMEOUT_S)
        time.sleep(plan.idle_s)
        end = server.control.EndRun(pb.EndRunRequest(run_id=run_id, run_secret=begin.run_secret),
                                    timeout=CONTROL_TIMEOUT_S)
    except grpc.RpcError as e:
        raise rpc_error(e, server.target) from None
    mirror = mirror_path(study_db, server.target)
    pull_records(server.target, mirror, channel=server.channel)
    conn = sqlite3.connect(str(mirror))
    try:
        rows = conn.execute(
            "select gpu_uuid, avg(power_mw), max(energy_mj) - min(energy_mj), max(simulated) from telemetry "
            "where server_id = ? and ts_ns between ? and ? group by gpu_uuid",
            [server_id, begin.server_ns, end.server_ns]).fetchall()
    finally:
        conn.close()
    if not rows:
        raise FailedPrecondition(f"{server.target} sampled no telemetry in {plan.idle_s:g} s of idle: start it with "
                                 "--telemetry-hz above 0, or set [study] idle_s = 0 to skip idle power")
    state.executemany("insert or replace into idle_power values (?, ?, ?, ?, ?, ?, ?)",
                      [(server_id, gpu, begin.server_ns, end.server_ns, round(p), (e or 0) / 1000, sim)
                       for gpu, p, e, sim in rows])


def _ingest(state, plan: Plan, study_db: Path, mirrors: list[Path], client_dbs: list[str]) -> None:
    from llmwatts.analysis.ingest import ingest

    ingest(study_db, [str(m) for m in mirrors if m.exists()], [c for c in client_dbs if Path(c).exists()])


def _drop_stray_runs(state, plan: Plan) -> None:
    """Keep only done cells' runs of this study in the study DB (warm-ups, idle windows and abandoned
    attempts go, on the server's side and the client's)."""
    pattern = plan.name.replace("_", "\\_") + "-%"
    for table in ("runs", "client_runs", "client_requests"):
        if state.execute("select 1 from sqlite_master where type = 'table' and name = ?", [table]).fetchone():
            state.execute(f"delete from {table} where run_id like ? escape '\\' and run_id not in (select run_id "
                          "from study_cells where study = ? and status = 'done')", [pattern, plan.name])


def _sync(state, plan: Plan, servers: dict[str, Server], study_db: Path, client_db: str) -> None:
    """A last pull and ingest of every server, so the study DB holds every record to the end."""
    mirrors = []
    for target, server in servers.items():
        try:
            pull_records(target, mirror_path(study_db, target), channel=server.channel)
        except Unavailable:
            pass  # keep what was pulled; the report says what it has
        mirrors.append(mirror_path(study_db, target))
    if any(m.exists() for m in mirrors):
        _ingest(state, plan, study_db, mirrors, [client_db])
        _drop_stray_runs(state, plan)
