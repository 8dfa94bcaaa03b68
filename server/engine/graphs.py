"""CUDA graphs: capturing a step (decode or join) once per static shape and replaying it, and the pinned
host buffers a step's tokens come back through.

A decode step is one fixed-shape function (embed -> layers -> sample); captured, a step costs one graph
launch instead of ~1,000 kernel launches. A sharded model's all-reduces are captured with the rest.
"""

from typing import Callable

import torch

from llmwatts.server.engine.cache import Workspace


def step_buffers(n: int, device: torch.device) -> list[tuple[torch.Tensor, "torch.cuda.Event | None"]]:
    """Two (host buffer [n], event) pairs, pinned on CUDA: step ``t``'s tokens are copied into pair
    ``t % 2`` without blocking while step ``t + 1`` is queued, and the event says when they arrived."""
    cuda = device.type == "cuda"
    return [(torch.empty(n, dtype=torch.long, pin_memory=cuda), torch.cuda.Event() if cuda else None)
            for _ in range(2)]


def capture(ws: Workspace, key: tuple, body: Callable[[], None], device: torch.device, state: tuple = (),
            on_failure: Callable[[], bool] | None = None) -> "torch.cuda.CUDAGraph":
    """Capture ``body`` into ``ws.graphs[key]``: warm up (compiles, autotunes), then capture. The warm-up
    writes what the coming replay writes anyway (a decode step's cache slots, a join's rows); ``state``
    (the step's inputs) and the RNG are restored afterwards. If a warm-up run raises, ``on_failure()``
    says whether to run it again (the engine fell back to uncompiled layers) or re-raise."""
    saved = [t.clone() for t in state]
    rng = torch.cuda.get_rng_state(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            try:
                body()
            except Exception:
                if on_failure is None or not on_failure():
                    raise
                body()
            for t, v in zip(state, saved):
                t.copy_(v)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.set_rng_state(rng, device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=ws.pool):
        body()
    ws.graphs[key] = graph
    return graph

