"""A continuous batch's busy *segment* (``llmwatts serve --continuous``; continuous.py runs it): the
energy settled into it so far, read by read, and the rows it writes at every read.

A segment is one ``batches`` row, upserted as it grows; each interval between two energy reads is split
over the requests by the tokens each processed in it (``records.attribute``, the static batches' rule
applied per interval), so a request pays for the steps it shared and not for those before it joined or
after it left. Every write carries every request the segment holds, the running ones with what they used
so far: the segment's joules are always its requests' sum.
"""

from dataclasses import dataclass, field

from llmwatts.server.engine import BatchOutput, BatchSpec
from llmwatts.server.gpu import GPU
from llmwatts.server.records import BatchRow, GpuEnergyRow, RequestRow, attribute
from llmwatts.server.telemetry import EnergyReading
from llmwatts.server.work import Result, Work


@dataclass
class Joined:
    """A request inside the session: what the energy split and the response need."""

    work: Work
    spec: BatchSpec
    joined_ns: int
    energy_j: float = 0.0
    steps: int = 0
    output: BatchOutput | None = None  # the engine's, once it ended


@dataclass
class Segment:
    """A busy period: the ``batches`` row its requests point at, and what was settled into it so far."""

    batch_id: str
    start: EnergyReading
    last: EnergyReading
    first_token_ns: int = 0
    energy_j: float = 0.0
    gpu_j: dict[str, float] = field(default_factory=dict)    # gpu uuid -> joules settled
    interpolated: bool = False
    works: dict[str, Joined] = field(default_factory=dict)   # request id -> every request that joined
    # request id -> the ones not yet written as ended: what every write carries as "running" (a long
    # segment's ``works`` grows to thousands; each write walks only these)
    running: dict[str, Joined] = field(default_factory=dict)
    sequences: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0                                   # of the requests answered so far

    @property
    def method(self) -> str:
        return "interpolated" if self.interpolated else "counter"

    def settle(self, reading: EnergyReading, interval: list[GpuEnergyRow], tokens: dict[str, int]) -> None:
        """Add the joules of ``interval`` (the GPUs' rows from the last read to ``reading``), split over
        the requests by ``tokens`` (request id -> tokens processed in the interval)."""
        joules = sum(r.energy_j for r in interval)
        for r in interval:
            self.gpu_j[r.gpu_uuid] = self.gpu_j.get(r.gpu_uuid, 0.0) + r.energy_j
        self.interpolated |= any(r.method != "counter" for r in interval)
        self.energy_j += joules
        self.last = reading
        for request_id, share_j in attribute(joules, tokens).items():
            self.works[request_id].energy_j += share_j

    def rows(self, ended: list[Joined], gpus: list[GPU], simulated: bool, status: str | None = None,
             error: str | None = None) -> tuple[BatchRow, list[GpuEnergyRow], list[RequestRow]]:
        """What a write upserts: the segment's row, its per-GPU rows, and a row for every request it holds
        (``ended`` with ``status``, by default how each ended; the rest "running")."""
        batch = BatchRow(batch_id=self.batch_id, start_ns=self.start.ts_ns, first_token_ns=self.first_token_ns,
                         end_ns=self.last.ts_ns, n_requests=len(self.works), n_sequences=self.sequences,
                         prompt_tokens=self.prompt_tokens, output_tokens=self.output_tokens,
                         energy_j=self.energy_j, energy_method=self.method, simulated=int(simulated))
        gpu_rows = [GpuEnergyRow(batch_id=self.batch_id, gpu_uuid=g.uuid, node=g.node, rank=g.rank,
                                 energy_start_mj=self.start.samples[g.uuid].energy_mj,
                                 energy_end_mj=self.last.samples[g.uuid].energy_mj,
                                 energy_j=self.gpu_j.get(g.uuid, 0.0), method=self.method, simulated=int(g.simulated))
                    for g in gpus]
        # (a kill -9 leaves the running rows "running"; the next start marks them ABORTED)
        requests = [self._row(j, status or j.work.status, error, simulated) for j in ended]
        for j in ended:
            self.running.pop(j.work.request_id, None)
        # (list(): the batcher thread adds joiners meanwhile; a Joined whose output is set is on its way to
        # ``ended``: the next write carries it)
        requests += [self._row(j, "running", None, simulated) for j in list(self.running.values())
                     if j.output is None]
        return batch, gpu_rows, requests

    def join(self, request_id: str, joined: Joined) -> None:
        """``joined`` enters the segment (the batcher thread)."""
        self.works[request_id] = self.running[request_id] = joined
        self.sequences += len(joined.spec.prompts)
        self.prompt_tokens += sum(map(len, joined.spec.prompts))

    def _row(self, j: Joined, status: str, error: str | None, simulated: bool) -> RequestRow:
        out = j.output
        return j.work.row(status, simulated=simulated, error=error, batch_id=self.batch_id,
                          batch_start_ns=j.joined_ns, first_token_ns=out.first_token_ns if out else None,
                          done_ns=max(out.done_ns) if out else None,
                          output_tokens=sum(len(t) for t in out.tokens) if out else 0, energy_j=j.energy_j,
                          steps=max(out.steps) if out else j.work.checked_step)

    def result(self, j: Joined, simulated: bool) -> Result:
        """An ended request's answer."""
        out = j.output
        return Result(self.batch_id, j.work.received_ns, j.steps, out.tokens, out.finish_reasons,
                      [len(p) for p in j.spec.prompts], j.joined_ns, out.first_token_ns, max(out.done_ns),
                      j.energy_j, simulated)
