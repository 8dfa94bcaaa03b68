"""Each run's power timeline in report.html has enough points to read, whatever the run's length (issue 19).

The server DB here is written by the server's own telemetry sampler (``TelemetrySampler``) reading a
simulated GPU at the server's default rate (``ServerConfig.telemetry_hz``), as ``llmwatts serve`` does.
"""

import os

import sqlite_utils
from rich.console import Console

from llmwatts.analysis import ingest, report, report_plots, timeline
from llmwatts.server.config import ServerConfig
from llmwatts.server.gpu.simulated import SimulatedGPU
from llmwatts.server.store import ServerStore
from llmwatts.server.telemetry import TelemetrySampler

S = 1_000_000_000
BUSY_S = 1.2  # a demo run's length


def _short_run(tmp_path, wait, now_ns):
    """idle 1 s, BeginRun, the GPU busy (8 sequences) for ``BUSY_S`` with its cap lowered half-way, EndRun,
    idle 1 s; sampled by the server's sampler at its default rate. Returns (server DB, cap change ns)."""
    path = tmp_path / "server.db"
    store = ServerStore(path, "srv-short")
    gpu = SimulatedGPU(0, node="n")
    store.record_server({"started_ns": now_ns(), "node": "n", "model": "tiny", "dtype": "float32",
                         "engine": "eager", "power_source": "simulated", "shard_count": 1, "layout": {},
                         "simulated": 1, "versions": {}})
    store.record_gpus([{"gpu_uuid": gpu.uuid, "node": "n", "rank": 0, "gpu_index": 0, "name": gpu.name,
                        "memory_total_bytes": gpu.memory_total_bytes, "simulated": 1}])
    sampler = TelemetrySampler([gpu], store, ServerConfig().telemetry_hz)
    sampler.start()
    wait(1.0)
    store.begin_run("short", now_ns(), gpu.energy_mj() / 1000, {"batch_size": "8", "cap_w": "250"}, True)
    gpu.set_load(8)
    wait(BUSY_S / 2)
    old = gpu.power_limit_mw()
    gpu.set_power_limit_mw(old * 7 // 10)
    cap_ns = now_ns()
    store.record_cap_event({"ts_ns": cap_ns, "gpu_uuid": gpu.uuid, "node": "n", "rank": 0, "kind": "set",
                            "old_cap_w": old / 1000, "new_cap_w": old * 7 // 10 / 1000, "who": "test",
                            "reason": "cap change inside the run"})
    wait(BUSY_S / 2)
    gpu.set_load(0)
    store.end_run("short", now_ns(), gpu.energy_mj() / 1000)
    wait(1.0)
    sampler.stop()
    store.close()
    return path, cap_ns


def _report_figures(tmp_path, server_db, monkeypatch):
    """Build the report; return the matplotlib figures it drew (caught before they are closed)."""
    figures = []
    png = report_plots._png

    def keep(fig):
        figures.append(fig)
        return png(fig)

    monkeypatch.setattr(report_plots, "_png", keep)
    monkeypatch.setattr(report_plots, "ASIDE", False)  # the timelines drawn here, where _png catches them
    study = tmp_path / "study.db"
    ingest.ingest(study, [server_db], [])
    report.build_report(study, tmp_path / "out", console=Console(file=open(os.devnull, "w")))
    return study, figures


def _power_lines(figures):
    axes = [ax for fig in figures for ax in fig.axes if ax.get_xlabel().startswith("s since the run began")]
    return axes, [line for ax in axes for line in ax.lines if len(set(line.get_xdata())) > 1]  # not axvlines


def test_a_short_runs_timeline_shows_its_power_over_time(tmp_path, monkeypatch):
    """Guards the 1–2 point timelines of short runs (a demo run lasts ~1 s): the report drew them from the
    study DB's 5 s telemetry buckets, so a run's power was one straight line. Checked on the data of the
    plotted line, not by eye: a point per sampler period inside the run, the busy phase higher than idle,
    and the cap change still marked."""
    import time

    server_db, cap_ns = _short_run(tmp_path, time.sleep, time.time_ns)
    study, figures = _report_figures(tmp_path, server_db, monkeypatch)
    db = sqlite_utils.Database(study)
    begin_ns, end_ns = db.execute("SELECT begin_ns, end_ns FROM runs WHERE run_id = 'short'").fetchone()
    duration_s = (end_ns - begin_ns) / 1e9
    axes, lines = _power_lines(figures)
    assert len(axes) == 1 and len(lines) == 1
    t, power_w = lines[0].get_xdata(), lines[0].get_ydata()
    inside = [p for x, p in zip(t, power_w) if 0 <= x <= duration_s]
    before = [p for x, p in zip(t, power_w) if x < 0]
    expected = duration_s * ServerConfig().telemetry_hz
    assert len(inside) >= 0.7 * expected and len(inside) >= 8, (len(inside), expected)
    assert len(before) >= 4
    assert max(inside) > 1.3 * max(before)  # the busy phase shows as a rise, not a straight line
    cap_x = (cap_ns - begin_ns) / 1e9
    dashed = [line for line in axes[0].lines if line.get_linestyle() == "--"]
    assert [list(line.get_xdata()) for line in dashed] == [[cap_x, cap_x]]
    assert "ms bin" in axes[0].get_xlabel()  # the method is stated on the plot

    # The data behind the plot: bins of one width chosen from the run's duration, every sample counted.
    series = timeline.series(db, *db.execute("SELECT server_id FROM runs").fetchone(), "short",
                             *db.execute("SELECT gpu_uuid, gpu_key FROM telemetry_gpus").fetchone(), begin_ns, end_ns)
    assert series.t_s == list(t) and series.width_s * 1e9 == timeline.width_ns(begin_ns, end_ns)
    lo, hi = timeline.span(begin_ns, end_ns)
    raw = sqlite_utils.Database(server_db).execute(
        "SELECT count(*) FROM telemetry WHERE ts_ns BETWEEN ? AND ?", [lo, hi]).fetchone()[0]
    assert db.execute("SELECT sum(power_n) FROM run_power_points").fetchone()[0] == raw


def test_a_long_run_reads_the_buckets_with_a_bounded_number_of_points(tmp_path):
    """Guards the scale case: a long run's timeline stays within ``timeline.POINTS`` points from the 5 s
    buckets, and ingest keeps no per-run bins for it (nothing per sample in the study DB)."""
    path = tmp_path / "server.db"
    store = ServerStore(path, "srv-long")
    gpu = SimulatedGPU(0, node="n")
    store.record_server({"started_ns": 0, "node": "n", "model": "tiny", "dtype": "float32", "engine": "eager",
                         "power_source": "simulated", "shard_count": 1, "layout": {}, "simulated": 1,
                         "versions": {}})
    store.record_gpus([{"gpu_uuid": gpu.uuid, "node": "n", "rank": 0, "gpu_index": 0, "name": gpu.name,
                        "memory_total_bytes": gpu.memory_total_bytes, "simulated": 1}])
    t0 = 1_700_000_000 * S
    store.begin_run("long", t0, 0.0, {}, True)
    store.add_telemetry([{"ts_ns": t0 + k * S, "gpu_uuid": gpu.uuid, "node": "n", "rank": 0,
                          "power_mw": 100_000 + 1000 * (k % 60), "energy_mj": 100_000 * k, "simulated": 1}
                         for k in range(-2, 3600)])
    store.end_run("long", t0 + 3595 * S, 360.0)
    store.close()
    study = tmp_path / "study.db"
    ingest.ingest(study, [path], [])
    db = sqlite_utils.Database(study)
    assert timeline.width_ns(t0, t0 + 3595 * S) is None
    assert db.execute("SELECT count(*) FROM run_power_points").fetchone()[0] == 0
    key = db.execute("SELECT gpu_key FROM telemetry_gpus").fetchone()[0]
    series = timeline.series(db, "srv-long", "long", gpu.uuid, key, t0, t0 + 3595 * S)
    assert timeline.POINTS // 2 <= len(series.t_s) <= timeline.POINTS
    assert series.width_s >= 5


def test_width_is_chosen_from_the_runs_duration():
    """A 1 s run gets 50 ms bins or finer; every width keeps a run's timeline within ``POINTS`` bins."""
    assert timeline.width_ns(0, S) <= 50_000_000
    for seconds in (0.1, 1, 2, 10, 60, 200):
        width = timeline.width_ns(0, int(seconds * S))
        lo, hi = timeline.span(0, int(seconds * S))
        assert width is not None and (hi - lo) // width + 1 <= timeline.POINTS
    assert timeline.width_ns(0, 600 * S) is None


def test_timelines_drawn_aside_are_the_same_report(tmp_path, small, monkeypatch):
    """Guards the forked child that draws the timelines (report_plots.TimelinesAside) against giving another
    report.html than drawing them in this process, and against being skipped silently (a PNG comes back
    from the child, and the child is reaped)."""
    import hashlib

    study = tmp_path / "study.db"
    ingest.ingest(study, [small.server_db], [small.client_db])
    forks = []
    fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or fork())
    report.build_report(study, tmp_path / "aside", console=Console(file=open(os.devnull, "w")))
    assert forks == [1]
    monkeypatch.setattr(report_plots, "ASIDE", False)
    report.build_report(study, tmp_path / "here", console=Console(file=open(os.devnull, "w")))
    html = [hashlib.sha256((tmp_path / d / "report.html").read_bytes()).hexdigest() for d in ("aside", "here")]
    assert html[0] == html[1] and len(forks) == 1
    assert 'alt="power timelines"' in (tmp_path / "aside" / "report.html").read_text()
