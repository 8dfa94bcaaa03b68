"""Rank 0's end of a sharded server's control group (gloo): one command at a time, broadcast to every
follower with their replies gathered (their telemetry rows and batch energy with them), a heartbeat while
idle, and a lost rank turned into one ``Unavailable`` (the server goes NOT_SERVING). server/sharded.py
runs the ranks; docs/sharding.md describes the design."""

from __future__ import annotations

import logging
import subprocess
import threading
import time

import torch.distributed as dist

from llmwatts.errors import Unavailable
from llmwatts.server.gpu import EnergySample
from llmwatts.server.ranks import Rank

log = logging.getLogger("llmwatts.server.sharded")

HEARTBEAT_S = 1.0


class Controller:
    """Rank 0's end of the control group: one command at a time, a heartbeat, failure → NOT_SERVING."""

    def __init__(self, r: Rank, children: dict[int, subprocess.Popen] | None = None):
        self.r = r
        self.children = children or {}  # rank -> process, when this process spawned the followers
        self._lock = threading.Lock()
        self.failure: Unavailable | None = None
        self.on_failure = None           # called once with the Unavailable error
        self._store = None
        self._pending_rows: list[dict] = []
        self.energy: dict[str, EnergySample] = {}  # follower GPU uuid -> its rank's latest energy reading
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="shard-heartbeat", daemon=True)

    def hello(self, mine: dict) -> list[dict]:
        """Every rank's description (rank order), with each follower's clock offset to rank 0."""
        t0 = time.time_ns()
        infos: list[dict] = [None] * self.r.world
        dist.gather_object(mine, infos, dst=0, group=self.r.ctrl)
        t1 = time.time_ns()
        for info in infos:
            # Followers stamped before the gather; an upper bound of the offset's error is (t1 - t0) / 2.
            info["clock_offset_ns"] = 0 if info["rank"] == 0 else info.pop("time_ns") - (t0 + t1) // 2
            info.pop("time_ns", None)
        return infos

    def attach_store(self, store) -> None:
        with self._lock:
            self._store = store
            rows, self._pending_rows = self._pending_rows, []
        store.add_telemetry(rows)

    def start_heartbeat(self) -> None:
        self._heartbeat.start()

    def call(self, op: str, *, local=None, **fields):
        """Broadcast a command, run ``local()`` here (the lockstep part), gather every follower's reply.
        Returns (local result, replies by rank). A follower's project error is re-raised here."""
        with self._lock:
            return self._call_locked(op, local, fields)

    def _call_locked(self, op: str, local, fields):
        if self.failure is not None:
            raise self.failure
        try:
            dist.broadcast_object_list([dict(fields, op=op)], src=0, group=self.r.ctrl)
            mine = local() if local is not None else None
            replies: list[dict] = [None] * self.r.world
            dist.gather_object({"result": None, "error": None, "telemetry": []}, replies, dst=0, group=self.r.ctrl)
        except Exception as e:
            raise self._fail(e) from e
        for rep in replies[1:]:
            self.energy.update(rep.get("energy") or {})
        rows = [row for rep in replies[1:] for row in rep["telemetry"]]
        if self._store is not None:
            self._store.add_telemetry(rows)
        else:
            self._pending_rows.extend(rows)
        for rep in replies[1:]:
            if rep["error"] is not None:
                raise rep["error"]
        return mine, replies

    def _dead_children(self) -> str:
        dead = [f"rank {rank} (pid {p.pid}) exited with code {p.returncode}"
                for rank, p in self.children.items() if p.poll() is not None]
        return "; ".join(dead)

    def _fail(self, cause: BaseException) -> Unavailable:
        if self.failure is None:
            time.sleep(0.2)  # let a dying child's exit code land, so the message names it
            what = self._dead_children() or f"a rank stopped answering ({type(cause).__name__}: {cause})"
            self.failure = Unavailable(f"sharded server lost a rank: {what}; it is no longer serving, restart it")
            log.error("%s", self.failure)
            if self.on_failure is not None:
                self.on_failure(self.failure)
        return self.failure

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self.failure is not None:
                return
            dead = self._dead_children()
            if dead:
                self._fail(RuntimeError(dead))
                return
            if not self._lock.acquire(blocking=False):
                continue  # a batch or a cap command is running: that is proof of life enough
            try:
                self._call_locked("collect", None, {})
            except Exception:
                return  # _fail already reported it
            finally:
                self._lock.release()

    def close(self) -> None:
        """Stop the followers (they send their last telemetry). Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join(timeout=10)
        if self.failure is None:
            try:
                self.call("shutdown")
            except Exception:
                log.exception("followers did not shut down cleanly")
