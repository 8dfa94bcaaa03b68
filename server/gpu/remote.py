"""Another rank's GPU, seen from rank 0 of a sharded server (server/sharded.py; its commands go through
server/shard_control.py), and the follower's side of a batch's energy.

Reads and sets go to the owning rank as control commands (``controller.call("gpu", ...)``), except the
energy a batch boundary reads: each rank brackets its own batch (``bracket_batch``: one reading when the
batch begins, one when it ends) and returns both with its step reply. Rank 0's ``EnergyMeter`` reads a
``RemoteGPU`` from that cache, so a batch costs no control round trip per follower for its energy
(before: two per follower and batch, ``2·(N−1)``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

from llmwatts.server.gpu.common import GPU, ClockReading, EnergySample, GpuSample, LockedClocks


class Controller(Protocol):
    """What a ``RemoteGPU`` needs of rank 0's controller (``Controller`` in server/shard_control.py)."""

    energy: dict[str, EnergySample]  # gpu uuid -> the owning rank's latest reading

    def call(self, op: str, *, local=None, **fields): ...


def gpu_info(g: GPU) -> dict:
    """What rank 0 learns of a follower's GPU when the ranks meet, and its first energy reading."""
    return {"index": g.index, "uuid": g.uuid, "name": g.name, "node": g.node, "rank": g.rank,
            "simulated": g.simulated, "memory_total_bytes": g.memory_total_bytes, "power_source": g.power_source,
            "default_mw": g.default_power_limit_mw(), "constraints_mw": g.power_limit_constraints_mw(),
            "supported_clocks": g.supported_clocks_mhz(), "energy": g.energy_sample()}


def bracket_batch(gpus: list[GPU], n_sequences: int, run: Callable[[], object]) -> tuple[object, dict[str, EnergySample]]:
    """Run one batch of ``n_sequences`` on this rank's ``gpus`` between two energy readings of each.

    Returns ``run()``'s result and each GPU's end reading (by uuid), which carries its start reading as
    ``bracket_start``: the step reply rank 0 reads the batch's joules from.
    """
    starts = {g.uuid: g.energy_sample() for g in gpus}
    for g in gpus:
        g.set_load(n_sequences)
    try:
        result = run()
    finally:
        for g in gpus:
            g.set_load(0)
    ends = {g.uuid: dataclasses.replace(g.energy_sample(), bracket_start=starts[g.uuid]) for g in gpus}
    return result, ends


class RemoteGPU(GPU):
    """A follower's GPU seen from rank 0: reads and sets are commands to the owning rank; its energy
    reading is the owning rank's latest, which came with its last step reply."""

    def __init__(self, controller: Controller, info: dict):
        self.controller = controller
        self.index, self.uuid, self.name = info["index"], info["uuid"], info["name"]
        self.node, self.rank, self.simulated = info["node"], info["rank"], info["simulated"]
        self.memory_total_bytes, self.power_source = info["memory_total_bytes"], info["power_source"]
        self._default_mw, self._constraints_mw = info["default_mw"], tuple(info["constraints_mw"])
        self._supported_clocks = info["supported_clocks"]
        controller.energy.setdefault(self.uuid, info["energy"])

    def _remote(self, method: str, *args):
        _, replies = self.controller.call("gpu", target=self.rank, uuid=self.uuid, method=method, args=args)
        return replies[self.rank]["result"]

    def sample(self) -> GpuSample:
        return self._remote("sample")

    def energy_mj(self) -> int:
        """The counter now (a round trip: for run markers, not batch boundaries)."""
        return self._remote("energy_mj")

    def energy_sample(self) -> EnergySample:
        """The owning rank's latest reading, no round trip: at the end of a batch it is that batch's end
        reading (with its start as ``bracket_start``); between batches, the previous batch's end."""
        return self.controller.energy[self.uuid]

    def power_limit_mw(self) -> int:
        return self._remote("power_limit_mw")

    def enforced_power_limit_mw(self) -> int:
        return self._remote("enforced_power_limit_mw")

    def default_power_limit_mw(self) -> int:
        return self._default_mw

    def power_limit_constraints_mw(self) -> tuple[int, int]:
        return self._constraints_mw

    def set_power_limit_mw(self, limit_mw: int) -> None:
        self._remote("set_power_limit_mw", int(limit_mw))

    def clocks(self) -> ClockReading:
        return self._remote("clocks")

    def supported_clocks_mhz(self) -> dict[int, tuple[int, ...]]:
        return dict(self._supported_clocks)

    def locked_clocks(self) -> LockedClocks | None:
        return self._remote("locked_clocks")

    def set_locked_clocks(self, lock: LockedClocks | None) -> None:
        self._remote("set_locked_clocks", lock)

    # set_load / pace: the owning rank sets its own load when it runs a batch and paces itself.
