"""IMTL-L, the loss-balancing half of Impartial Multi-Task Learning (Liu et al., ICLR 2021).

Each task has a learnable scale ``s_t``; the loss is ``sum_t exp(s_t) * L_t - s_t``
(the paper's Eq. 4), whose optimum in ``s_t`` makes every scaled loss
``exp(s_t) * L_t`` equal to 1. The weights are ``exp(s_t)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradtools.weighting._base import LossWeighting

__all__ = ["IMTLL"]


class IMTLL(LossWeighting):
    """Learned loss scales; give ``parameters()`` to your optimizer (losses must be positive).

    Args:
        num_tasks: T.
        process_group: average ``s``'s gradient over these ranks (not needed when the
            module is inside a DistributedDataParallel model).
    """

    def __init__(self, num_tasks: int, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(num_tasks, process_group)
        self.log_scale = nn.Parameter(torch.zeros(num_tasks))
        self._average_gradients_of(self.log_scale)

    def _terms(self, losses: Tensor) -> Tensor:
        s = self.log_scale.to(losses.dtype)
        weights = torch.exp(s)
        self._remember(weights)
        return weights * losses - s
