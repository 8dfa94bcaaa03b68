"""`llmwatts sweep` against a real simulated-GPU server: each cap is set over the authenticated Control RPC,
power is held under it, lower caps run longer, and the caps are reset afterwards."""

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
import sqlite_utils

from llmwatts.server.gpu.simulated import sim_profile
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

CLI = [sys.executable, "-m", "llmwatts.cli"]
TOKEN = "sweep-test-token"


@pytest.fixture
def capped_server(tmp_path):
    env = dict(os.environ, LLMWATTS_CONTROL_TOKEN=TOKEN)
    proc = subprocess.Popen(CLI + ["serve", "--power-backend", "simulated", "--port", "0", "--port-file",
                                   str(tmp_path / "port"), "--db", str(tmp_path / "server.db"), "--telemetry-hz", "50"],
                            stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while not (tmp_path / "port").exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
        time.sleep(0.2)
    yield f"127.0.0.1:{(tmp_path / 'port').read_text()}", tmp_path
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def sweep(target, tmp, caps, token, *extra):
    env = dict(os.environ, LLMWATTS_CONTROL_TOKEN=token)
    return subprocess.run(
        CLI + ["sweep", "--target", target, "--caps", caps, "--dataset", "mini", "--batch-size", "8", "--requests",
               "3", "--max-new-tokens", "24", "--ignore-eos", "--run-id", "sw", "--client-db", str(tmp / "client.db"),
               "--quiet", *extra],
        capture_output=True, text=True, timeout=300, env=env)


def test_cap_sweep_holds_power_under_each_cap_and_slows_at_low_caps(capped_server):
    """Also guards #17's silent simulation: `serve --power-backend simulated` and `sweep` on it printed
    nothing saying that every watt and joule is modelled; each now says so in one line."""
    target, tmp = capped_server
    # One batch of the same shape first, outside every run: the first batch's warm-up would otherwise land
    # in the 250 W run and, on a loaded machine, hide the slow-down the caps cause.
    pb_grpc.InferenceStub(grpc.insecure_channel(target)).Generate(pb.GenerateRequest(
        request_id="warm-up", run_id="warm-up", prompts=["warm up"] * 8, max_new_tokens=24, ignore_eos=True),
        timeout=120)
    out = sweep(target, tmp, "250,175,125", TOKEN)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["cap 250 W", "cap 175 W", "cap 125 W"]
    assert len(lines) == 4 and lines[3].startswith(f"note: {target} runs a SIMULATED GPU: its watts, joules and ")
    assert "llmwatts: power is SIMULATED on 1 GPU(s) (Simulated A100" in (tmp / "server.log").read_text()
    # The caps were reset at the end: the GPU is back at its default.
    control = pb_grpc.ControlStub(grpc.insecure_channel(target))
    assert [g.cap_w for g in control.GetPowerCaps(pb.GetPowerCapsRequest()).gpus] == [250.0]
    time.sleep(0.5)  # telemetry buffer → DB
    db = sqlite_utils.Database(tmp / "server.db")
    by_cap = {}
    for run in db.query("select * from runs where run_id like 'sw-cap%'"):
        cap_w = float(run["run_id"].removeprefix("sw-cap"))
        window = [run["begin_ns"], run["end_ns"]]
        power_w, clock, busy_clock = db.execute(
            "select max(power_mw) / 1000.0, avg(sm_clock_mhz), min(sm_clock_mhz) from telemetry "
            "where ts_ns between ? and ?", window).fetchone()
        busy_s = db.execute("select sum(end_ns - start_ns) / 1e9 from batches where batch_id in "
                            "(select batch_id from requests where run_id = ?)", [run["run_id"]]).fetchone()[0]
        by_cap[cap_w] = (power_w, clock, busy_s, busy_clock)
    assert sorted(by_cap) == [125.0, 175.0, 250.0]
    for cap_w, (power_w, *_) in by_cap.items():
        assert power_w <= cap_w + 0.5, f"power {power_w} W over the {cap_w} W cap"
    assert by_cap[250.0][1] > by_cap[175.0][1] > by_cap[125.0][1]  # the clock throttles to hold the cap
    # Lower caps run longer. The stretch the simulator applies (SimulatedGPU.pace: a step's time times
    # slowdown(f / f_max)) follows from the clock it reported while busy (the run's lowest); the wall time
    # carries it plus the CPU's own step time, which other processes on a shared box stretch at random (a
    # 1.15x wall-time bound failed at 1.117x once under load). So: the modelled stretch in full, and the
    # wall time with room for that noise.
    profile = sim_profile("a100-250w")
    stretch = {cap: profile.slowdown(row[3] / profile.f_max_mhz) for cap, row in by_cap.items()}
    assert stretch[125.0] / stretch[250.0] > 1.25, stretch  # the model: 1.29x at 125 W, batch 8 (x = 0.51)
    assert by_cap[125.0][2] > by_cap[250.0][2] * 1.05, by_cap
    kinds = [(e["kind"], e["new_cap_w"]) for e in db.query("select * from cap_events order by id")]
    assert kinds == [("set", 250.0), ("set", 175.0), ("set", 125.0), ("reset", 250.0)]


def test_sweep_with_a_wrong_token_changes_nothing(capped_server):
    target, tmp = capped_server
    out = sweep(target, tmp, "150", "not-the-token")
    assert out.returncode == 2 and "UNAUTHENTICATED" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    db = sqlite_utils.Database(tmp / "server.db")
    assert db["cap_events"].count == 0


def test_sweep_refuses_bad_caps_before_touching_the_server(tmp_path):
    out = subprocess.run(CLI + ["sweep", "--target", "127.0.0.1:1", "--caps", "250,inf", "--dataset", "mini",
                                "--requests", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--caps wants watts" in out.stderr and "Traceback" not in out.stderr


def test_a_cap_outside_the_range_is_refused_before_any_cell_runs(capped_server):
    """Guards: `sweep --caps 250,50` ran (and recorded) the 250 W cell before the server refused 50 W."""
    target, tmp = capped_server
    out = sweep(target, tmp, "250,50", TOKEN)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "llmwatts sweep: error: 50 W outside GPU 0:0's range 100–250 W: pick caps in that range"]
    assert sqlite_utils.Database(tmp / "server.db")["cap_events"].count == 0
    assert not (tmp / "client.db").exists()
