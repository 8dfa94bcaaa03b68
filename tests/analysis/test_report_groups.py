"""report.html's workload groups, open-loop settings and steady-state shading (issue 19 loose ends)."""

import json

import matplotlib.axes
import sqlite_utils
from analysis_builders import build_sweep
from rich.console import Console

from llmwatts.analysis import ingest, metrics, report, report_plots, views
from llmwatts.analysis import report_data as data

SWEEP = [(250, 1, 1.0, 100.0), (250, 4, 0.5, 200.0), (175, 1, 0.8, 150.0), (175, 4, 0.4, 300.0)]


def _study(tmp_path, labels_of):
    """The sweep's study DB (one user per run, its 4 requests one after another) with each run's BeginRun labels extended by ``labels_of(i)`` (as the load
    writes them: strings)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    built = build_sweep(tmp_path, SWEEP)
    study = tmp_path / "study.db"
    ingest.ingest(study, [built.server_db], [built.client_db])
    db = sqlite_utils.Database(study)
    db.execute("UPDATE requests SET done_ns = received_ns + 200000000")  # each request 0.2 s on the server
    for i, run_id in enumerate(built.run_ids):
        labels = json.loads(db.execute("SELECT labels FROM runs WHERE run_id = ?", [run_id]).fetchone()[0])
        db.execute("UPDATE runs SET labels = ? WHERE run_id = ?", [json.dumps({**labels, **labels_of(i)}), run_id])
    db.conn.commit()
    return study, built.run_ids


def _groups(study):
    db = sqlite_utils.Database(study)
    return data.groups_of(data.with_labels(db, metrics.all_run_metrics(study)))


def test_runs_of_different_sampling_or_output_length_are_different_workloads(tmp_path):
    """Guards the lumping of greedy and sampled runs (and of different temperatures or max_new_tokens)
    into one workload group, one series and one SLA choice: the grouping keyed on a label no load writes
    ('greedy') instead of the load's 'sampling' label."""
    sampling = ["greedy", "greedy", "temperature=0.8,top_p=0.95", "temperature=0.6,top_p=0.95"]
    study, run_ids = _study(tmp_path, lambda i: {"sampling": sampling[i], "max_new_tokens": "4"})
    groups = _groups(study)
    assert sorted(sorted(r["run_id"] for r in g.runs) for g in groups) == sorted(
        [sorted(run_ids[:2]), [run_ids[2]], [run_ids[3]]])
    assert {g.workload["sampling"] for g in groups} == set(sampling)
    assert all("sampling" in g.name and "max new tokens 4" in g.name for g in groups)

    study2, _ = _study(tmp_path / "b", lambda i: {"sampling": "greedy", "max_new_tokens": str(4 + 4 * (i % 2))})
    assert sorted(len(g.runs) for g in _groups(study2)) == [2, 2]


def test_open_loop_runs_are_set_by_rate_and_arrival_not_users(tmp_path):
    """Guards open-loop runs shown as '64 users' (the load's max concurrency, labelled users) in the
    report's tables and titles as if they were closed-loop users: they are set by rate and arrival."""
    study, _ = _study(tmp_path, lambda i: {"rate_rps": "8", "arrival": "poisson", "max_concurrency": "64",
                                           "users": "64"})
    (group,) = _groups(study)
    assert all(r["users"] is None for r in group.runs)
    assert all(data.settings_text(r).startswith(f"batch {r['batch_size']}, 8 req/s poisson") for r in group.runs)
    assert all("users" not in data.settings_text(r) for r in group.runs)
    result = report.build_report(study, tmp_path / "out", sla_p95_ms=1000, console=Console(file=open("/dev/null", "w")))
    page = result.report_html.read_text()
    assert "closed-loop users" not in page and "arrival process" in page and "64 users" not in page


def test_the_power_timeline_shades_each_runs_steady_state(tmp_path, monkeypatch):
    """Guards steady-state shading that never appeared: the timeline read steady_begin_ns from the run rows,
    which run_metrics never carries, so no run was ever shaded (whatever its size)."""
    study, run_ids = _study(tmp_path, lambda i: {})
    spans = []
    original = matplotlib.axes.Axes.axvspan

    def spy(self, *args, **kw):
        spans.append(kw.get("label"))
        return original(self, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "axvspan", spy)
    monkeypatch.setattr(report_plots, "ASIDE", False)  # the timelines drawn here, where the spy sees them
    db = sqlite_utils.Database(study)
    views.ensure_fresh(db)
    steady = dict(db.execute("SELECT run_id, end_ns - begin_ns FROM run_steady").fetchall())
    assert set(steady) == set(run_ids) and all(v > 0 for v in steady.values())
    result = report.build_report(study, tmp_path / "out", console=Console(file=open("/dev/null", "w")))
    assert spans.count("steady state") == len(run_ids)
    assert f"Steady state shaded in {len(run_ids)} of {len(run_ids)} runs" in result.report_html.read_text()


def test_an_open_loop_load_is_labelled_by_rate_not_users():
    """Guards the source of '64 users' on open-loop runs: the load labelled (and recorded in client_runs.users)
    its max concurrency as closed-loop users."""
    from llmwatts.loadgen.config import LoadConfig

    open_loop = LoadConfig(target="h:1", rate_rps=8.0, max_concurrency=16)
    labels = open_loop.run_labels("mini")
    assert "users" not in labels and open_loop.closed_loop_users() is None
    assert (labels["rate_rps"], labels["arrival"], labels["max_concurrency"]) == ("8", "poisson", "16")
    closed = LoadConfig(target="h:1", users=3)
    assert closed.run_labels("mini")["users"] == "3" and closed.closed_loop_users() == 3
