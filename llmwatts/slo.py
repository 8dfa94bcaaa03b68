"""Latency objectives (SLOs) for goodput, and the one rule a request meets them by.

``llmwatts load --slo`` (the load summary) and ``llmwatts report --slo`` (the study DB's ``good`` column,
analysis/views.py) parse the same text with ``parse_slo`` and apply the same rule as ``Slo.met``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmwatts.errors import InvalidArgument

SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")


@dataclass(frozen=True)
class Slo:
    """Latency objectives, each optional (ms). A request is *good* when it succeeded and meets every one set."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def __bool__(self) -> bool:
        return any(getattr(self, k) is not None for k in SLO_KEYS)

    def met(self, status: str, ttft_ms: float | None, tpot_ms: float | None, latency_ms: float | None) -> bool:
        """The one goodput rule: status ok and every objective set is met (a missing measure fails it)."""
        if status != "ok":
            return False
        for bound, value in ((self.ttft_ms, ttft_ms), (self.tpot_ms, tpot_ms), (self.e2e_ms, latency_ms)):
            if bound is not None and (value is None or value > bound):
                return False
        return True

    def to_text(self) -> str:
        return ",".join(f"{k}={getattr(self, k):g}" for k in SLO_KEYS if getattr(self, k) is not None)


def parse_slo(text: str | None) -> Slo:
    """``"ttft_ms=200,tpot_ms=50,e2e_ms=5000"`` (any subset) → ``Slo``."""
    if not text:
        return Slo()
    values = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or key not in SLO_KEYS or not (math.isfinite(number) and number > 0) or key in values:
            raise InvalidArgument(f"--slo wants KEY=MS pairs of {', '.join(SLO_KEYS)} separated by commas, "
                                  f"each a positive number once, e.g. ttft_ms=500,tpot_ms=50; got {text!r}")
        values[key] = number
    return Slo(**values)
