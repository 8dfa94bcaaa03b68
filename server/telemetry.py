"""GPU telemetry: a sampler thread for the time series, and energy reads at batch boundaries.

The sampler reads every GPU ``hz`` times a second into the server store (buffered, batched writes).
On an H100 the power and energy readings refresh about every 100 ms and one energy-counter read costs
about 4 ms (docs/../shared GPU-FACTS), so sampling above ~10 Hz adds rows, not information, and these reads
stay off the decode path: the engine never waits on them.
"""

import logging
import threading
import time
from dataclasses import dataclass

from llmwatts.server.gpu import EnergySample, GPU, GpuSample
from llmwatts.server.records import GpuEnergyRow
from llmwatts.server.store import ServerStore

log = logging.getLogger(__name__)
MAX_HZ = 100.0
# Below this a counter delta is quantised by the ~100 ms refresh: use power x time instead.
COUNTER_REFRESH_S = 0.1
FLUSH_EVERY_S = 2.0  # telemetry rows reach the DB at least this often (and in batches of 256)


def _int(value) -> int | None:
    return None if value is None else int(round(value))


def sample_row(gpu: GPU, s: GpuSample) -> dict:
    """A ``telemetry`` row (STRICT: integer columns get integers)."""
    return {
        "ts_ns": s.ts_ns, "gpu_uuid": gpu.uuid, "node": gpu.node, "rank": gpu.rank, "power_mw": _int(s.power_mw),
        "power_instant_mw": _int(s.power_instant_mw), "energy_mj": _int(s.energy_mj), "sm_pct": s.sm_pct,
        "mem_pct": s.mem_pct, "mem_used_bytes": _int(s.mem_used_bytes), "sm_clock_mhz": _int(s.sm_clock_mhz),
        "temp_c": _int(s.temp_c), "cap_mw": _int(s.cap_mw), "simulated": int(gpu.simulated),
        "mem_clock_mhz": _int(s.mem_clock_mhz), "clock_event_reasons": int(s.clock_event_reasons),
    }


class TelemetrySampler:
    """Samples every GPU at ``hz`` (0 disables) into ``store`` from a daemon thread."""

    def __init__(self, gpus: list[GPU], store: ServerStore, hz: float):
        if hz < 0 or hz > MAX_HZ:
            raise ValueError(f"telemetry rate must be between 0 and {MAX_HZ:g} Hz, got {hz:g}")
        self.gpus, self.store, self.hz = gpus, store, hz
        self._stop = threading.Event()
        self._pass = threading.Lock()  # held over one pass: its samples' reads and their adding to the store
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)

    def start(self) -> None:
        if self.hz > 0:
            self._thread.start()

    def _run(self) -> None:
        period = 1.0 / self.hz
        next_t = time.perf_counter()
        next_flush = next_t + FLUSH_EVERY_S
        while not self._stop.is_set():
            try:
                with self._pass:
                    self.store.add_telemetry([sample_row(g, g.sample()) for g in self.gpus])
                    if time.perf_counter() >= next_flush:  # a report taken while serving sees the recent tail
                        self.store.flush()
                        next_flush = time.perf_counter() + FLUSH_EVERY_S
            except Exception:  # a failed read must not kill the series; it shows as a gap
                log.exception("telemetry sample failed")
            next_t += period
            delay = next_t - time.perf_counter()
            if delay < 0:  # fell behind (slow reads): skip ahead rather than burst
                next_t = time.perf_counter()
                delay = 0
            self._stop.wait(delay)

    def flush(self) -> None:
        """Write every sample taken so far to the DB: a pass in progress (its samples may be stamped before
        now) is added first. After ``RunRegistry.end`` and before ``ExportRecords`` reads, so a reader of the
        DB file sees a run's window whole, not as of the last periodic flush (``FLUSH_EVERY_S``)."""
        with self._pass:
            self.store.flush()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.store.flush()


@dataclass
class EnergyReading:
    ts_ns: int
    perf_s: float
    samples: dict[str, EnergySample]  # gpu uuid -> its reading


class EnergyMeter:
    """Reads every GPU's cumulative energy counter (and power) at batch boundaries."""

    def __init__(self, gpus: list[GPU]):
        self.gpus = gpus

    def read(self) -> EnergyReading:
        """Every GPU's counter; stamped at the middle of the reads (an H100's counter read takes ~4 ms)."""
        ns0, perf0 = time.time_ns(), time.perf_counter()
        samples = {g.uuid: g.energy_sample() for g in self.gpus}
        ns1, perf1 = time.time_ns(), time.perf_counter()
        return EnergyReading((ns0 + ns1) // 2, (perf0 + perf1) / 2, samples)

    def total_j(self) -> float:
        """Sum of every GPU's counter, in joules (for run markers)."""
        return sum(g.energy_mj() for g in self.gpus) / 1000.0

    def between(self, start: EnergyReading, end: EnergyReading, counter_only: bool = False,
                batch_id: str = "") -> list[GpuEnergyRow]:
        """Per-GPU joules between two readings, with the method used (``counter`` or ``interpolated``).
        ``counter_only``: the counter's delta however short the interval (contiguous intervals, whose
        deltas add up to the exact total; a continuous batch's)."""
        rows = []
        for g in self.gpus:
            a, b = start.samples[g.uuid], end.samples[g.uuid]
            dt_s = end.perf_s - start.perf_s
            if b.bracket_start is not None and b.bracket_start.ts_ns >= a.ts_ns:
                # The owning rank bracketed its batch itself (gpu.remote): its own two reads, its own clock.
                a = b.bracket_start
                dt_s = (b.ts_ns - a.ts_ns) / 1e9
            delta_j = (b.energy_mj - a.energy_mj) / 1000.0
            method = "counter"
            if not g.simulated and not counter_only and (dt_s < COUNTER_REFRESH_S or delta_j <= 0):
                # Instant power where the GPU has it: the averaged reading spans ~1 s, mostly before the batch.
                power = [s.power_instant_mw if s.power_instant_mw is not None else s.power_mw for s in (a, b)]
                delta_j = sum(power) / 2 / 1000.0 * dt_s
                method = "interpolated"
            rows.append(GpuEnergyRow(batch_id=batch_id, gpu_uuid=g.uuid, node=g.node, rank=g.rank,
                                     energy_start_mj=a.energy_mj, energy_end_mj=b.energy_mj, energy_j=delta_j,
                                     method=method, simulated=int(g.simulated)))
        return rows
