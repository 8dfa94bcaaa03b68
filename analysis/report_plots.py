"""report.html's plots (matplotlib, PNG bytes): per workload group, never mixing workloads in a series.

Rules from what users tripped on: batch sizes on a categorical axis ticked with the integers run; every
y-axis starts at zero; repeated runs of one setting are drawn as points with their mean, never joined by
a vertical line; legends sit outside the data; Pareto points are numbered (the numbers key the Pareto
table) instead of labelled with run ids that overlap; "simulated" is in the axis label of each simulated
quantity.
"""

from __future__ import annotations

import io
import os
import sqlite3
import tempfile
import textwrap

import matplotlib
import numpy as np
import sqlite_utils

matplotlib.use("Agg")  # files only, never a display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from llmwatts.analysis import timeline  # noqa: E402
from llmwatts.analysis.report_data import SETTING_KEYS, Group, _num, settings_text  # noqa: E402

MAX_TIMELINES = 24


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _title(ax, text: str) -> None:
    """A group's name as the title, wrapped to the axes' width (a long one ran over the y label)."""
    ax.set_title("\n".join(textwrap.wrap(text, 80)), fontsize=8)


def _sim(label: str, simulated: bool) -> str:
    return f"{label} [simulated]" if simulated else label


def _series(rows: list[dict], x_key: str):
    """{series label: {x: [rows]}}: a series holds every other swept setting fixed (so only repeats of one
    setting share a point), for rows that have ``x_key``."""
    varying = [k for k in SETTING_KEYS if k != x_key and len({str(r.get(k)) for r in rows}) > 1]
    out: dict = {}
    for r in rows:
        x = _num(r.get(x_key))
        if x is None:
            continue
        label = settings_text({k: r.get(k) for k in varying}) or "all runs"
        out.setdefault(label, {}).setdefault(x, []).append(r)
    return out


def metric_vs(group: Group, x_key: str, y_key: str, y_label: str, x_label: str, simulated: bool) -> bytes | None:
    """``y_key`` against ``x_key`` (categorical axis ticked with the values run), one line per setting of
    the other swept dimensions through the means of repeats, every repeat drawn as a point."""
    rows = [r for r in group.runs if r.get(y_key) is not None]
    series = _series(rows, x_key)
    xs = sorted({x for s in series.values() for x in s})
    if len(xs) < 2:  # one value run: nothing to read against it (it was ticked 0.50, 1.00)
        return None
    position = {x: i for i, x in enumerate(xs)}
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label in sorted(series):
        points = series[label]
        line_x = [position[x] for x in sorted(points)]
        means = [sum(r[y_key] for r in points[x]) / len(points[x]) for x in sorted(points)]
        (line,) = ax.plot(line_x, means, marker="o", label=label)
        for x, rs in points.items():
            if len(rs) > 1:
                ax.scatter([position[x]] * len(rs), [r[y_key] for r in rs], color=line.get_color(), s=12, alpha=0.5)
    ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    ax.set_xlabel(x_label)
    ax.set_ylabel(_sim(y_label, simulated))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _title(ax, group.name)
    return _png(fig)


def pareto(group: Group, simulated: bool) -> bytes | None:
    rows = [r for r in group.runs if r.get("latency_p95_ms") is not None and r.get("j_per_token") is not None]
    if not rows:
        return None
    front = group.pareto
    on_front = {id(r) for r in front}
    others = [r for r in rows if id(r) not in on_front]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if others:  # never a legend entry whose points all hide under the front's
        ax.scatter([r["latency_p95_ms"] for r in others], [r["j_per_token"] for r in others], color="tab:gray",
                   s=18, label="other runs")
    ax.plot([r["latency_p95_ms"] for r in front], [r["j_per_token"] for r in front], color="tab:red", marker="o",
            drawstyle="steps-post", label="Pareto front (numbered as in its table)")
    for i, r in enumerate(front, 1):
        ax.annotate(str(i), (r["latency_p95_ms"], r["j_per_token"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points", color="tab:red")
    ax.set_xlabel("latency p95 (ms, client)")
    ax.set_ylabel(_sim("energy per output token (J)", simulated))
    ax.set_xlim(0, max(r["latency_p95_ms"] for r in rows) * 1.1 or 1)
    ax.set_ylim(0, max(r["j_per_token"] for r in rows) * 1.15 or 1)  # room above the top point for its number
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _title(ax, group.name)
    return _png(fig)


def steady_span_of(db, run_id: str) -> tuple[int, int] | None:
    """The run's steady-state span (``run_steady``, server clock ns), or None when it has none."""
    if not db["run_steady"].exists():
        return None
    row = db.execute("SELECT begin_ns, end_ns FROM run_steady WHERE run_id = ?", [run_id]).fetchone()
    return (row[0], row[1]) if row and row[0] is not None and row[1] is not None and row[1] > row[0] else None


def timeline_figure(db, runs: list[dict], titles: dict[str, str]):
    """Small multiples: each run's GPU power over its own window (±1 s) at a bin width chosen from its
    duration (timeline.py: at most ``timeline.POINTS`` bins, the width in the x label), the bins' min–max
    band shaded, its steady-state span shaded and its cap changes dashed; titled by its settings, not a
    server hash. Power lines carry gid "power" (the tests read their data)."""
    shown = runs[:MAX_TIMELINES]
    if not shown or not db["runs"].exists():
        return None
    cols = min(3, len(shown))
    rows_n = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.4 * cols, 2.6 * rows_n), squeeze=False)
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, run in zip(axes.flat, shown):
        window = db.execute("SELECT server_id, begin_ns, end_ns FROM runs WHERE run_id = ? AND end_ns IS NOT NULL",
                            [run["run_id"]]).fetchone()
        if window is None:
            ax.axis("off")
            continue
        server_id, begin_ns, end_ns = window
        lo, hi = timeline.span(begin_ns, end_ns)
        gpus = db.execute("SELECT gpu_key, gpu_uuid FROM telemetry_gpus WHERE server_id = ? ORDER BY gpu_uuid",
                          [server_id]).fetchall() if db["telemetry_gpus"].exists() else []
        widths = set()
        for gpu_key, gpu_uuid in gpus:
            s = timeline.series(db, server_id, run["run_id"], gpu_uuid, gpu_key, begin_ns, end_ns)
            if not s.t_s:
                continue
            widths.add(s.width_s)
            (line,) = ax.plot(s.t_s, s.mean_w, lw=1, marker="." if len(s.t_s) < 40 else None, ms=3, gid="power",
                              label=f"GPU {gpu_uuid[-6:]}" if len(gpus) > 1 else None)
            ax.fill_between(s.t_s, s.min_w, s.max_w, color=line.get_color(), alpha=0.2, lw=0)
        ax.axvline(0, color="black", lw=0.8)
        ax.axvline((end_ns - begin_ns) / 1e9, color="black", lw=0.8)
        steady = steady_span_of(db, run["run_id"])
        if steady is not None:
            ax.axvspan((steady[0] - begin_ns) / 1e9, (steady[1] - begin_ns) / 1e9,
                       color="tab:green", alpha=0.15, label="steady state")
        else:
            ax.text(0.02, 0.97, "no steady state:\nin-flight requests never\nreached 90% of the target",
                    transform=ax.transAxes, ha="left", va="top", fontsize=6, color="tab:gray")  # over the idle lead-in
        if db["cap_events"].exists():
            for ts_ns, new_cap_w in db.execute("SELECT ts_ns, new_cap_w FROM cap_events WHERE server_id = ? AND "
                                               "ts_ns BETWEEN ? AND ?", [server_id, lo, hi]):
                ax.axvline((ts_ns - begin_ns) / 1e9, color="tab:red", ls="--", lw=0.8)
                ax.text((ts_ns - begin_ns) / 1e9, 0.02, f" cap {new_cap_w:g} W", color="tab:red", fontsize=6,
                        rotation=90, transform=ax.get_xaxis_transform(), va="bottom")
        ax.set_xlim((lo - begin_ns) / 1e9, (hi - begin_ns) / 1e9)
        ax.set_ylim(bottom=0)
        ax.set_title(titles.get(run["run_id"], run["run_id"]), fontsize=8)
        bins = " or ".join(_seconds(w) for w in sorted(widths))
        ax.set_xlabel("s since the run began" + (f" (mean of each {bins} bin; band: min–max)" if bins else
                                                 " (no telemetry)"), fontsize=7)
        ax.set_ylabel(_sim("power (W)", bool(run.get("simulated"))), fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        if len(gpus) > 1:  # the key to the shading and lines is below the figure, never over the data
            ax.legend(handles=[line for line in ax.lines if line.get_gid() == "power"], fontsize=6, loc="lower right")
    fig.tight_layout()
    key = ("black lines: BeginRun and EndRun; green: steady state; dashed red: cap change; "
           "blue: mean power of each bin, its min–max band shaded")
    fig.text(0.5, 0, "\n".join(textwrap.wrap(key, 75 * cols)), ha="center", va="top", fontsize=7)
    return fig


def _seconds(width_s: float) -> str:
    return f"{width_s * 1000:g} ms" if width_s < 1 else f"{width_s:g} s"


def timelines(db, runs: list[dict], titles: dict[str, str]) -> bytes | None:
    fig = timeline_figure(db, runs, titles)
    return None if fig is None else _png(fig)


ASIDE = True  # False: TimelinesAside draws in this process (tests that read the figures themselves)


class TimelinesAside:
    """``timelines`` drawn in a forked child process while this one draws the other plots (the timelines are
    the report's largest figure: ~1.9 s of ~3.7 s at 8 runs × 4 GPUs, issue 21); the same PNG bytes.

    The child reads the study DB through a read-only connection of its own (an SQLite connection must not
    be used across a fork), hands the PNG back through a temp file and leaves by ``os._exit`` (no cleanup of
    what it inherited). Without ``os.fork``, or when the child fails, ``png`` draws them here."""

    def __init__(self, db, runs: list[dict], titles: dict[str, str]):
        self.pid = None
        self.out = tempfile.TemporaryFile()
        path = db.execute("PRAGMA database_list").fetchone()[2]
        if not path or not hasattr(os, "fork") or not ASIDE:
            return
        try:
            pid = os.fork()
        except OSError:
            return
        if pid == 0:  # the child
            code = 1
            try:
                png = timelines(sqlite_utils.Database(sqlite3.connect(f"file:{path}?mode=ro", uri=True)), runs, titles)
                self.out.write(b"-" if png is None else b"+" + png)
                self.out.flush()
                code = 0
            finally:
                os._exit(code)
        self.pid = pid

    def png(self, db, runs: list[dict], titles: dict[str, str]) -> bytes | None:
        """The child's PNG (None: no timeline to draw), or drawn here when there is no child's."""
        if self.close():
            self.out.seek(0)
            data = self.out.read()
            if data[:1] in (b"-", b"+"):
                self.out.close()
                return data[1:] if data[:1] == b"+" else None
        self.out.close()
        return timelines(db, runs, titles)

    def close(self) -> bool:
        """Wait for the child (never left behind, even when the report fails); whether it succeeded."""
        pid, self.pid = self.pid, None
        return pid is not None and os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def request_energy(db, group: Group, simulated: bool) -> bytes | None:
    """Per-request joules vs latency, one colour per run setting. A run with more than
    ``request_pass.MAX_POINTS`` counted requests is thinned evenly at refresh (``run_request_points``: every
    k-th of them in client send order)."""
    if not db["run_request_points"].exists():
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    drawn = 0
    for run in group.runs[:20]:
        pts = np.array(db.execute("SELECT e2e_ms, energy_j FROM run_request_points WHERE run_id = ? ORDER BY seq",
                                  [run["run_id"]]).fetchall(), dtype=np.float64).reshape(-1, 2)
        if len(pts):
            ax.scatter(pts[:, 0], pts[:, 1], s=8, alpha=0.6, label=run.get("_title", run["run_id"]))
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("request latency (ms, client)")
    ax.set_ylabel(_sim("energy attributed to the request (J)", simulated))
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _title(ax, group.name)
    return _png(fig)
