"""Latency objectives for goodput: ``ttft_ms=…,tpot_ms=…,e2e_ms=…`` parsed into a dict of ms.

The parser is the load generator's (``llmwatts.loadgen.summary.parse_slo``) where that module exists, so
``llmwatts load --slo`` and ``llmwatts report --slo`` accept the same text; the rule a request meets them by
is the ``good`` column of the ``request_join`` view (views.py): ok, and every objective set is met by a
measured value (a missing TTFT/TPOT fails an objective on it), as ``Slo.met`` decides it for the summary.
"""

from __future__ import annotations

import math

from llmwatts.errors import InvalidArgument

SLO_KEYS = ("ttft_ms", "tpot_ms", "e2e_ms")


def parse_slo(text: str | None) -> dict[str, float]:
    """``"ttft_ms=200,tpot_ms=50"`` -> ``{"ttft_ms": 200.0, "tpot_ms": 50.0}``; ``InvalidArgument`` if bad."""
    if not text:
        return {}
    try:
        from llmwatts.loadgen.summary import parse_slo as loadgen_parse
    except ImportError:
        loadgen_parse = None
    if loadgen_parse is not None:
        slo = loadgen_parse(text)
        return {k: getattr(slo, k) for k in SLO_KEYS if getattr(slo, k) is not None}
    values: dict[str, float] = {}
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
    return values
