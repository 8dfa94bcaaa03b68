"""Open-loop arrivals: when each request of a ``--rate`` run is due, independent of the replies.

Inter-arrival gaps (seconds) at rate ``R`` requests/s:

* ``poisson`` — exponential with mean ``1/R`` (a Poisson process);
* ``constant`` — exactly ``1/R``;
* ``gamma`` — gamma with shape ``B`` (``--burstiness``) and scale ``1/(R·B)``, as vLLM's
  ``benchmarks/serve`` defines it: mean ``1/R`` at every ``B``; ``B = 1`` is Poisson, ``B < 1`` burstier,
  ``B > 1`` more regular.

The gaps are drawn from numpy's ``Generator`` seeded by ``(seed, node)``, so a run's schedule is
repeatable, and each load worker of a distributed run draws its own stream at its share of the rate.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from llmwatts.errors import InvalidArgument

if TYPE_CHECKING:  # numpy is imported where gaps are drawn: `llmwatts`'s parsers read ARRIVALS only
    import numpy as np

ARRIVALS = ("poisson", "constant", "gamma")


def check_arrivals(rate_rps: float | None, arrival: str, burstiness: float) -> None:
    """Raise ``InvalidArgument`` naming the flag to fix."""
    if arrival not in ARRIVALS:
        raise InvalidArgument(f"--arrival must be one of {', '.join(ARRIVALS)}, got {arrival!r}")
    if rate_rps is not None and not (math.isfinite(rate_rps) and rate_rps > 0):
        raise InvalidArgument(f"--rate must be a positive number of requests per second, got {rate_rps}")
    if not (math.isfinite(burstiness) and burstiness > 0):
        raise InvalidArgument(f"--burstiness must be a positive number, got {burstiness}")
    if burstiness != 1.0 and arrival != "gamma":
        raise InvalidArgument("--burstiness applies to --arrival gamma only")


def gaps_s(rate_rps: float, arrival: str, burstiness: float, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` inter-arrival gaps in seconds (see the module docstring)."""
    import numpy as np

    if arrival == "constant":
        return np.full(n, 1.0 / rate_rps)
    if arrival == "poisson":
        return rng.exponential(1.0 / rate_rps, n)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate_rps * burstiness), size=n)


class ArrivalSchedule:
    """The due times of one node's arrivals. ``next_due()`` hands them out in order; the first is due at
    the first call (the schedule's anchor), each next one a gap later, however late the sender is."""

    BLOCK = 1024  # gaps drawn at a time

    def __init__(self, rate_rps: float, arrival: str = "poisson", burstiness: float = 1.0, seed: int = 0,
                 node: int = 0):
        import numpy as np

        check_arrivals(rate_rps, arrival, burstiness)
        self.rate_rps = rate_rps
        self.arrival = arrival
        self.burstiness = burstiness
        self._rng = np.random.default_rng([seed, node])
        self._gaps: list[float] = []
        self._due_perf_ns: int | None = None
        self._anchor_wall_minus_perf_ns = 0

    def next_due(self) -> tuple[int, int]:
        """``(due_perf_ns, due_wall_ns)`` of the next arrival: perf_counter for sleeping, wall clock to record."""
        if self._due_perf_ns is None:
            now_perf = time.perf_counter_ns()
            self._anchor_wall_minus_perf_ns = time.time_ns() - now_perf
            self._due_perf_ns = now_perf
        else:
            if not self._gaps:
                self._gaps = gaps_s(self.rate_rps, self.arrival, self.burstiness, self._rng, self.BLOCK).tolist()[::-1]
            self._due_perf_ns += round(self._gaps.pop() * 1e9)
        return self._due_perf_ns, self._due_perf_ns + self._anchor_wall_minus_perf_ns
