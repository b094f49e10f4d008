"""Random loss weighting, RLW (Lin et al., TMLR 2022, Algorithm 2 with a normal draw).

Each call draws ``z ~ N(0, I_T)`` and weights the losses by ``softmax(z)``. The
draws come from this module's own seeded generator, whose state is in
``state_dict()``: every DDP rank seeded alike draws alike, and a resumed run
continues the same sequence.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gradtools.weighting._base import LossWeighting

__all__ = ["RLW"]


class RLW(LossWeighting):
    """Random weights on the simplex, redrawn every call.

    Args:
        num_tasks: T.
        seed: the generator's seed (use the same on every rank).
    """

    def __init__(
        self, num_tasks: int, seed: int = 0, process_group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__(num_tasks, process_group)
        self.generator = torch.Generator().manual_seed(seed)

    def _terms(self, losses: Tensor) -> Tensor:
        z = torch.randn(self.num_tasks, generator=self.generator, dtype=torch.float64)
        weights = torch.softmax(z, dim=0).to(device=losses.device, dtype=losses.dtype)
        self._remember(weights)
        return weights * losses

    def get_extra_state(self) -> Any:
        """The generator's state, saved in ``state_dict()`` so a resumed run draws on."""
        return {"generator_state": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        """Restore the generator's state saved by :meth:`get_extra_state`."""
        self.generator.set_state(state["generator_state"])
