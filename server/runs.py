"""Run ownership and run windows.

A run belongs to whoever began it: ``BeginRun`` answers a random ``run_secret`` (the store keeps only its
sha256), and ``EndRun`` and every request naming a begun run must present it (PERMISSION_DENIED
otherwise). A stranger can neither end the run nor send requests into it; one who begins a run id first
leaves the owner with ALREADY_EXISTS and no secret, so the owner's requests are refused rather than
recorded under forged labels. Where an inference token is configured, BeginRun and EndRun need it too
(``auth.py``). A client (peer address) holds at most ``MAX_OPEN_RUNS_PER_CLIENT`` open runs.

Run window (#17 defect 1): EndRun waits until every accepted request of the run has ended (answered,
failed or cancelled), so the window holds every counted token's energy: the end marker is read after the
last batch holding a request of the run. It waits at most until its own deadline (``END_RUN_WAIT_S`` at
most); if requests are still running then, the run ends anyway and ``runs.pending_at_end`` says how many,
so ``run_windows`` (store.py) flags it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from llmwatts.errors import AlreadyExists, FailedPrecondition, NotFound, PermissionDenied, ResourceExhausted
from llmwatts.server.limits import MAX_OPEN_RUNS_PER_CLIENT

END_RUN_WAIT_S = 600.0


def secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass
class RunState:
    secret_sha256: str | None   # None: begun by a server before run secrets (any caller may use it)
    ending: bool = False        # EndRun arrived: new requests are refused
    ended: bool = False
    in_flight: int = 0          # accepted requests not yet ended


class RunRegistry:
    """Which runs exist, who owns them, and how many of their requests are still running."""

    def __init__(self, store, meter, simulated: bool, flush_telemetry=None):
        self.store, self.meter, self.simulated = store, meter, simulated
        self.flush_telemetry = flush_telemetry or store.flush  # TelemetrySampler.flush: the window's samples
        self._runs: dict[str, RunState] = {}
        self._cond = threading.Condition()

    def _state(self, run_id: str) -> RunState | None:
        """The run's state (loaded from the store once: runs outlive a restart); call under the lock."""
        state = self._runs.get(run_id)
        if state is None:
            row = self.store.run(run_id)
            if row is None:
                return None
            state = self._runs[run_id] = RunState(row["secret_sha256"], ended=row["end_ns"] is not None)
        return state

    @staticmethod
    def _check_secret(run_id: str, state: RunState, secret: str) -> None:
        if state.secret_sha256 is not None and not hmac.compare_digest(secret_sha256(secret), state.secret_sha256):
            raise PermissionDenied(f"run {run_id!r} belongs to the client that began it: send its run_secret "
                                   f"(BeginRun's reply), or use a run id of your own")

    def begin(self, run_id: str, labels: dict, client: str) -> tuple[int, float, str]:
        """Open a run for ``client`` -> (server_ns, energy_j, run_secret)."""
        secret = secrets.token_hex(16)
        with self._cond:
            if self._state(run_id) is not None:
                raise AlreadyExists(f"run {run_id!r} was already begun on this server: use a new run id")
            if self.store.open_runs(client) >= MAX_OPEN_RUNS_PER_CLIENT:
                raise ResourceExhausted(f"{client} already has {MAX_OPEN_RUNS_PER_CLIENT} open runs: end one "
                                        f"(EndRun) before beginning another")
            now, energy_j = time.time_ns(), self.meter.total_j()
            self.store.begin_run(run_id, now, energy_j, labels, self.simulated, secret_sha256=secret_sha256(secret),
                                 client=client)
            self._runs[run_id] = RunState(secret_sha256(secret))
        return now, energy_j, secret

    def admit(self, run_id: str, secret: str) -> bool:
        """A request names ``run_id``: refused unless it carries the run's secret and the run is open ->
        whether it is counted (a run id never begun is not: its requests belong to no window)."""
        if not run_id:
            return False
        with self._cond:
            state = self._state(run_id)
            if state is None:
                return False
            self._check_secret(run_id, state, secret)
            if state.ended or state.ending:
                raise FailedPrecondition(f"run {run_id!r} has ended: requests after EndRun belong to no run "
                                         f"window; begin a new run")
            state.in_flight += 1
            return True

    def release(self, run_id: str) -> None:
        """One counted request of ``run_id`` has ended."""
        with self._cond:
            state = self._runs.get(run_id)
            if state is not None and state.in_flight > 0:
                state.in_flight -= 1
                if not state.in_flight:
                    self._cond.notify_all()

    def end(self, run_id: str, secret: str, wait_s: float) -> tuple[int, float, int]:
        """Close the run once its requests have ended (waiting up to ``wait_s``) and write every telemetry
        sample of its window -> (server_ns, energy_j, requests still running when it closed)."""
        requested_ns = time.time_ns()
        with self._cond:
            state = self._state(run_id)
            if state is None:
                raise NotFound(f"run {run_id!r} was never begun on this server: call BeginRun first")
            self._check_secret(run_id, state, secret)
            if state.ended or state.ending:
                raise FailedPrecondition(f"run {run_id!r} has already ended; its end marker stays as it was")
            state.ending = True
            self._cond.wait_for(lambda: state.in_flight == 0, timeout=max(0.0, min(wait_s, END_RUN_WAIT_S)))
            pending = state.in_flight
            now, energy_j = time.time_ns(), self.meter.total_j()
            self.store.end_run(run_id, now, energy_j, requested_ns=requested_ns, pending=pending)
            state.ended = True
        self.flush_telemetry()  # EndRun answers once the DB file holds the whole window (a report may read it)
        return now, energy_j, pending
