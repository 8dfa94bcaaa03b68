"""End to end: a real ``llmwatts serve`` (tiny model, CPU, simulated GPU) has its cap set (and its clocks
locked) over RPC by the ``llmwatts cap`` (``llmwatts clocks``) CLI, then is stopped. SIGTERM must restore the cap before exit; after SIGKILL the next
start must restore it from the persisted state file (``startup-restore``)."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from llmwatts.cli import main as llmwatts_main

pytestmark = pytest.mark.slow

TOKEN = "e2e-control-token"


def start_server(d, *extra):
    port_file = d / "port"
    port_file.unlink(missing_ok=True)
    env = dict(os.environ, LLMWATTS_CONTROL_TOKEN=TOKEN)
    cmd = [sys.executable, "-m", "llmwatts.cli", "serve", "--model", "tiny", "--device", "cpu",
           "--power-backend", "simulated", "--port", "0", "--port-file", str(port_file), "--db", str(d / "server.db"),
           "--telemetry-hz", "0", *extra]
    log = open(d / "server.log", "a")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    log.close()
    proc.log_path = d / "server.log"
    return proc, port_file


def wait_port(proc, port_file, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        if proc.poll() is not None:
            pytest.fail(f"server exited early:\n{proc.log_path.read_text()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("server did not start in time")


def cap_events(db):
    with sqlite3.connect(db) as conn:
        return conn.execute("select kind, gpu_uuid, old_cap_w, new_cap_w, who, reason from cap_events order by ts_ns").fetchall()


def clock_events(db):
    with sqlite3.connect(db) as conn:
        return conn.execute("select kind, old_sm_max_mhz, new_sm_max_mhz, reason from clock_events order by id").fetchall()


def cap(monkeypatch, *args, command="cap"):
    monkeypatch.setenv("LLMWATTS_CONTROL_TOKEN", TOKEN)
    return llmwatts_main([command, *args])


def test_sigterm_restores_and_sigkill_is_recovered_at_next_start(tmp_path, monkeypatch, capsys):
    term_dir, kill_dir = tmp_path / "term", tmp_path / "kill"
    term_dir.mkdir()
    kill_dir.mkdir()
    # Both servers start at once: model loading dominates the test's time.
    term_proc, term_port_file = start_server(term_dir)
    kill_proc, kill_port_file = start_server(kill_dir)
    try:
        term_port = wait_port(term_proc, term_port_file)
        kill_port = wait_port(kill_proc, kill_port_file)

        # SIGTERM: the cap set over RPC is restored before the process exits.
        target = f"127.0.0.1:{term_port}"
        assert cap(monkeypatch, "set", "--target", target, "--watts", "175", "--lease-s", "600", "--reason", "e2e") == 0
        assert "175" in capsys.readouterr().out
        monkeypatch.setenv("LLMWATTS_CONTROL_TOKEN", "wrong")
        assert llmwatts_main(["cap", "set", "--target", target, "--watts", "150"]) == 2
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert cap(monkeypatch, "set", "--target", target, "--watts", "nan") == 2
        assert "INVALID_ARGUMENT" in capsys.readouterr().err
        state_path = term_dir / "server.db.caps.json"
        assert json.loads(state_path.read_text())["gpus"][f"SIM-{socket.gethostname()}-0"]["original_mw"] == 250_000
        # Clocks go through the same machinery (issue 22): locked over RPC, unlocked by SIGTERM.
        assert cap(monkeypatch, "set", "--target", target, "--sm-min-mhz", "1005", "--reason", "e2e",
                   command="clocks") == 0
        assert "SM 1005-1005" in capsys.readouterr().out
        assert cap(monkeypatch, "set", "--target", target, "--sm-min-mhz", "1000", command="clocks") == 2
        assert "INVALID_ARGUMENT" in capsys.readouterr().err
        assert (term_dir / "server.db.clocks.json").exists()
        term_proc.send_signal(signal.SIGTERM)
        assert term_proc.wait(timeout=30) == 0, term_proc.log_path.read_text()
        assert clock_events(term_dir / "server.db") == [("set", None, 1005, "e2e"), ("restore", 1005, None, "server stopping")]
        assert not (term_dir / "server.db.clocks.json").exists()
        events = cap_events(term_dir / "server.db")
        assert [e[0] for e in events] == ["set", "restore"]
        assert events[0][2:4] == (250.0, 175.0) and "token=" in events[0][4] and events[0][5] == "e2e"
        assert events[1][2:4] == (175.0, 250.0)
        assert not state_path.exists()

        # SIGKILL: nothing runs at exit; the state file stays and the next start restores from it.
        target = f"127.0.0.1:{kill_port}"
        assert cap(monkeypatch, "set", "--target", target, "--watts", "150", "--reason", "doomed") == 0
        assert cap(monkeypatch, "set", "--target", target, "--sm-min-mhz", "810", "--sm-max-mhz", "1200",
                   command="clocks") == 0
        kill_proc.send_signal(signal.SIGKILL)
        kill_proc.wait(timeout=30)
        state_path = kill_dir / "server.db.caps.json"
        left = json.loads(state_path.read_text())["gpus"]
        assert [entry["original_mw"] for entry in left.values()] == [250_000]
        kill_proc, kill_port_file = start_server(kill_dir)
        kill_port = wait_port(kill_proc, kill_port_file)
        events = cap_events(kill_dir / "server.db")
        assert [e[0] for e in events] == ["set", "startup-restore"]
        # A simulated GPU's state dies with its process, so the restore finds it at 250 W already;
        # on NVML the old cap would be the 150 W the killed server left.
        assert events[1][1] == events[0][1] and events[1][3] == 250.0
        assert not state_path.exists()
        assert [e[0] for e in clock_events(kill_dir / "server.db")] == ["set", "startup-restore"]
        assert not (kill_dir / "server.db.clocks.json").exists()
        assert cap(monkeypatch, "get", "--target", f"127.0.0.1:{kill_port}") == 0
        assert "250" in capsys.readouterr().out
    finally:
        for proc in (term_proc, kill_proc):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def test_cap_cli_unreachable_server_is_one_line(monkeypatch, capsys):
    assert cap(monkeypatch, "get", "--target", "127.0.0.1:1", "--timeout-s", "2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("llmwatts cap: error: UNAVAILABLE: could not reach 127.0.0.1:1")
    assert "check the server is running" in err
