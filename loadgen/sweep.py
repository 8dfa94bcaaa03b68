"""Power-cap sweeps: for each cap, set it over the Control RPC (leased), run one load, label the run with
the cap; the caps are reset when the sweep ends, however it ends. The report then splits runs by cap and
shows the latency-vs-energy trade-off and the SLA choice.

Importing this module imports Locust (through ``runner``): keep it out of server processes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import grpc

from llmwatts.errors import InvalidArgument
from llmwatts.loadgen.config import LoadConfig, LoadResult, new_run_id
from llmwatts.loadgen.runner import run_load
from llmwatts.server.auth import client_channel
from llmwatts.server.cap_cli import rpc_error, selector_of
from llmwatts.v1 import llmwatts_pb2 as pb
from llmwatts.v1 import llmwatts_pb2_grpc as pb_grpc

log = logging.getLogger("llmwatts.loadgen")
CONTROL_TIMEOUT_S = 30.0


@dataclass
class SweepStep:
    cap_w: float
    result: LoadResult


def parse_caps(text: str) -> list[float]:
    """``"250,175,150"`` → watts, each a finite positive number (the server checks the GPU's range)."""
    try:
        caps = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        caps = []
    if not caps or not all(math.isfinite(c) and c > 0 for c in caps):
        raise InvalidArgument(f"--caps wants watts separated by commas, e.g. 250,200,175,150; got {text!r}")
    return caps


def run_cap_sweep(config: LoadConfig, caps_w: list[float], *, gpus: list[str] | None = None,
                  lease_s: float = 0.0, control_token: str | None = None) -> list[SweepStep]:
    """One load run per cap, in the order given. Run ids are ``<run_id>-cap<W>`` with label ``cap_w``."""
    config.validate()
    if config.master or config.worker:
        raise InvalidArgument("a sweep runs local loads; run distributed loads per cap with `llmwatts load`")
    base = config.run_id or new_run_id()
    channel = client_channel(config.target, ca=config.ca, cert=config.cert, key=config.key, token=control_token)
    control = pb_grpc.ControlStub(channel)
    selector = selector_of(gpus)
    steps = []
    changed = False  # reset only what this sweep changed: a refused first set leaves nothing to undo
    try:
        for cap_w in caps_w:
            try:
                control.SetPowerCap(pb.SetPowerCapRequest(selector=selector, cap_w=cap_w, lease_s=lease_s,
                                                          reason=f"sweep {base}"), timeout=CONTROL_TIMEOUT_S)
            except grpc.RpcError as e:
                raise rpc_error(e, config.target) from None
            changed = True
            step_config = replace(config, run_id=f"{base}-cap{cap_w:g}",
                                  labels={**config.labels, "cap_w": f"{cap_w:g}", "sweep": base})
            steps.append(SweepStep(cap_w, run_load(step_config)))
            log.info("cap %g W: %s", cap_w, steps[-1].result.summary().splitlines()[0])
    finally:
        try:
            if changed:
                control.ResetPowerCap(pb.ResetPowerCapRequest(selector=selector, reason=f"sweep {base} done"),
                                      timeout=CONTROL_TIMEOUT_S)
        except grpc.RpcError as e:  # the lease still restores the cap; say so rather than hide the first error
            log.error("could not reset the caps after the sweep (%s); their lease will restore them",
                      rpc_error(e, config.target))
        channel.close()
    return steps
