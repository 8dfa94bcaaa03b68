"""The one percentile definition of llmwatts (load summaries and the report both use it).

Method: numpy's default, ``method="linear"`` (Hyndman & Fan type 7): sort the n values, take the
fractional rank ``r = p/100 · (n − 1)`` (0-based) and interpolate linearly between the values at
``floor(r)`` and ``ceil(r)``. So p0 is the minimum, p100 the maximum, p50 of an even count the mean of the
two middle values. It is exact on the raw values (no histogram binning, unlike Locust's own rounded stats).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from llmwatts.errors import InvalidArgument

METHOD = "linear"  # numpy.percentile's method; named in docs/loadgen.md and docs/analysis.md


def percentile(values: Iterable[float | None], pct: float) -> float | None:
    """The ``pct``-th percentile (0..100) of ``values`` by numpy's ``linear`` method.

    ``None`` values are skipped; an empty input gives ``None``. Raises ``InvalidArgument`` for a ``pct``
    outside 0..100 or not a number.
    """
    return percentiles(values, (pct,))[0]


def percentiles(values: Iterable[float | None], pcts: Iterable[float]) -> list[float | None]:
    """Several percentiles of the same values in one sort (see ``percentile``)."""
    pcts = [float(p) for p in pcts]
    for p in pcts:
        if math.isnan(p) or not 0 <= p <= 100:
            raise InvalidArgument(f"percentile must be within 0..100, got {p}")
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":  # numbers already: no None to skip
        data = values
    else:
        data = np.asarray([v for v in values if v is not None], dtype=float)
    if data.size == 0:
        return [None] * len(pcts)
    return [float(x) for x in np.percentile(data, pcts, method=METHOD)]
