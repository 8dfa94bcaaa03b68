"""Reconciliation of a run: client rows against server rows (found once, missing, duplicated, server-only,
outside the window) and attributed against batch joules, from the ``run_reconciliation`` view and the
``run_request_flags`` table (views.py, request_pass.py; definitions: docs/analysis.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmwatts.analysis import join as joins
from llmwatts.analysis import views
from llmwatts.analysis.study_db import open_study_db


def _div(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def _dicts(db, sql, params=()) -> list[dict]:
    cursor = db.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


@dataclass
class Reconciliation:
    """Client rows vs server rows and attributed vs batch joules for one run (the ``run_reconciliation`` and
    ``run_metrics`` views)."""

    run_id: str
    client_sent: int
    server_ok: int
    server_error: int
    missing: int
    duplicated: int
    server_only: int
    attributed_j: float
    batch_j: float
    attribution_rel_diff: float | None
    missing_ids: list[str] = field(default_factory=list)
    duplicated_ids: list[str] = field(default_factory=list)
    server_only_ids: list[str] = field(default_factory=list)
    # Client rows sent before BeginRun or after EndRun of their server, compared on the server clock
    # (client_send_ns + clock_offset_ns): their energy is outside the run window.
    outside_window: int = 0
    outside_window_ids: list[str] = field(default_factory=list)
    # Issue 16/17: server rows ok whose client row is not (left out of every numerator), server requests
    # done after their window ended, and batch joules above the window's joules.
    status_mismatch: int = 0
    done_after_window: int = 0
    batch_energy_exceeds_window: bool = False

    @property
    def consistent(self) -> bool:
        """Every client row found exactly once, no server row unclaimed, and every counted joule inside
        the run's window."""
        return (self.missing == 0 and self.duplicated == 0 and self.server_only == 0
                and self.done_after_window == 0 and not self.batch_energy_exceeds_window)



def all_reconciliations(study_db, run_ids: list[str] | None = None, runs: list[dict] | None = None
                        ) -> list[Reconciliation]:
    """``Reconciliation`` of every run a server saw (or of ``run_ids``), from the views in one pass.
    ``runs``: the runs' ``run_metrics`` rows when the caller has them (saves reading the view again)."""
    db = open_study_db(study_db, create=False)
    views.ensure_fresh(db)
    run_ids = joins.run_ids(db) if run_ids is None else run_ids
    counts = {r["run_id"]: r for r in _dicts(db, "SELECT * FROM run_reconciliation")}
    if runs is None:
        runs = _dicts(db, "SELECT run_id, energy_busy_j, batch_energy_exceeds_window FROM run_metrics")
    energy = {r["run_id"]: r for r in runs}
    ids: dict[tuple[str, str], list[str]] = {}
    for run_id, request_id, kind in db.execute("SELECT run_id, request_id, kind FROM run_request_flags ORDER BY seq"):
        bucket = ids.setdefault((run_id, kind), [])
        if kind != "duplicated" or request_id not in bucket:
            bucket.append(request_id)
    out = []
    for run_id in run_ids:
        c, e = counts.get(run_id, {}), energy.get(run_id, {})
        batch_j = e.get("energy_busy_j") or 0.0
        attributed_j = c.get("attributed_j") or 0.0
        out.append(Reconciliation(
            run_id=run_id,
            client_sent=c.get("client_sent") or 0, server_ok=c.get("server_ok") or 0,
            server_error=c.get("server_error") or 0, missing=c.get("missing") or 0,
            duplicated=c.get("duplicated") or 0, server_only=c.get("server_only") or 0,
            attributed_j=attributed_j, batch_j=batch_j,
            attribution_rel_diff=_div(attributed_j - batch_j, batch_j),
            missing_ids=ids.get((run_id, "missing"), []),
            duplicated_ids=sorted(ids.get((run_id, "duplicated"), [])),
            server_only_ids=ids.get((run_id, "server_only"), []),
            outside_window=c.get("outside_window") or 0,
            outside_window_ids=ids.get((run_id, "outside"), []),
            status_mismatch=c.get("status_mismatch") or 0,
            done_after_window=c.get("done_after_window") or 0,
            batch_energy_exceeds_window=bool(e.get("batch_energy_exceeds_window")),
        ))
    return out


def reconcile(study_db, run_id: str) -> Reconciliation:
    """Counts of the run's client requests found on a server exactly once (ok / error), missing or
    duplicated, server rows no client claims, Σ per-request attributed J vs Σ batch J, and the window
    checks (requests done after EndRun, batch J above window J)."""
    db = open_study_db(study_db, create=False)
    joins.require_run(db, run_id)
    return all_reconciliations(db, [run_id])[0]


__all__ = ["Reconciliation", "all_reconciliations", "reconcile"]
