"""How a sharded engine joins its ranks: handed to the engine from outside (``server/tp.py`` builds it
from the model-parallel group), so the engine itself knows nothing of FairScale or process groups."""

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class TensorParallel:
    world: int                                              # ranks holding a slice of each layer
    all_reduce: Callable[[torch.Tensor], torch.Tensor]      # sum over the ranks (row-parallel outputs)
    min_over_ranks: Callable[[int], int]                    # the ranks' minimum of a host number
