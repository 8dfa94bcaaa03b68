"""Latency objectives for goodput in the report: ``ttft_ms=…,tpot_ms=…,e2e_ms=…`` as a dict of ms.

The parser and the rule are ``llmwatts.slo``'s (shared with ``llmwatts load --slo``); the rule a request
meets them by is the ``good`` column of the ``request_join`` view (views.py): ok, and every objective set
is met by a measured value (a missing TTFT/TPOT fails an objective on it), as ``Slo.met`` decides it.
"""

from __future__ import annotations

from llmwatts.slo import SLO_KEYS
from llmwatts.slo import parse_slo as _parse


def parse_slo(text: str | None) -> dict[str, float]:
    """``"ttft_ms=200,tpot_ms=50"`` -> ``{"ttft_ms": 200.0, "tpot_ms": 50.0}``; ``InvalidArgument`` if bad."""
    slo = _parse(text)
    return {k: getattr(slo, k) for k in SLO_KEYS if getattr(slo, k) is not None}
