"""Leased GPU settings: validated, leased, persisted and always restored.

``SettingManager`` owns every change of one GPU setting the server makes: power caps (power.py) and
locked clocks (clocks.py) are two ``Setting``s under the same guarantees (docs/power-caps.md):

- A request is validated against every selected GPU before anything changes.
- A set that fails on one GPU rolls back the GPUs it already changed, then re-raises.
- Each change holds a lease; when it runs out the GPU returns to its original value (the value before
  the first un-restored set). Setting the same GPUs again renews the lease.
- The original values are written atomically to ``state_path`` *before* the hardware changes, so a
  server killed with SIGKILL leaves enough behind for ``recover()`` at the next start.
- ``restore_all()`` (SIGTERM, SIGINT, normal exit) is idempotent and safe from a signal-handler thread.

The manager only uses the ``GPU`` interface, so GPUs of other ranks can be proxies.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, TypeVar

from llmwatts.errors import FailedPrecondition, InvalidArgument, LlmwattsError, ReadOnlyPowerError
from llmwatts.server.gpu import GPU

log = logging.getLogger(__name__)

STATE_VERSION = 1
V = TypeVar("V")


class Setting(abc.ABC, Generic[V]):
    """One kind of GPU setting a ``SettingManager`` controls: how to read, write, validate, persist and
    report it. ``power.POWER_CAP`` and ``clocks.CLOCK_LOCK`` are the two."""

    noun: str            # "power cap", for messages and logs
    state_key: str       # the key of a GPU's original value in the state file
    fix_hint: str        # how a user checks and clears a state file the manager cannot read

    @abc.abstractmethod
    def read(self, g: GPU) -> V:
        """The value on the GPU now."""

    @abc.abstractmethod
    def write(self, g: GPU, value: V) -> None:
        """Put ``value`` on the GPU (a no-op when it already holds)."""

    @abc.abstractmethod
    def validate(self, request, gpus: list[GPU]) -> V:
        """The value a request asks for, checked against every selected GPU; ``InvalidArgument`` if not."""

    @abc.abstractmethod
    def read_only_error(self) -> ReadOnlyPowerError:
        """The refusal of a set on a read-only backend."""

    @abc.abstractmethod
    def encode(self, value: V):
        """``value`` as JSON for the state file."""

    @abc.abstractmethod
    def decode(self, obj) -> V:
        """The inverse of ``encode``; ``ValueError`` when ``obj`` is not one."""

    @abc.abstractmethod
    def event(self, g: GPU, old: V, new: V) -> dict:
        """The setting's columns of an event row (the manager adds ts_ns, gpu, kind, who, reason)."""

    @abc.abstractmethod
    def describe(self, value: V) -> str:
        """``value`` for a log line."""

    @abc.abstractmethod
    def status(self, g: GPU, lease_end_ns: int):
        """A GPU's status record for replies (``lease_end_ns`` 0: no lease)."""


@dataclass
class _Change(Generic[V]):
    """A GPU whose setting this manager changed and has not restored yet."""

    original: V
    lease_end_ns: int


class SettingManager(Generic[V]):
    """Sets, leases, persists and restores one setting of the GPUs. Thread-safe.

    ``record_event`` gets one dict per change: ts_ns, gpu_uuid, node, rank, kind, who, reason and the
    setting's own columns (``Setting.event``). ``clock`` provides ``time()`` and ``time_ns()``.
    """

    def __init__(
        self,
        setting: Setting[V],
        gpus: list[GPU],
        backend: str,
        *,
        state_path: Path,
        record_event: Callable[[dict], None],
        default_lease_s: float = 600.0,
        max_lease_s: float = 86400.0,
        clock=time,
    ):
        self.setting = setting
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
        self._changes: dict[str, _Change[V]] = {}
        self._foreign: dict[str, dict] = {}  # state entries for GPUs this manager does not hold
        self._closed = False
        self._lease_thread = threading.Thread(target=self._lease_loop, daemon=True,
                                              name=f"llmwatts-{setting.noun.replace(' ', '-')}-lease")
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

    def get(self, selector: list[str]) -> list:
        with self._lock:
            return [self._status(g) for g in self.select(selector)]

    def set(self, selector: list[str], request, lease_s: float, who: str, reason: str) -> list:
        """Put the value ``request`` asks for (``Setting.validate``) on the selected GPUs for ``lease_s``
        seconds (0 = the default lease)."""
        if self.backend == "nvml-readonly":
            raise self.setting.read_only_error()
        lease_s = self._validate_lease_s(lease_s)
        with self._lock:
            if self._closed:
                raise FailedPrecondition(f"the server is stopping and has restored every {self.setting.noun}; "
                                         "set it again after the server restarts")
            gpus = self.select(selector)
            value = self.setting.validate(request, gpus)
            now_ns = self._clock.time_ns()
            lease_end_ns = now_ns + int(lease_s * 1e9)
            before = {g.uuid: self.setting.read(g) for g in gpus}
            had_change = {g.uuid: g.uuid in self._changes for g in gpus}
            # Persist the originals first: if we die between here and the restore, recover() knows.
            for g in gpus:
                if g.uuid not in self._changes:
                    self._changes[g.uuid] = _Change(original=before[g.uuid], lease_end_ns=lease_end_ns)
            self._persist()
            changed: list[GPU] = []
            try:
                for g in gpus:
                    self.setting.write(g, value)
                    changed.append(g)
            except BaseException:
                self._roll_back(changed, before, had_change)
                raise
            for g in gpus:
                self._changes[g.uuid].lease_end_ns = lease_end_ns
            self._persist()
            for g in gpus:
                self._event(g, "set", before[g.uuid], value, who, reason)
            statuses = [self._status(g) for g in gpus]
        self._kick()
        return statuses

    def reset(self, selector: list[str], who: str, reason: str) -> list:
        """Return the selected GPUs to their original values (those this manager has not changed stay)."""
        with self._lock:
            gpus = self.select(selector)
            for g in gpus:
                if g.uuid in self._changes:
                    self._restore(g, "reset", who, reason)
            return [self._status(g) for g in gpus]

    def restore_all(self, kind: str = "restore") -> list:
        """Restore every changed GPU. Idempotent; a GPU that fails to restore stays in the state file
        so the next start's ``recover()`` retries it. Safe to call from a signal handler."""
        # A signal may arrive while another thread holds the lock inside a slow NVML call; wait a
        # bounded time, then restore anyway: leaving a setting behind is worse than a racing write.
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
                    log.exception("could not restore the %s of %r; the next start retries", self.setting.noun, g)
            return restored
        finally:
            if locked:
                self._lock.release()

    def recover(self, who: str = "llmwatts-server") -> list:
        """At start: restore what a killed earlier server left changed (from ``state_path``)."""
        noun, key = self.setting.noun, self.setting.state_key
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            raise LlmwattsError(f"cannot read the {noun} state file {self.state_path} ({e}); "
                                f"{self.setting.fix_hint}, then delete the file") from e
        entries = state.get("gpus", {}) if isinstance(state, dict) else {}
        try:
            if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
                raise ValueError("not a mapping of GPUs")
            originals = {uuid: self.setting.decode(entry[key]) for uuid, entry in entries.items()}
        except (KeyError, TypeError, ValueError):
            raise LlmwattsError(f"the {noun} state file {self.state_path} is malformed (each GPU needs an {key}); "
                                f"{self.setting.fix_hint}, then delete the file") from None
        restored = []
        with self._lock:
            for uuid, entry in entries.items():
                g = self._gpu(uuid)
                if g is None:
                    self._foreign[uuid] = entry  # another rank's or node's GPU: keep it for its owner
                    continue
                original = originals[uuid]
                old = self.setting.read(g)
                try:
                    self.setting.write(g, original)
                except Exception:
                    log.exception("could not restore the %s of %r at start", noun, g)
                    self._changes[uuid] = _Change(original=original, lease_end_ns=0)
                    continue
                self._event(g, "startup-restore", old, original, who,
                            f"restored after an unclean stop (pid {entry.get('pid', '?')})")
                restored.append(self._status(g))
            self._persist()
        return restored

    def close(self) -> None:
        """Restore every changed GPU and stop the lease thread; later sets are refused."""
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

    def _roll_back(self, changed: list[GPU], before: dict[str, V], had_change: dict[str, bool]) -> None:
        """Undo a partly applied set: each changed GPU back to its value before the call."""
        failed = set()
        for g in changed:
            try:
                self.setting.write(g, before[g.uuid])
            except Exception:
                log.exception("rollback of %r failed; it stays in the state file for restore", g)
                failed.add(g.uuid)
        for uuid, had in had_change.items():
            if not had and uuid not in failed:
                self._changes.pop(uuid, None)
        self._persist()

    def _restore(self, g: GPU, kind: str, who: str, reason: str) -> None:
        change = self._changes[g.uuid]
        old = self.setting.read(g)
        self.setting.write(g, change.original)
        del self._changes[g.uuid]
        self._persist()
        self._event(g, kind, old, change.original, who, reason)

    def _status(self, g: GPU):
        change = self._changes.get(g.uuid)
        return self.setting.status(g, change.lease_end_ns if change else 0)

    def _event(self, g: GPU, kind: str, old: V, new: V, who: str, reason: str) -> None:
        event = {"ts_ns": self._clock.time_ns(), "gpu_uuid": g.uuid, "node": g.node, "rank": g.rank, "kind": kind,
                 **self.setting.event(g, old, new), "who": who, "reason": reason, "simulated": int(g.simulated)}
        log.info("%s %s on %s: %s → %s (%s, %s)", self.setting.noun, kind, g.uuid, self.setting.describe(old),
                 self.setting.describe(new), who, reason)
        try:
            self._record_event(event)
        except Exception:  # the audit trail must never stop a restore
            log.exception("could not record %s event %s", self.setting.noun, event)

    def _persist(self) -> None:
        """Write the originals of every changed GPU atomically (temp file + os.replace)."""
        gpus = dict(self._foreign)
        for uuid, change in self._changes.items():
            g = self._gpu(uuid)
            gpus[uuid] = {
                self.setting.state_key: self.setting.encode(change.original), "lease_end_ns": change.lease_end_ns,
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
                            log.exception("could not restore the %s of %r at lease expiry; retrying",
                                          self.setting.noun, g)
                ends = [c.lease_end_ns for c in self._changes.values() if c.lease_end_ns > 0]
                wait_s = (min(ends) - self._clock.time_ns()) / 1e9 if ends else 1.0
                if wait_s <= 0:  # a restore just failed: retry, but not in a tight loop
                    wait_s = 1.0
            self._wake.wait(timeout=min(wait_s, 1.0))
            self._wake.clear()
