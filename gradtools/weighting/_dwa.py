"""Dynamic Weight Average, DWA (Liu, Johns & Davison, CVPR 2019, Eq. 1).

``lambda_t = T * softmax_t(w / temperature)`` with ``w_t = L_t(e-1) / L_t(e-2)``,
the ratio of task t's average loss over the two previous epochs; uniform weights
(all 1) until two epochs have ended. Call :meth:`DWA.end_epoch` once per epoch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from gradtools.weighting._base import LossWeighting

__all__ = ["DWA"]


def dwa_weights(older: Tensor, newer: Tensor, temperature: float) -> Tensor:
    """The paper's Eq. 1 from two epochs' average losses."""
    rates = newer / older
    return rates.numel() * torch.softmax(rates / temperature, dim=0)


class DWA(LossWeighting):
    """Weights from the losses' rate of descent over the last two epochs.

    Args:
        num_tasks: T.
        temperature: the paper's T (2.0 in the paper).
        process_group: average the epoch's loss sums over these ranks at
            :meth:`end_epoch`, so every rank keeps the union's history.
    """

    loss_sum: Tensor
    num_batches: Tensor
    history: Tensor
    epochs_seen: Tensor

    def __init__(
        self,
        num_tasks: int,
        temperature: float = 2.0,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_tasks, process_group)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.register_buffer("loss_sum", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.int64))
        # Average losses of the last two finished epochs (older first), and how many exist.
        self.register_buffer("history", torch.zeros(2, num_tasks, dtype=torch.float64))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.int64))

    def _terms(self, losses: Tensor) -> Tensor:
        if int(self.epochs_seen) >= 2:
            weights = dwa_weights(self.history[0], self.history[1], self.temperature)
        else:
            weights = torch.ones(self.num_tasks, dtype=torch.float64)
        self.loss_sum += losses.detach().to(self.loss_sum)
        self.num_batches += 1
        self._remember(weights)
        return weights.to(device=losses.device, dtype=losses.dtype) * losses

    def end_epoch(self) -> None:
        """Finish the epoch: its average loss becomes the newest history entry."""
        if int(self.num_batches) == 0:
            raise RuntimeError("DWA.end_epoch(): no losses were weighted since the last one")
        average = self._average(self.loss_sum / self.num_batches.to(torch.float64))
        if bool((average <= 0).any()):
            raise ValueError(f"DWA needs positive epoch losses, got {average.tolist()}")
        self.history[0] = self.history[1]
        self.history[1] = average
        self.epochs_seen += 1
        self.loss_sum.zero_()
        self.num_batches.zero_()
