"""What a new user tripped on in the first report (issue 19's list), each checked on the report a study
produces: the matplotlib figures it drew (caught before they are closed), report.html's text, the data.

The study: two workloads (gsm8k: a 2 caps × 2 batch sizes sweep with one setting run twice; alpaca: one
batch size at 2 caps), all on a simulated GPU of a server with no CUDA device (a CPU box).
"""

import csv
import html
import os
import re
import textwrap

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
import sqlite_utils
from analysis_builders import build_sweep
from rich.console import Console

from llmwatts.analysis import ingest, metrics, report, report_plots
from llmwatts.analysis import report_data as data

SLA_MS = 250.0
POINTS = [(700, 1, 4.0, 50.0), (700, 8, 1.0, 120.0), (300, 8, 0.8, 200.0), (300, 1, 3.0, 60.0),
          (700, 8, 1.2, 130.0),  # the (700 W, batch 8) setting run twice
          (700, 1, 5.0, 40.0), (300, 1, 4.5, 45.0)]
DATASETS = ["gsm8k"] * 5 + ["alpaca"] * 2


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tripped")
    sweep = build_sweep(tmp, POINTS, simulated=True, datasets=DATASETS)
    study = tmp / "study.db"
    ingest.ingest(study, [sweep.server_db], [sweep.client_db])
    figures = []
    png = report_plots._png
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report_plots, "_png", lambda fig: figures.append(fig) or png(fig))
        mp.setattr(report_plots, "ASIDE", False)  # the timelines drawn here, where _png catches them
        result = report.build_report(study, tmp / "out", sla_p95_ms=SLA_MS, console=Console(file=open(os.devnull, "w")))
    page = result.report_html.read_text()
    with open(result.runs_csv, newline="") as f:
        rows = [{k: (v if v != "" else None) for k, v in r.items()} for r in csv.DictReader(f)]
    return {"sweep": sweep, "study": study, "figures": figures, "html": page, "text": _text(page), "rows": rows}


def _text(page: str) -> str:
    page = re.sub(r"<script>.*?</script>|<style>.*?</style>", " ", page, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


def _axes(built, xlabel_starts: str):
    return [ax for fig in built["figures"] for ax in fig.axes if ax.get_xlabel().startswith(xlabel_starts)]


def _plotted_axes(built):
    return [ax for fig in built["figures"] for ax in fig.axes if ax.axison]


def test_batch_axes_are_ticked_with_the_batch_sizes_run(built):
    """Guards batch-size axes ticked 1.0, 2.0, 4.0 (0.50, 1.00 with one size): a categorical axis ticked with
    the integers run, and no batch-size plot for a workload that ran one batch size."""
    axes = _axes(built, "batch size")
    assert len(axes) == 2  # J/token and throughput for gsm8k; alpaca ran batch 1 only
    for ax in axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "8"]


def test_every_y_axis_starts_at_zero(built):
    """Guards y-axes that started at the data's minimum (a 3% difference drawn as a cliff)."""
    axes = _plotted_axes(built)
    assert len(axes) >= 10
    assert [(ax.get_title(), ax.get_ylim()[0]) for ax in axes if ax.get_ylim()[0] != 0] == []


def test_timeline_titles_name_the_runs_settings_not_a_server_hash(built):
    """Guards the timeline titled with the server's id (a hash) over one squeezed server lifetime: one
    plot per run, titled by its workload difference and settings."""
    axes = _axes(built, "s since the run began")
    assert len(axes) == len(POINTS)
    titles = [ax.get_title() for ax in axes]
    server_id = built["sweep"].server_id
    assert all(server_id not in ax.get_title() for ax in _plotted_axes(built))
    assert "dataset gsm8k, batch 8, 1 user, 700 W cap" in titles
    assert "dataset alpaca, batch 1, 1 user, 300 W cap" in titles


def test_each_run_is_its_own_plot_with_its_boundaries_drawn(built):
    """Guards run shadings of one colour with no boundaries on a shared timeline: each run has its own
    axes with black lines at BeginRun (0) and EndRun (its duration), and its power drawn between them."""
    db = sqlite_utils.Database(built["study"])
    durations = [(e - b) / 1e9 for b, e in db.execute("SELECT begin_ns, end_ns FROM runs ORDER BY begin_ns")]
    for ax, duration_s in zip(_axes(built, "s since the run began"), durations):
        black = sorted(line.get_xdata()[0] for line in ax.lines if line.get_color() == "black")
        assert black == pytest.approx([0, duration_s])
        power = [line for line in ax.lines if line.get_gid() == "power"]
        assert len(power) == 1 and len(power[0].get_xdata()) >= 4


def _legend_artists(ax):
    handles, labels = ax.get_legend_handles_labels()
    return list(zip(handles, labels))


def test_no_legend_entry_without_points(built):
    """Guards a legend entry whose points are not there: the Pareto plot's "runs" scatter held only the
    runs on the front, every one hidden under the front's markers; a series with no points."""
    for ax in _plotted_axes(built):
        for handle, label in _legend_artists(ax):
            if hasattr(handle, "get_offsets"):
                assert len(handle.get_offsets()) > 0, (ax.get_title(), label)
            elif hasattr(handle, "get_xdata") and not ax.get_xlabel().startswith("s since"):
                assert len(handle.get_xdata()) > 0, (ax.get_title(), label)
    for ax in _axes(built, "latency p95"):
        front = {tuple(p) for line in ax.lines for p in line.get_xydata()}
        for handle, label in _legend_artists(ax):
            if hasattr(handle, "get_offsets"):  # the other runs: none of them on the front
                assert not front & {tuple(p) for p in handle.get_offsets()}, label


def test_legends_sit_outside_the_data(built):
    """Guards legends drawn over the Pareto line (and over other series): every legend of a per-group plot
    lies outside its axes; the Pareto numbers lie inside the axes (one was cut by the title)."""
    checked = 0
    for fig in built["figures"]:
        canvas = FigureCanvasAgg(fig)  # the report closed it (its canvas went with it)
        canvas.draw()
        renderer = canvas.get_renderer()
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is None or ax.get_xlabel().startswith("s since"):
                continue
            assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer)), ax.get_title()
            checked += 1
            box = ax.get_window_extent(renderer)
            for note in ax.texts:
                extent = note.get_window_extent(renderer)
                assert box.y0 <= extent.y0 and extent.y1 <= box.y1, (ax.get_title(), note.get_text())
    assert checked >= 6


def test_repeats_are_points_not_joined_by_a_vertical_line(built):
    """Guards two runs at the same batch size and cap joined by a vertical line: a series goes through the
    mean of repeats (x strictly increasing) and each repeat is its own point."""
    repeated = 0
    for ax in _axes(built, "batch size") + _axes(built, "power cap"):
        for line in ax.lines:
            x = list(line.get_xdata())
            assert x == sorted(set(x)), (ax.get_title(), line.get_label())
        repeated += sum(len(c.get_offsets()) == 2 for c in ax.collections)
    assert repeated >= 2  # the 700 W batch 8 pair, on the J/token-vs-batch and the J/token-vs-cap plots


def test_a_cap_sweep_gets_a_j_per_token_vs_cap_plot(built):
    """Guards the missing J/token-vs-cap plot for a cap sweep: one per workload that ran two caps."""
    axes = _axes(built, "power cap (W)")
    assert len(axes) == 2
    assert all(ax.get_ylabel().startswith("energy per output token (J)") for ax in axes)
    assert all([t.get_text() for t in ax.get_xticklabels()] == ["300", "700"] for ax in axes)
    assert built["text"].count("energy per output token vs power cap") == 2


def test_the_tables_show_the_dataset(built):
    """Guards a dataset column found only in runs.csv: each of report.html's tables shows it."""
    heads = re.findall(r"<thead><tr>(.*?)</tr></thead>", built["html"], flags=re.S)
    tables = [h for h in heads if "<th>run</th>" in h and "<th>#</th>" not in h]  # not the Pareto tables
    assert len(tables) == 2 * len(data.TABLES)
    assert all("<th>dataset</th>" in h for h in tables)
    assert '<td class="t">alpaca</td>' in built["html"] and '<td class="t">gsm8k</td>' in built["html"]


def test_all_simulated_says_all_and_mixed_names_the_column_that_says_which():
    """Guards "Some runs use SIMULATED power" when every run did, and a mixed study's note pointing at
    column labels that were never there."""
    runs = [{"run_id": "a", "simulated": 1}, {"run_id": "b", "simulated": 1}]
    assert data.simulated_note(runs, cpu_only=False).startswith("All runs use SIMULATED power")
    mixed = data.simulated_note([runs[0], {"run_id": "b", "simulated": 0}], cpu_only=False)
    assert mixed.startswith("1 of 2 runs use SIMULATED power (a)") and "power source column" in mixed


def test_mixed_power_sources_show_a_power_source_column(tmp_path):
    """Guards the mixed case's tables: each says which runs are simulated (the note points there)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    simulated = build_sweep(tmp_path / "a", POINTS[:2], simulated=True)
    measured = build_sweep(tmp_path / "b", POINTS[:2], simulated=False)
    db = sqlite_utils.Database(measured.server_db)
    db.execute("UPDATE servers SET server_id = 'srv-real'")
    for table in ("gpus", "runs", "telemetry", "batches", "requests", "cap_events", "batch_gpu_energy"):
        if db[table].exists() and "server_id" in db[table].columns_dict:
            db.execute(f"UPDATE [{table}] SET server_id = 'srv-real'")
    db.execute("UPDATE runs SET run_id = run_id || '-real'")
    db.execute("UPDATE requests SET run_id = run_id || '-real'")
    db.conn.commit()
    study = tmp_path / "study.db"
    ingest.ingest(study, [simulated.server_db, measured.server_db], [simulated.client_db])
    result = report.build_report(study, tmp_path / "out", console=Console(file=open(os.devnull, "w")))
    page = result.report_html.read_text()
    assert "2 of 4 runs use SIMULATED power" in page
    assert page.count("<th>power source</th>") >= len(data.TABLES)
    assert '<td class="t">simulated</td>' in page and '<td class="t">nvml</td>' in page


def test_sm_and_memory_percent_are_labelled_simulated(built):
    """Guards SM % and memory-controller % shown without the [simulated] mark that power carried."""
    for name in ("SM busy, mean (%)", "memory controller busy, mean (%)", "mean power, all GPUs (W)",
                 "energy per output token (J)"):
        assert f"<th>{name} [simulated]</th>" in built["html"], name
        assert f"<th>{name}</th>" not in built["html"], name
    assert all("[simulated]" in ax.get_ylabel() for ax in _axes(built, "s since the run began"))


def test_definitions_are_where_the_page_says(built):
    """Guards "definitions in runs.csv" where there were none: the page sends readers to docs/analysis.md,
    whose column table defines every column the tables show."""
    assert "definitions in runs.csv" not in built["text"].lower()
    assert "Definitions of every number: docs/analysis.md" in built["text"]
    doc = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "analysis.md")).read()
    doc = re.sub(r"\{([^}]*)\}", lambda m: "{" + m.group(1).replace(",", ";") + "}", doc)
    defined = set()
    for cell in re.findall(r"^\| *([^|]+?) *\|", doc, flags=re.M):
        for part in (p.strip().strip("`") for p in cell.split(",")):
            braces = re.match(r"(.*)\{([^}]*)\}(.*)", part)
            defined |= {braces[1] + x + braces[3] for x in braces[2].split(";")} if braces else {part}
    shown = {c for cols in data.TABLES.values() for c in cols}
    assert shown - defined == set()


def test_a_cpu_box_says_what_its_simulated_j_per_token_means(built):
    """Guards a simulated J/token printed on a CPU box with no word of what it is (a modelled GPU's watts
    times CPU wall time)."""
    assert "The model ran on a CPU: a simulated J/token here is the modelled GPU's watts times this CPU's " \
           "wall time" in built["text"]
    assert "CPU" not in data.simulated_note([{"run_id": "a", "simulated": 1}], cpu_only=False)


def _independent_choice(rows, sla_ms):
    """The SLA rule written again from runs.csv: lowest J/token with p95 within the SLA; the default is the
    same batch size at the highest cap swept (its best repeat); the runner-up the next lowest J/token."""
    ok = sorted((r for r in rows if float(r["latency_p95_ms"]) <= sla_ms),
                key=lambda r: (float(r["j_per_token"]), float(r["latency_p95_ms"])))
    best, runner_up = ok[0], ok[1]
    top = max(float(r["cap_w"]) for r in rows)
    default = min((r for r in rows if float(r["cap_w"]) == top and r["batch_size"] == best["batch_size"]),
                  key=lambda r: float(r["j_per_token"]))
    return best, runner_up, (1 - float(best["j_per_token"]) / float(default["j_per_token"])) * 100


def test_the_sla_choice_per_workload_with_saving_and_runner_up(built):
    """Guards one choice over all workloads (mixing datasets): each group gets its own, its saving against
    the default (highest) cap at the same batch size and its runner-up, checked by an independent rule."""
    for dataset in ("gsm8k", "alpaca"):
        rows = [r for r in built["rows"] if r["dataset"] == dataset]
        best, runner_up, saving = _independent_choice(rows, SLA_MS)
        words = data.settings_text
        sentence = (f"{words(best)}: {float(best['j_per_token']):.4g} J/token at latency p95 "
                    f"{float(best['latency_p95_ms']):.0f} ms; lever that won: power cap; {saving:.1f}% less energy "
                    f"per token than the default power cap")
        assert sentence in built["text"], sentence
        assert (f"Runner-up: {words(runner_up)} at {float(runner_up['j_per_token']):.4g} J/token, latency p95 "
                f"{float(runner_up['latency_p95_ms']):.0f} ms") in built["text"]
    assert "SLA choice (latency p95 ≤ 250 ms)" in built["text"] and built["text"].count("SLA choice") == 2


def test_the_pareto_table_and_plot_number_the_same_points(built):
    """Guards Pareto labels (run ids) that overlapped: points are numbered 1…n in the plot, and the table's
    row n is the plot's point n."""
    study_runs = data.groups_of(data.with_labels(sqlite_utils.Database(built["study"]),
                                                 metrics.all_run_metrics(built["study"])))
    axes = {ax.get_title(): ax for ax in _axes(built, "latency p95")}
    assert len(axes) == 2
    for group in study_runs:
        front = data.pareto_rows(group.runs)
        ax = axes["\n".join(textwrap.wrap(group.name, 80))]
        numbers = [(t.get_text(), t.xy) for t in ax.texts]
        assert numbers == [(str(i), (r["latency_p95_ms"], r["j_per_token"])) for i, r in enumerate(front, 1)]
        for i, r in enumerate(front, 1):
            assert re.search(rf"<tr><td>{i}</td><td class=\"t\">{re.escape(data.settings_text(r))}</td>",
                             built["html"]), (group.name, i)


def test_the_seed_papers_figures_sit_beside_ours(built):
    """Guards the side-by-side table: the paper's 250→175 W figures (+6.7% time, −23.2% energy) and each
    cap-swept workload's own change, computed again here from runs.csv (highest vs lowest cap, same batch)."""
    text = built["text"]
    assert "250 → 175 +6.7 -23.2" in text
    for dataset in ("gsm8k", "alpaca"):
        rows = [r for r in built["rows"] if r["dataset"] == dataset]
        time_pct, energy_pct = [], []
        for a in (r for r in rows if r["cap_w"] == "700"):
            for b in (r for r in rows if r["cap_w"] == "300" and r["batch_size"] == a["batch_size"]):
                time_pct.append((float(a["tokens_per_s"]) / float(b["tokens_per_s"]) - 1) * 100)
                energy_pct.append((float(b["j_per_token"]) / float(a["j_per_token"]) - 1) * 100)
        row = (f"700 → 300 {sum(time_pct) / len(time_pct):+.1f} {sum(energy_pct) / len(energy_pct):+.1f}")
        assert re.search(rf"this study \(SIMULATED\): [^→]*dataset {dataset}[^→]* {re.escape(row)}", text), row
