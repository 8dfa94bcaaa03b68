"""Each run's power timeline at a resolution chosen from its own duration (issue 19).

The study DB's 5 s ``telemetry_buckets`` (samples.py) give a run of a second or two one or two points: its
timeline was a straight line. A run's timeline covers its window ±``MARGIN_NS``, split into at most
``POINTS`` bins of one width per run: the span / ``POINTS`` rounded up to the next of ``WIDTHS_NS``
(10 ms … 2 s). Each point is the mean of the samples in its bin (with their min and max), every sample
counted once. A run whose bins would be wider (one longer than about ``POINTS`` × 2 s, 4 min) reads the 5 s
buckets instead, merged to at most ``POINTS`` bins: it has enough of them.

``run_power_points`` holds those bins for the short runs only, filled at ingest by one range read of the
source's samples per short run (its ``ts_ns`` index): at most ``POINTS`` rows per run and GPU, and nothing
read for long runs, so the 10M-sample case (long runs) costs nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmwatts.analysis import samples

MARGIN_NS = 1_000_000_000  # the timeline shows a second before BeginRun and after EndRun
POINTS = 120
WIDTHS_NS = tuple(ms * 1_000_000 for ms in (10, 20, 50, 100, 200, 500, 1000, 2000))
TABLE = """CREATE TABLE IF NOT EXISTS run_power_points (server_id TEXT NOT NULL, run_id TEXT NOT NULL,
gpu_uuid TEXT NOT NULL, bin INTEGER NOT NULL, lo_ns INTEGER NOT NULL, width_ns INTEGER NOT NULL,
power_n INTEGER, power_sum INTEGER, power_min INTEGER, power_max INTEGER,
PRIMARY KEY (server_id, run_id, gpu_uuid, bin)) WITHOUT ROWID"""


@dataclass
class Series:
    """One GPU's power over one run: bin midpoints in s since BeginRun, mean/min/max power in W."""

    t_s: list[float]
    mean_w: list[float]
    min_w: list[float]
    max_w: list[float]
    width_s: float  # the bin width (the method, stated on the plot)


def span(begin_ns: int, end_ns: int) -> tuple[int, int]:
    """The timeline's [lo, hi] in ns: the run's window widened by ``MARGIN_NS`` each side."""
    return begin_ns - MARGIN_NS, end_ns + MARGIN_NS


def width_ns(begin_ns: int, end_ns: int) -> int | None:
    """The run's bin width: its span / ``POINTS`` rounded up to one of ``WIDTHS_NS``; None when that would
    be wider than the widest (the run is long: its 5 s buckets are enough)."""
    lo, hi = span(begin_ns, end_ns)
    need = -(-(hi - lo + 1) // POINTS)
    return next((w for w in WIDTHS_NS if w >= need), None)


def ensure_table(db) -> None:
    db.execute(TABLE)


def fill(db, schema: str, since_ns: int | None) -> int:
    """Bin the attached source's (``schema``) samples for each finished short run of its servers that has no
    bins at its current window and width yet, or ends after ``since_ns`` less the margin (its last samples
    may have arrived since). Returns the runs binned."""
    ensure_table(db)
    names = {r[1] for r in db.execute(f"PRAGMA [{schema}].table_info(telemetry)")}
    if "power_mw" not in names:
        return 0
    runs = db.execute(f"SELECT server_id, run_id, begin_ns, end_ns FROM main.runs WHERE end_ns IS NOT NULL "
                      f"AND begin_ns IS NOT NULL AND server_id IN (SELECT server_id FROM [{schema}].runs)").fetchall()
    done = 0
    for server_id, run_id, begin_ns, end_ns in runs:
        width = width_ns(begin_ns, end_ns)
        if width is None:
            continue
        lo, hi = span(begin_ns, end_ns)
        current = db.execute("SELECT 1 FROM run_power_points WHERE server_id = ? AND run_id = ? AND lo_ns = ? "
                             "AND width_ns = ? LIMIT 1", [server_id, run_id, lo, width]).fetchone()
        if current and (since_ns is None or hi < since_ns):
            continue
        db.execute("DELETE FROM run_power_points WHERE server_id = ? AND run_id = ?", [server_id, run_id])
        db.execute(
            "INSERT INTO run_power_points SELECT ?, ?, s.gpu_uuid, (s.ts_ns - ?) / ? AS b, ?, ?, count(*), "
            f"sum(s.power_mw), min(s.power_mw), max(s.power_mw) FROM [{schema}].telemetry s "
            "WHERE s.ts_ns BETWEEN ? AND ? AND +s.server_id = ? AND s.power_mw IS NOT NULL GROUP BY s.gpu_uuid, b",
            [server_id, run_id, lo, width, lo, width, lo, hi, server_id])
        done += 1
    return done


def series(db, server_id: str, run_id: str, gpu_uuid: str, gpu_key: int, begin_ns: int, end_ns: int) -> Series:
    """The GPU's power over the run's span: its own bins where ingest made them (short runs), else the 5 s
    buckets merged to at most ``POINTS`` bins (long runs, or a study DB ingested before this table)."""
    width = width_ns(begin_ns, end_ns)
    rows = db.execute(
        "SELECT lo_ns + (bin + 0.5) * width_ns, power_sum * 1.0 / power_n, power_min, power_max, width_ns "
        "FROM run_power_points WHERE server_id = ? AND run_id = ? AND gpu_uuid = ? AND width_ns = ? AND power_n > 0 "
        "ORDER BY bin", [server_id, run_id, gpu_uuid, width]).fetchall() \
        if width is not None and db["run_power_points"].exists() else []
    if rows:
        return Series([(r[0] - begin_ns) / 1e9 for r in rows], [r[1] / 1000 for r in rows],
                      [r[2] / 1000 for r in rows], [r[3] / 1000 for r in rows], width / 1e9)
    lo, hi = span(begin_ns, end_ns)
    # POINTS - 1: bins aligned to the 5 s grid can straddle one more bin than the span holds.
    x, mean_w, min_w, max_w = samples.power_series(db, gpu_key, lo, hi, POINTS - 1)
    merged = max(1, -(-(hi - lo + 1) // (POINTS - 1) // samples.BUCKET_NS))
    return Series([v + (lo - begin_ns) / 1e9 for v in x], mean_w, min_w, max_w, merged * samples.BUCKET_NS / 1e9)
