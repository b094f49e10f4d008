"""FAMO, Fast Adaptive Multitask Optimization (Liu, Liang, Liu, Stone & Liu, NeurIPS 2023).

Task logits ``xi`` give ``z = softmax(xi)``. The model's update direction is
``c * sum_t z_t * grad log(L_t - b_t + eps)`` with ``c = 1 / sum_t z_t / (L_t - b_t + eps)``
(the paper's Eq. 5): the losses weighted by ``w_t = c * z_t / (L_t - b_t + eps)``,
which sum to 1 (the returned loss is ``sum_t w_t L_t`` with ``w`` detached, whose
gradient is that direction). After the model's step, :meth:`FAMO.update` takes the
losses recomputed on the same batch, ``delta_t = log(L_t^before) - log(L_t^after)``
(shifted as above), and takes one Adam step (with L2 weight decay) on ``xi``
along ``J_softmax(xi)^T delta`` (Algorithm 1, lines 6-7). The logits and Adam's
moments are buffers: FAMO steps them itself, not your optimizer.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from gradtools.weighting._base import LossWeighting

__all__ = ["FAMO"]

_EPSILON = 1e-8


def softmax_vjp(logits: Tensor, vector: Tensor) -> Tensor:
    """``J_softmax(logits)^T vector``: ``z * (vector - <z, vector>)``."""
    z = torch.softmax(logits, dim=0)
    return z * (vector - (z * vector).sum())


class FAMO(LossWeighting):
    """Loss weights that balance the tasks' rates of improvement (positive losses).

    Args:
        num_tasks: T.
        min_losses: a lower bound ``b_t`` per task (zeros by default).
        lr: Adam's learning rate on the logits (0.025 in the paper).
        weight_decay: L2 decay on the logits (1e-3 in the paper's Algorithm 2).
        process_group: average the losses over these ranks before they set the
            weights and the logits' update, so every rank keeps the same logits.
    """

    min_losses: Tensor
    logits: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    adam_steps: Tensor
    previous_losses: Tensor

    def __init__(
        self,
        num_tasks: int,
        min_losses: Tensor | None = None,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_tasks, process_group)
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr and weight_decay must be >= 0, got {lr!r}, {weight_decay!r}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        bound = torch.zeros(num_tasks) if min_losses is None else torch.as_tensor(min_losses)
        if bound.shape != (num_tasks,):
            raise ValueError(f"min_losses must have shape [{num_tasks}], got {list(bound.shape)}")
        self.register_buffer("min_losses", bound.to(torch.float64))
        self.register_buffer("logits", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("exp_avg", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("exp_avg_sq", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("adam_steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer(
            "previous_losses", torch.full((num_tasks,), math.nan, dtype=torch.float64)
        )

    def _shifted(self, losses: Tensor) -> Tensor:
        shifted = self._average(losses.detach().to(torch.float64)) - self.min_losses + _EPSILON
        if bool((shifted <= 0).any()):
            raise ValueError(f"FAMO needs losses above min_losses, got {losses.detach().tolist()}")
        return shifted

    def _terms(self, losses: Tensor) -> Tensor:
        shifted = self._shifted(losses)
        self.previous_losses.copy_(shifted)
        z = torch.softmax(self.logits, dim=0)
        weights = (z / shifted) / (z / shifted).sum()
        self._remember(weights)
        return weights.to(device=losses.device, dtype=losses.dtype) * losses

    @torch.no_grad()
    def update(self, losses_after: Tensor | list[Tensor]) -> None:
        """One step on the logits from the losses recomputed on the same batch after the model step."""
        if bool(torch.isnan(self.previous_losses).any()):
            raise RuntimeError("FAMO.update() needs a call weighting(losses) on this batch first")
        after = torch.stack(list(losses_after)) if isinstance(losses_after, list) else losses_after
        delta = torch.log(self.previous_losses) - torch.log(self._shifted(after))
        grad = softmax_vjp(self.logits, delta) + self.weight_decay * self.logits
        self.adam_steps += 1
        step = int(self.adam_steps)
        beta1, beta2 = 0.9, 0.999
        self.exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (self.exp_avg_sq / (1 - beta2**step)).sqrt() + 1e-8
        self.logits.sub_(self.lr * (self.exp_avg / (1 - beta1**step)) / denom)
        self.previous_losses.fill_(math.nan)
