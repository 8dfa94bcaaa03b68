"""``llmwatts study``: the acceptance test of issue 19 and the plan's checks.

A real server (tiny, CPU, simulated GPU) in its own process; the study in another, its loads in a third;
records reach the study DB over ``Control.ExportRecords`` only (the study is never told the server DB's
path). The study is killed mid-cell (SIGKILL to its process group: the runner and its load) and rerun.
"""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llmwatts.errors import InvalidArgument
from llmwatts.study.plan import check_plan, load_plan

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "llmwatts.cli"]
TOKEN = "study-test-token"
PLAN = """
[study]
name = "accept"
warmup_requests = 1
idle_s = 1
sla_p95_ms = 600000

[[servers]]
target = "{target}"

[load]
dataset = "mini"
requests = 3
max_new_tokens = 4
ignore_eos = true

[grid]
cap_w = [250, 200]
batch_size = [1, 2]
rate_rps = [8.0, 16.0]
"""


@pytest.fixture
def served(tmp_path):
    env = dict(os.environ, LLMWATTS_CONTROL_TOKEN=TOKEN)
    server_dir = tmp_path / "gpu-node"
    server_dir.mkdir()
    port_file = server_dir / "port"
    log = open(server_dir / "server.log", "w")
    proc = subprocess.Popen(CLI + ["serve", "--model", "tiny", "--device", "cpu", "--power-backend", "simulated",
                                   "--port", "0", "--port-file", str(port_file), "--db", str(server_dir / "server.db"),
                                   "--telemetry-hz", "20"], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        assert proc.poll() is None and time.monotonic() < deadline, (server_dir / "server.log").read_text()
        time.sleep(0.2)
    yield f"127.0.0.1:{port_file.read_text().strip()}", env
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def _cells(db: Path, status: str | None = None) -> list[tuple]:
    if not db.exists():
        return []
    conn = sqlite3.connect(str(db), timeout=10)
    try:
        if not conn.execute("select 1 from sqlite_master where name = 'study_cells'").fetchone():
            return []
        sql = "select cell_key, attempt, run_id, status from study_cells"
        return conn.execute(sql + (" where status = ?" if status else ""), [status] if status else []).fetchall()
    finally:
        conn.close()


def _open_runs(server_db: Path) -> list[str]:
    """Runs begun and not ended on the server (read from its own DB, which the study never sees)."""
    conn = sqlite3.connect(f"file:{server_db}?mode=ro", uri=True, timeout=10)
    try:
        return [r[0] for r in conn.execute("select run_id from runs where end_ns is null")]
    finally:
        conn.close()


def _independent_sla(db: Path, run_ids: list[str], bound_ms: float) -> str | None:
    """The lowest-J/token run with client latency p95 <= bound: J from the run's energy markers over its
    ok output tokens, p95 with numpy from the raw client rows."""
    conn = sqlite3.connect(str(db))
    best = None
    for run_id in run_ids:
        begin_j, end_j = conn.execute("select begin_energy_j, end_energy_j from runs where run_id = ?",
                                      [run_id]).fetchone()
        rows = conn.execute("select latency_ms, output_tokens from client_requests where run_id = ? and status = 'ok'",
                            [run_id]).fetchall()
        p95 = float(np.percentile([r[0] for r in rows], 95))
        j_per_token = (end_j - begin_j) / sum(r[1] for r in rows)
        if p95 <= bound_ms and (best is None or j_per_token < best[0]):
            best = (j_per_token, run_id)
    conn.close()
    return best and best[1]


def test_study_killed_mid_cell_resumes_without_repeating_cells(served, tmp_path):
    """Guards resumability: after a SIGKILL mid-cell the rerun redoes only the interrupted cell (a new
    attempt), keeps every finished cell's first run, and ends with exactly the plan's cells, each once.
    Also guards the killed attempt's run left open on the server for good (the study could not end it
    without the load's run secret): after the rerun no run is open, so repeated resumes never use up the
    server's 16 open runs per client."""
    target, env = served
    server_db = tmp_path / "gpu-node" / "server.db"
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(PLAN.format(target=target))
    db = tmp_path / "study.db"
    argv = CLI + ["study", str(plan_path), "--study-db", str(db), "--out", str(tmp_path / "report"), "--no-progress"]

    first = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not (len(_cells(db, "done")) >= 2 and _cells(db, "running") and _open_runs(server_db)):
        assert first.poll() is None, first.stdout.read().decode()
        assert time.monotonic() < deadline, "the study never reached its third cell's run"
        time.sleep(0.1)
    time.sleep(0.05)  # past BeginRun's answer: the load holds the run (and its secret) when it dies
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    before = {key: run_id for key, _, run_id, status in _cells(db) if status == "done"}
    interrupted = {key for key, _, _, status in _cells(db) if status == "running"}
    assert len(interrupted) == 1

    assert _open_runs(server_db)  # the killed load's run (or its warm-up's)
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout + second.stderr
    assert _open_runs(server_db) == []
    assert f"{len(before)} already done" in second.stdout and "1 interrupted attempts closed" in second.stdout
    assert f"note: {target} runs a SIMULATED GPU" in second.stdout  # #17: joules on a simulated GPU are said so

    done = {key: run_id for key, _, run_id, status in _cells(db, "done")}
    plan = load_plan(plan_path)
    expected = {f"{c.key},server={target}" for c in plan.cells()}
    assert set(done) == expected  # the uninterrupted run's cell set, each cell once
    assert len(_cells(db, "done")) == len(expected) == 8
    assert all(done[k] == run_id for k, run_id in before.items())  # no finished cell was run again
    (key,) = interrupted
    assert [a for k, a, _, s in _cells(db) if k == key] == [1, 2] and done[key].endswith("-a2")

    conn = sqlite3.connect(str(db))
    runs = {r[0]: json.loads(r[1]) for r in conn.execute("select run_id, labels from runs")}
    ok = dict(conn.execute("select run_id, count(*) from client_requests where status = 'ok' group by run_id"))
    idle = conn.execute("select count(*), min(power_mw) from idle_power").fetchone()
    conn.close()
    assert set(runs) == set(done.values())  # warm-ups, idle windows and the abandoned attempt are gone
    assert all(ok[r] == 3 for r in runs)
    assert {(lab["cap_w"], lab["batch_size"], lab["rate_rps"]) for lab in runs.values()} == {
        (c, b, r) for c in ("250", "200") for b in ("1", "2") for r in ("8", "16")}
    assert idle[0] >= 1 and idle[1] > 0

    from llmwatts.analysis.tradeoffs import choose_sla

    assert second.stdout.count("SLA:") == 1
    conn = sqlite3.connect(str(db))
    p95s = sorted(float(np.percentile([r[0] for r in conn.execute(
        "select latency_ms from client_requests where run_id = ? and status = 'ok'", [run_id])], 95)) for run_id in runs)
    conn.close()
    for bound in (1e9, p95s[len(p95s) // 2]):  # every run meets it; about half do
        choice = choose_sla(db, latency_p95_ms_max=bound)
        assert (choice.row or {}).get("run_id") == _independent_sla(db, list(runs), bound)
    assert (tmp_path / "report" / "report.html").exists()


def test_dry_run_prints_the_grid_and_contacts_nothing(tmp_path):
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(PLAN.format(target="127.0.0.1:1"))
    out = subprocess.run(CLI + ["study", str(plan_path), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "8 cells" in out.stdout and "estimated time" in out.stdout


def test_plan_mistakes_are_one_readable_line(tmp_path):
    base = {"servers": [{"target": "h:1"}], "load": {"requests": 2, "dataset": "mini"}}
    for bad, words in [({"grid": {"colour": [1]}}, "not a dimension"),
                       ({"grid": {"cap_w": [-5]}}, "cap_w wants watts"),
                       ({"grid": {"users": [1], "rate_rps": [1.0]}}, "pick one"),
                       ({"load": {"requests": 2, "bogus": 1}}, "unknown setting"),
                       ({"servers": [{"target": "nohost"}]}, "HOST:PORT")]:
        with pytest.raises(InvalidArgument, match=words):
            check_plan({**base, **bad})
    plan_path = tmp_path / "p.toml"
    plan_path.write_text("[study\n")
    out = subprocess.run(CLI + ["study", str(plan_path), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not valid TOML" in out.stderr and "Traceback" not in out.stderr


def test_paper_preset_fills_the_papers_grid(tmp_path):
    plan_path = tmp_path / "p.toml"
    plan_path.write_text('[[servers]]\ntarget = "h:1"\n[grid]\ncap_w = [250, 175]\n')
    plan = load_plan(plan_path, preset="paper")
    assert plan.grid == {"dataset": ["alpaca", "gsm8k"], "batch_size": [64], "cap_w": [250, 175]}
    config = plan.load_config(plan.cells()[0], target="h:1")
    assert (config.requests * config.batch_size, config.num_prompts, config.max_new_tokens) == (4096, 4096, 256)


CLOCK_PLAN = """
[study]
name = "clocks"
idle_s = 0
sla_p95_ms = {sla}

[[servers]]
target = "{target}"

[load]
dataset = "mini"
requests = 2
max_new_tokens = 2
ignore_eos = true

[grid]
sm_clock_mhz = [1410, 1005, 600]
batch_size = [1, 2]
"""


def test_a_clock_sweep_locks_each_cell_resets_after_and_the_report_picks_a_clock(served, tmp_path):
    """Guards issue 22's study acceptance (3 clocks x 2 batch sizes on the simulated A100): each cell runs
    under its locked SM clock (label sm_clock_mhz, clock events on the server), the lock is reset after the
    study, report.html plots J/token and latency p95 against the clock, and its SLA choice names the clock
    of the run an independent computation from the raw study DB picks. On main before this, sm_clock_mhz
    was not a grid dimension (the plan was refused)."""
    from llmwatts.clock_client import ClockClient
    from llmwatts.study.runner import run_study

    target, env = served
    plan_path = tmp_path / "plan.toml"
    plan_path.write_text(CLOCK_PLAN.format(target=target, sla=1e9))
    db = tmp_path / "study.db"
    result = run_study(load_plan(plan_path), db, out=tmp_path / "report", token=TOKEN, show_progress=False)
    assert len(result.done) == 6

    conn = sqlite3.connect(str(db))
    runs = {r[0]: json.loads(r[1]) for r in conn.execute("select run_id, labels from runs")}
    conn.close()
    from llmwatts.analysis.pull import mirror_path

    mirror = sqlite3.connect(str(mirror_path(db, target)))  # the server's records, pulled over RPC
    locks = mirror.execute("select count(*) from clock_events").fetchone()[0]
    mirror.close()
    assert {(lab["sm_clock_mhz"], lab["batch_size"]) for lab in runs.values()} == {
        (c, b) for c in ("1410", "1005", "600") for b in ("1", "2")}
    assert locks >= 12  # a lock and a reset per cell
    with ClockClient(target, token=TOKEN) as clocks:
        assert all(g.locked_sm_min_mhz == 0 for g in clocks.get().gpus)  # reset after the cell

    html = (tmp_path / "report" / "report.html").read_text()
    assert 'alt="energy per output token vs locked SM clock"' in html
    assert 'alt="latency p95 vs locked SM clock"' in html
    best = _independent_sla(db, list(runs), 1e9)
    label = runs[best]
    (choice,) = re.findall(r'class="choice"><b>SLA choice[^<]*</b> ([^<]*)', html)
    assert choice.startswith(f"batch {label['batch_size']}, ") and f", {label['sm_clock_mhz']} MHz SM clock:" in choice
    assert "lever that won: " + ("neither" if label["sm_clock_mhz"] == "1410" else "locked SM clock") in choice


def test_weights_and_clocks_are_checked_dimensions(tmp_path):
    """Guards the plan's checks of the server-side dimensions weights (fp16/fp8) and sm_clock_mhz."""
    base = {"servers": [{"target": "h:1"}], "load": {"requests": 2, "dataset": "mini"}}
    for bad, words in [({"grid": {"weights": ["fp4"]}}, "weights must be among fp16, fp8"),
                       ({"grid": {"sm_clock_mhz": [1400.5]}}, "whole MHz"),
                       ({"grid": {"sm_clock_mhz": [-1]}}, "whole MHz")]:
        with pytest.raises(InvalidArgument, match=words):
            check_plan({**base, **bad})
    plan = check_plan({**base, "grid": {"weights": ["fp16", "fp8"], "sm_clock_mhz": [1410]}})
    assert [c.labels()["weights"] for c in plan.cells()] == ["fp16", "fp8"]


def test_a_cell_whose_weights_no_server_runs_is_refused_in_one_line():
    """Guards the weights dimension: a server started with other weights than the cell's never runs it."""
    from llmwatts.study.runner import tasks_of
    from llmwatts.v1 import llmwatts_pb2 as pb

    base = {"servers": [{"target": "h:1"}], "load": {"requests": 2, "dataset": "mini"}}
    servers = {"h:1": pb.ServerInfo(engine="fast", dtype="float16"), "h:2": pb.ServerInfo(engine="fast",
                                                                                        dtype="float16+fp8-weights")}
    plan = check_plan({**base, "grid": {"weights": ["fp16", "fp8"]}})
    assert [(t.cell.get("weights"), t.target) for t in tasks_of(plan, servers)] == [("fp16", "h:1"), ("fp8", "h:2")]
    with pytest.raises(InvalidArgument, match=r"runs --weights fp8: the servers run \['fp16'\]"):
        tasks_of(plan, {"h:1": servers["h:1"]})


def test_the_kv_cache_dimension_picks_the_servers_started_with_it():
    """Guards the kv_cache dimension: a cell runs only on servers whose dtype names its KV cache (fp8
    weights or not), a value no server runs is refused in one line, and the plan checks the values."""
    from llmwatts.study.runner import tasks_of
    from llmwatts.v1 import llmwatts_pb2 as pb

    base = {"servers": [{"target": "h:1"}], "load": {"requests": 2, "dataset": "mini"}}
    with pytest.raises(InvalidArgument, match="kv_cache must be among fp16, fp8"):
        check_plan({**base, "grid": {"kv_cache": ["int4"]}})
    servers = {"h:1": pb.ServerInfo(engine="fast", dtype="float16"),
               "h:2": pb.ServerInfo(engine="fast", dtype="float16+fp8-kv"),
               "h:3": pb.ServerInfo(engine="fast", dtype="float16+fp8-weights+fp8-kv")}
    plan = check_plan({**base, "grid": {"weights": ["fp16", "fp8"], "kv_cache": ["fp16", "fp8"]}})
    assert [c.labels()["kv_cache"] for c in plan.cells()] == ["fp16", "fp8", "fp16", "fp8"]
    assert [(t.cell.get("weights"), t.cell.get("kv_cache"), t.target) for t in tasks_of(plan, {**servers, "h:4": pb.ServerInfo(
        engine="fast", dtype="float16+fp8-weights")})] == [
        ("fp16", "fp16", "h:1"), ("fp16", "fp8", "h:2"), ("fp8", "fp16", "h:4"), ("fp8", "fp8", "h:3")]
    with pytest.raises(InvalidArgument, match=r"^no matching server runs --kv-cache fp8: they run \['fp16'\]; start one "
                                              r"with `llmwatts serve --kv-cache fp8`$"):
        tasks_of(check_plan({**base, "grid": {"kv_cache": ["fp8"]}}), {"h:1": servers["h:1"]})


def test_the_sla_choice_weighs_both_levers_and_names_the_winner():
    """Guards issue 22's 'which lever won': over a cap x clock grid the choice is the lowest J/token
    within the SLA whichever lever got it there, and the message names that lever."""
    from llmwatts.analysis import report_data as data

    def runs(best_cap_w, best_clock_mhz):
        rows = []
        for cap_w in (250, 175):
            for clock in (1410, 1005):
                j = 1.0 - 0.3 * (cap_w == best_cap_w and clock == best_clock_mhz)
                rows.append({"run_id": f"c{cap_w}-f{clock}", "batch_size": 4, "cap_w": cap_w, "sm_clock_mhz": clock,
                             "j_per_token": j, "latency_p95_ms": 100.0})
        return data.groups_of(rows)[0]

    for cap_w, clock, lever in [(175, 1410, "power cap"), (250, 1005, "locked SM clock"), (175, 1005, "both"),
                                (250, 1410, "neither")]:
        choice = data.choose(runs(cap_w, clock), 500)
        assert (choice.best["cap_w"], choice.best["sm_clock_mhz"], choice.lever) == (cap_w, clock, lever)
        assert f"lever that won: {lever}" in choice.message
