"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

Each task has a learnable log-variance ``s_t = log sigma_t^2``; the loss is
``sum_t 0.5 * exp(-s_t) * L_t + 0.5 * s_t`` (the paper's Eq. 7 for a Gaussian
likelihood, written in ``s`` for stability). The weights are ``0.5 * exp(-s_t)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradtools.weighting._base import LossWeighting

__all__ = ["UncertaintyWeighting"]


class UncertaintyWeighting(LossWeighting):
    """Learned homoscedastic-uncertainty weights; give ``parameters()`` to your optimizer.

    Args:
        num_tasks: T.
        init_log_variance: the initial ``s_t`` (0: every weight 0.5; LibMTL starts at -0.5).
        process_group: average ``s``'s gradient over these ranks (not needed when the
            module is inside a DistributedDataParallel model).
    """

    def __init__(
        self,
        num_tasks: int,
        init_log_variance: float = 0.0,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_tasks, process_group)
        self.log_variance = nn.Parameter(torch.full((num_tasks,), float(init_log_variance)))
        self._average_gradients_of(self.log_variance)

    def _terms(self, losses: Tensor) -> Tensor:
        s = self.log_variance.to(losses.dtype)
        weights = 0.5 * torch.exp(-s)
        self._remember(weights)
        return weights * losses + 0.5 * s
