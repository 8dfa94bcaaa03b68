"""The study's servers: connections, the leased settings of a cell (power cap, locked SM clock), idle power,
and the runs a dead load left open (ended with the secret it wrote, ``loadgen/run_secret.py``)."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from llmwatts.analysis.pull import mirror_path, pull_records
from llmwatts.clock_client import ClockClient
from llmwatts.client import client_channel, rpc_error
from llmwatts.errors import FailedPrecondition
from llmwatts.loadgen.run_secret import OpenRun, read_run_secret, remove_run_secret, write_run_secret
from llmwatts.study.plan import Plan
from llmwatts.study.progress import StudyProgress
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

CONTROL_TIMEOUT_S = 30.0
# EndRun of a run a dead load left open: the server waits for its requests (cancelled with their client).
END_OPEN_RUN_TIMEOUT_S = 60.0


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


def kv_cache_of(info: pb.ServerInfo) -> str:
    """A server's KV cache precision (serve --kv-cache): its dtype names an fp8 cache (``float16+fp8-kv``)."""
    return "fp8" if "fp8-kv" in info.dtype else "fp16"


def connect(targets: list[str], token: str | None, tls: dict) -> dict[str, Server]:
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


def close(server: Server, plan: Plan) -> None:
    reset_caps(server, plan)
    if server.clocks is not None:
        server.clocks.close()
    server.channel.close()


def set_cap(server: Server, plan: Plan, cap_w: float | None, reason: str) -> None:
    if cap_w is None:
        return
    try:
        server.control.SetPowerCap(pb.SetPowerCapRequest(cap_w=float(cap_w), lease_s=plan.cap_lease_s,
                                                         reason=reason), timeout=CONTROL_TIMEOUT_S)
    except grpc.RpcError as e:
        raise rpc_error(e, server.target) from None
    server.capped = True


def reset_caps(server: Server, plan: Plan) -> None:
    if not server.capped:
        return
    try:
        server.control.ResetPowerCap(pb.ResetPowerCapRequest(reason=f"study {plan.name} done"),
                                     timeout=CONTROL_TIMEOUT_S)
        server.capped = False
    except grpc.RpcError:
        pass  # the lease restores it


def clocks_of(server: Server, token: str | None, tls: dict) -> ClockClient:
    if server.clocks is None:
        server.clocks = ClockClient(server.target, token=token, **tls)
    return server.clocks


def open_runs_dir(study_db: Path) -> Path:
    """Where the study's loads (and its idle windows) keep the secret of each run they hold open."""
    return Path(f"{study_db}.open-runs")


def secret_file(study_db: Path, run_id: str) -> Path:
    return open_runs_dir(study_db) / f"{run_id}.json"


def end_open_runs(study_db: Path, servers: dict[str, Server]) -> list[str]:
    """End every run a killed study or a dead load left open on these servers (its secret file is still
    there) -> their run ids. A server's bound on open runs per client (16) is never used up by resumes.
    Files of servers not in this study stay; a run that is already ended or unknown just loses its file."""
    ended = []
    for path in sorted(open_runs_dir(study_db).glob("*.json")):
        run = read_run_secret(path)
        if run is None:
            remove_run_secret(path)  # cut by a crash before the rename: the run was never ours to end
            continue
        server = servers.get(run.target)
        if server is None:
            continue
        try:
            server.control.EndRun(pb.EndRunRequest(run_id=run.run_id, run_secret=run.run_secret),
                                  timeout=END_OPEN_RUN_TIMEOUT_S)
            ended.append(run.run_id)
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                continue  # e.g. unreachable now: the next resume tries again
        remove_run_secret(path)
    return ended


def watts(mirror: Path, server_id: str) -> float | None:
    """Sum over GPUs of each one's latest sampled power."""
    conn = sqlite3.connect(str(mirror), timeout=1)
    try:
        row = conn.execute("select sum(p) from (select power_mw as p, max(ts_ns) from telemetry where server_id = ? "
                           "group by gpu_uuid)", [server_id]).fetchone()
    finally:
        conn.close()
    return row[0] / 1000 if row and row[0] is not None else None


def measure_idle(state, plan: Plan, server: Server, study_db: Path, progress: StudyProgress) -> None:
    """Idle power per GPU over ``idle_s`` with no load, once per server start (table ``idle_power``)."""
    server_id = server.info.server_id
    if state.execute("select 1 from idle_power where server_id = ?", [server_id]).fetchone():
        return
    progress.start_cell(f"idle power on {server.target} ({plan.idle_s:g} s)")
    run_id = f"{plan.name}-idle-{server_id}-{time.time_ns()}"
    try:
        begin = server.control.BeginRun(pb.BeginRunRequest(run_id=run_id, labels={"study": plan.name, "idle": "1"}),
                                        timeout=CONTROL_TIMEOUT_S)
        write_run_secret(secret_file(study_db, run_id), OpenRun(run_id, server.target, begin.run_secret))
        time.sleep(plan.idle_s)
        end = server.control.EndRun(pb.EndRunRequest(run_id=run_id, run_secret=begin.run_secret),
                                    timeout=CONTROL_TIMEOUT_S)
        remove_run_secret(secret_file(study_db, run_id))
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
