"""Power-cap control: validated, leased, persisted and always restored.

``PowerCapManager`` owns every cap change the server makes. Guarantees (docs/power-caps.md):

- A request is validated against every selected GPU's own constraints before anything changes.
- A set that fails on one GPU rolls back the GPUs it already changed, then re-raises.
- Each change holds a lease; when it runs out the GPU returns to its original value (the value before
  the first un-restored set). Setting the same GPUs again renews the lease.
- The original values are written atomically to ``state_path`` *before* the hardware changes, so a
  server killed with SIGKILL leaves enough behind for ``recover()`` at the next start.
- ``restore_all()`` (SIGTERM, SIGINT, normal exit) is idempotent and safe from a signal-handler thread.

The manager only uses the ``GPU`` interface, so GPUs of other ranks can be proxies.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmwatts.errors import FailedPrecondition, InvalidArgument, LlmwattsError, ReadOnlyPowerError
from llmwatts.server.gpu import GPU

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class CapStatus:
    """One GPU's power cap, mirroring proto ``GpuPowerCap``. Watts; ``lease_end_ns`` 0 = no lease."""

    uuid: str
    index: int
    rank: int
    node: str
    cap_w: float
    default_w: float
    min_w: float
    max_w: float
    enforced_w: float
    lease_end_ns: int
    simulated: bool


def caps_reply(statuses: list[CapStatus], backend: str):
    """A ``llmwatts.v1.PowerCapsReply`` for the statuses."""
    from llmwatts.v1 import llmwatts_pb2

    return llmwatts_pb2.PowerCapsReply(
        gpus=[
            llmwatts_pb2.GpuPowerCap(
                uuid=s.uuid, index=s.index, rank=s.rank, node=s.node, cap_w=s.cap_w, default_w=s.default_w,
                min_w=s.min_w, max_w=s.max_w, enforced_w=s.enforced_w, lease_end_ns=s.lease_end_ns,
                simulated=s.simulated,
            )
            for s in statuses
        ],
        backend=backend,
    )


@dataclass
class _Change:
    """A GPU whose cap this manager changed and has not restored yet."""

    original_mw: int
    lease_end_ns: int


class PowerCapManager:
    """Sets, leases, persists and restores GPU power caps. Thread-safe.

    ``record_event`` gets one dict per change with the ``cap_events`` columns (ts_ns, gpu_uuid, node,
    rank, kind, old_cap_w, new_cap_w, who, reason). ``clock`` provides ``time()`` and ``time_ns()``.
    """

    def __init__(
        self,
        gpus: list[GPU],
        backend: str,
        *,
        state_path: Path,
        record_event: Callable[[dict], None],
        default_lease_s: float = 600.0,
        max_lease_s: float = 86400.0,
        clock=time,
    ):
        self.gpus = list(gpus)
        self.backend = backend
        self.state_path = Path(state_path)
        self.default_lease_s = float(default_lease_s)
        self.max_lease_s = float(max_lease_s)
        self._record_event = record_event
        self._clock = clock
        # Reentrant: restore_all may run from a signal handler that interrupted this thread mid-call.
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._changes: dict[str, _Change] = {}
        self._foreign: dict[str, dict] = {}  # state entries for GPUs this manager does not hold
        self._closed = False
        self._lease_thread = threading.Thread(target=self._lease_loop, name="llmwatts-cap-lease", daemon=True)
        self._lease_thread.start()

    # -------------------------------------------------------------------------------------------
    # Public API
    # -------------------------------------------------------------------------------------------

    def select(self, selector: list[str]) -> list[GPU]:
        """The GPUs a selector names: empty = all; entries are a uuid, "index" or "rank:index"."""
        if not selector:
            return list(self.gpus)
        chosen: list[GPU] = []
        for entry in selector:
            entry = str(entry).strip()
            matches = [g for g in self.gpus if g.uuid == entry]
            if not matches and ":" in entry:
                rank_text, _, index_text = entry.partition(":")
                if rank_text.isdigit() and index_text.isdigit():
                    matches = [g for g in self.gpus if g.rank == int(rank_text) and g.index == int(index_text)]
            elif not matches and entry.isdigit():
                matches = [g for g in self.gpus if g.index == int(entry)]
                if len(matches) > 1:
                    raise InvalidArgument(
                        f"GPU {entry!r} is ambiguous ({len(matches)} ranks have an index {entry}); "
                        f"name it as rank:index or by uuid: {', '.join(self._valid_names())}"
                    )
            if not matches:
                raise InvalidArgument(f"no GPU {entry!r}; valid GPUs: {', '.join(self._valid_names())}")
            chosen.extend(g for g in matches if g not in chosen)
        return chosen

    def get(self, selector: list[str]) -> list[CapStatus]:
        with self._lock:
            return [self._status(g) for g in self.select(selector)]

    def set(self, selector: list[str], cap_w: float, lease_s: float, who: str, reason: str) -> list[CapStatus]:
        """Cap the selected GPUs at ``cap_w`` watts for ``lease_s`` seconds (0 = default lease)."""
        if self.backend == "nvml-readonly":
            raise ReadOnlyPowerError(
                "power caps are read-only on this server (power backend nvml-readonly, used on shared GPUs); "
                "start it with --power-backend nvml on GPUs you own, or --power-backend simulated"
            )
        lease_s = self._validate_lease_s(lease_s)
        with self._lock:
            if self._closed:
                raise FailedPrecondition("the server is stopping and has restored its power caps; set caps after it restarts")
            gpus = self.select(selector)
            cap_mw = self._validate_cap_w(cap_w, gpus)
            now_ns = self._clock.time_ns()
            lease_end_ns = now_ns + int(lease_s * 1e9)
            before = {g.uuid: g.power_limit_mw() for g in gpus}
            had_change = {g.uuid: g.uuid in self._changes for g in gpus}
            # Persist the originals first: if we die between here and the restore, recover() knows.
            for g in gpus:
                if g.uuid not in self._changes:
                    self._changes[g.uuid] = _Change(original_mw=before[g.uuid], lease_end_ns=lease_end_ns)
            self._persist()
            changed: list[GPU] = []
            try:
                for g in gpus:
                    g.set_power_limit_mw(cap_mw)
                    changed.append(g)
            except BaseException:
                self._roll_back(changed, before, had_change)
                raise
            for g in gpus:
                self._changes[g.uuid].lease_end_ns = lease_end_ns
            self._persist()
            for g in gpus:
                self._event(g, "set", before[g.uuid], cap_mw, who, reason)
            statuses = [self._status(g) for g in gpus]
        self._kick()
        return statuses

    def reset(self, selector: list[str], who: str, reason: str) -> list[CapStatus]:
        """Return the selected GPUs to their original caps (those this manager has not changed stay)."""
        with self._lock:
            gpus = self.select(selector)
            for g in gpus:
                if g.uuid in self._changes:
                    self._restore(g, "reset", who, reason)
            return [self._status(g) for g in gpus]

    def restore_all(self, kind: str = "restore") -> list[CapStatus]:
        """Restore every changed GPU. Idempotent; a GPU that fails to restore stays in the state file
        so the next start's ``recover()`` retries it. Safe to call from a signal handler."""
        # A signal may arrive while another thread holds the lock inside a slow NVML call; wait a
        # bounded time, then restore anyway: leaving a cap behind is worse than a racing write.
        locked = self._lock.acquire(timeout=10.0)
        try:
            restored = []
            for uuid in list(self._changes):
                g = self._gpu(uuid)
                if g is None:
                    continue
                try:
                    self._restore(g, kind, "llmwatts-server", "server stopping" if kind == "restore" else kind)
                    restored.append(self._status(g))
                except Exception:
                    log.exception("could not restore the power cap of %r; the next start retries", g)
            return restored
        finally:
            if locked:
                self._lock.release()

    def recover(self, who: str = "llmwatts-server") -> list[CapStatus]:
        """At start: restore caps a killed earlier server left changed (from ``state_path``)."""
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise LlmwattsError(
                f"cannot read the power-cap state file {self.state_path} ({e}); check the caps with "
                "`llmwatts cap get` or nvidia-smi -q -d POWER, then delete the file"
            ) from e
        entries = state.get("gpus", {}) if isinstance(state, dict) else {}
        if not isinstance(entries, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("original_mw"), (int, float)) for e in entries.values()):
            raise LlmwattsError(
                f"the power-cap state file {self.state_path} is malformed (each GPU needs an original_mw); check "
                "the caps with `llmwatts cap get` or nvidia-smi -q -d POWER, then delete the file")
        restored = []
        with self._lock:
            for uuid, entry in entries.items():
                g = self._gpu(uuid)
                if g is None:
                    self._foreign[uuid] = entry  # another rank's or node's GPU: keep it for its owner
                    continue
                original_mw = int(entry["original_mw"])
                old_mw = g.power_limit_mw()
                try:
                    g.set_power_limit_mw(original_mw)
                except Exception:
                    log.exception("could not restore the power cap of %r at start", g)
                    self._changes[uuid] = _Change(original_mw=original_mw, lease_end_ns=0)
                    continue
                self._event(g, "startup-restore", old_mw, original_mw, who,
                            f"restored after an unclean stop (pid {entry.get('pid', '?')})")
                restored.append(self._status(g))
            self._persist()
        return restored

    def close(self) -> None:
        """Restore every cap and stop the lease thread; later sets are refused."""
        with self._lock:
            self._closed = True
        self.restore_all()
        self._kick()
        if self._lease_thread is not threading.current_thread():
            self._lease_thread.join(timeout=5.0)

    # -------------------------------------------------------------------------------------------
    # Internals
    # -------------------------------------------------------------------------------------------

    def _valid_names(self) -> list[str]:
        return [f"{g.rank}:{g.index} ({g.uuid})" for g in self.gpus]

    def _gpu(self, uuid: str) -> GPU | None:
        return next((g for g in self.gpus if g.uuid == uuid), None)

    def _validate_lease_s(self, lease_s: float) -> float:
        try:
            lease_s = float(lease_s)
        except (TypeError, ValueError):
            raise InvalidArgument(f"lease_s must be a number of seconds, got {lease_s!r}") from None
        if lease_s == 0:
            return self.default_lease_s
        if not math.isfinite(lease_s) or lease_s < 0 or lease_s > self.max_lease_s:
            raise InvalidArgument(
                f"lease_s {lease_s:g} is not allowed; give 0 (the default, {self.default_lease_s:g} s) "
                f"or seconds in (0, {self.max_lease_s:g}]"
            )
        return lease_s

    def _validate_cap_w(self, cap_w: float, gpus: list[GPU]) -> int:
        try:
            cap_w = float(cap_w)
        except (TypeError, ValueError):
            raise InvalidArgument(f"cap_w must be a number of watts, got {cap_w!r}") from None
        low_mw = max(g.power_limit_constraints_mw()[0] for g in gpus)
        high_mw = min(g.power_limit_constraints_mw()[1] for g in gpus)
        allowed = f"[{low_mw / 1000:g}, {high_mw / 1000:g}] W"
        if low_mw > high_mw:
            raise InvalidArgument("the selected GPUs share no power-limit range; cap them in separate calls")
        if not math.isfinite(cap_w) or cap_w <= 0:
            raise InvalidArgument(f"cap_w {cap_w!r} is not a power limit; give watts in {allowed}")
        cap_mw = int(round(cap_w * 1000))
        if not low_mw <= cap_mw <= high_mw:
            raise InvalidArgument(f"cap_w {cap_w:g} is outside the allowed range {allowed} of the selected GPUs")
        return cap_mw

    def _roll_back(self, changed: list[GPU], before: dict[str, int], had_change: dict[str, bool]) -> None:
        """Undo a partly applied set: each changed GPU back to its value before the call."""
        failed = set()
        for g in changed:
            try:
                g.set_power_limit_mw(before[g.uuid])
            except Exception:
                log.exception("rollback of %r failed; it stays in the state file for restore", g)
                failed.add(g.uuid)
        for uuid, had in had_change.items():
            if not had and uuid not in failed:
                self._changes.pop(uuid, None)
        self._persist()

    def _restore(self, g: GPU, kind: str, who: str, reason: str) -> None:
        change = self._changes[g.uuid]
        old_mw = g.power_limit_mw()
        g.set_power_limit_mw(change.original_mw)
        del self._changes[g.uuid]
        self._persist()
        self._event(g, kind, old_mw, change.original_mw, who, reason)

    def _status(self, g: GPU) -> CapStatus:
        low_mw, high_mw = g.power_limit_constraints_mw()
        change = self._changes.get(g.uuid)
        return CapStatus(
            uuid=g.uuid, index=g.index, rank=g.rank, node=g.node,
            cap_w=g.power_limit_mw() / 1000, default_w=g.default_power_limit_mw() / 1000,
            min_w=low_mw / 1000, max_w=high_mw / 1000, enforced_w=g.enforced_power_limit_mw() / 1000,
            lease_end_ns=change.lease_end_ns if change else 0, simulated=g.simulated,
        )

    def _event(self, g: GPU, kind: str, old_mw: int, new_mw: int, who: str, reason: str) -> None:
        event = {
            "ts_ns": self._clock.time_ns(), "gpu_uuid": g.uuid, "node": g.node, "rank": g.rank, "kind": kind,
            "old_cap_w": old_mw / 1000, "new_cap_w": new_mw / 1000, "who": who, "reason": reason,
        }
        log.info("power cap %s on %s: %g W → %g W (%s, %s)", kind, g.uuid, old_mw / 1000, new_mw / 1000, who, reason)
        try:
            self._record_event(event)
        except Exception:  # the audit trail must never stop a restore
            log.exception("could not record cap event %s", event)

    def _persist(self) -> None:
        """Write the originals of every changed GPU atomically (temp file + os.replace)."""
        gpus = dict(self._foreign)
        for uuid, change in self._changes.items():
            g = self._gpu(uuid)
            gpus[uuid] = {
                "original_mw": change.original_mw, "lease_end_ns": change.lease_end_ns,
                "node": g.node if g else "", "rank": g.rank if g else 0, "index": g.index if g else 0,
                "pid": os.getpid(),
            }
        if not gpus:
            try:
                self.state_path.unlink()
            except FileNotFoundError:
                pass
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(f".{self.state_path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump({"version": STATE_VERSION, "gpus": gpus}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    def _kick(self) -> None:
        self._wake.set()

    def _lease_loop(self) -> None:
        while not self._closed:
            with self._lock:
                now_ns = self._clock.time_ns()
                for uuid, change in list(self._changes.items()):
                    g = self._gpu(uuid)
                    if g is not None and 0 < change.lease_end_ns <= now_ns:
                        try:
                            self._restore(g, "lease-expiry", "llmwatts-server", "lease ran out")
                        except Exception:
                            log.exception("could not restore %r at lease expiry; retrying", g)
                ends = [c.lease_end_ns for c in self._changes.values() if c.lease_end_ns > 0]
                wait_s = (min(ends) - self._clock.time_ns()) / 1e9 if ends else 1.0
                if wait_s <= 0:  # a restore just failed: retry, but not in a tight loop
                    wait_s = 1.0
            self._wake.wait(timeout=min(wait_s, 1.0))
            self._wake.clear()
