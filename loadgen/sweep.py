"""Sweeps of power caps and/or arrival rates: for each cap, set it over the Control RPC (leased), then run
one load per rate (``--rates``; or one closed-loop load), labelled with the cap and the rate; the caps are
reset when the sweep ends, however it ends. The report then splits runs by cap and
shows the latency-vs-energy trade-off and the SLA choice.

Importing this module imports Locust (through ``runner``): keep it out of server processes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

from llmwatts.cap_client import CapClient
from llmwatts.errors import InvalidArgument, LlmwattsError
from llmwatts.loadgen.config import LoadConfig, new_run_id
from llmwatts.loadgen.summary import LoadResult
from llmwatts.loadgen.runner import run_load

log = logging.getLogger("llmwatts.loadgen")
CONTROL_TIMEOUT_S = 30.0


@dataclass
class SweepStep:
    cap_w: float | None         # None: the sweep sets no cap
    result: LoadResult
    rate_rps: float | None = None  # None: closed loop

    def title(self) -> str:
        parts = ([f"cap {self.cap_w:g} W"] if self.cap_w is not None else []) + (
            [f"rate {self.rate_rps:g}/s"] if self.rate_rps is not None else [])
        return ", ".join(parts) or "run"


def parse_caps(text: str) -> list[float]:
    """``"250,175,150"`` → watts, each a finite positive number (the server checks the GPU's range)."""
    return _positive_list(text, "--caps wants watts separated by commas, e.g. 250,200,175,150")


def parse_rates(text: str) -> list[float]:
    """``"1,2,4"`` → requests/s, each a finite positive number."""
    return _positive_list(text, "--rates wants requests/s separated by commas, e.g. 0.5,1,2,4")


def _positive_list(text: str, message: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise InvalidArgument(f"{message}; got {text!r}")
    return values


def run_sweep(config: LoadConfig, *, caps_w: list[float] | None = None, rates_rps: list[float] | None = None,
              gpus: str | list[str] | None = None, lease_s: float = 0.0,
              control_token: str | None = None) -> list[SweepStep]:
    """One load run per cap × rate, caps outermost, in the order given. Run ids are
    ``<run_id>[-cap<W>][-rate<R>]``, labelled ``cap_w`` / ``rate_rps`` and ``sweep``. Without caps no cap
    is touched (and no control token is needed); without rates each run is ``config``'s own loop."""
    config.validate()
    if config.master or config.worker:
        raise InvalidArgument("a sweep runs local loads; run distributed loads per cap with `llmwatts load`")
    if not caps_w and not rates_rps:
        raise InvalidArgument("a sweep needs --caps and/or --rates")
    base = config.run_id or new_run_id()
    steps: list[SweepStep] = []
    if not caps_w:
        for rate in rates_rps:
            steps.append(_run_step(config, base, None, rate))
        return steps
    caps = CapClient(config.target, token=control_token, ca=config.ca, cert=config.cert, key=config.key,
                     timeout_s=CONTROL_TIMEOUT_S, gpus=gpus)
    changed = False  # reset only what this sweep changed: a refused first set leaves nothing to undo
    try:
        caps.check_caps(caps_w)  # every cap in range before the first cell runs
        for cap_w in caps_w:
            caps.set(cap_w, lease_s=lease_s, reason=f"sweep {base}")
            changed = True
            for rate in rates_rps or [None]:
                steps.append(_run_step(config, base, cap_w, rate))
    finally:
        try:
            if changed:
                caps.reset(reason=f"sweep {base} done")
        except LlmwattsError as e:  # the lease still restores the cap; say so rather than hide the first error
            log.error("could not reset the caps after the sweep (%s); their lease will restore them", e)
        caps.close()
    return steps


def _run_step(config: LoadConfig, base: str, cap_w: float | None, rate_rps: float | None) -> SweepStep:
    run_id, labels = base, {**config.labels, "sweep": base}
    if cap_w is not None:
        run_id, labels["cap_w"] = f"{run_id}-cap{cap_w:g}", f"{cap_w:g}"
    if rate_rps is not None:
        run_id = f"{run_id}-rate{rate_rps:g}"
    step_config = replace(config, run_id=run_id, labels=labels,
                          rate_rps=rate_rps if rate_rps is not None else config.rate_rps)
    step = SweepStep(cap_w, run_load(step_config), rate_rps)
    log.info("%s: %s", step.title(), step.result.summary().splitlines()[0])
    return step
