"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018).

Learnable weights ``w_t`` (renormalised to sum to T). Each call measures
``G_t = w_t * ||grad_W L_t||`` on the shared layer ``W``, the training rates
``r_t = (L_t / L_t(0)) / mean_s(L_s / L_s(0))``, and the paper's Eq. 2

    L_grad = sum_t | G_t - mean(G) * r_t ** alpha |

with the target ``mean(G) * r_t ** alpha`` held constant; its gradient
``sign(G_t - target_t) * ||grad_W L_t||`` goes into ``w.grad`` for your
optimizer to apply. The returned loss is ``sum_t w_t L_t`` with ``w`` detached
(the weights learn from ``L_grad`` only).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradtools.weighting._base import LossWeighting

__all__ = ["GradNorm", "gradnorm_weight_gradient"]


def gradnorm_weight_gradient(
    weights: Tensor, grad_norms: Tensor, losses: Tensor, initial_losses: Tensor, alpha: float
) -> Tensor:
    """``d L_grad / d w`` (Eq. 2, target constant) from the per-task gradient norms on W."""
    g = weights * grad_norms
    ratios = losses / initial_losses
    rates = ratios / ratios.mean()
    target = g.mean() * rates**alpha
    return torch.sign(g - target) * grad_norms


class GradNorm(LossWeighting):
    """Gradient-normalised loss weights; give ``parameters()`` to your optimizer.

    Args:
        num_tasks: T.
        shared: the parameters of the last shared layer (the paper's ``W``).
        alpha: the asymmetry hyperparameter (the paper uses 0.12 to 3.0; 1.5 for NYUv2).
        process_group: average each task's gradient on ``W`` and the losses over
            these ranks, so every rank computes the union's update.

    Call ``zero_grad()`` on the optimizer before ``weighting(losses)``: the call
    writes ``w.grad``.
    """

    initial_losses: Tensor
    started: Tensor

    def __init__(
        self,
        num_tasks: int,
        shared: Iterable[Tensor],
        alpha: float = 1.5,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_tasks, process_group)
        if isinstance(shared, Tensor):
            shared = [shared]
        self.shared = [p for p in shared]
        if not self.shared or not all(
            isinstance(p, Tensor) and p.requires_grad for p in self.shared
        ):
            raise ValueError("shared must be a non-empty iterable of tensors that require grad")
        self.alpha = float(alpha)
        self.loss_weights = nn.Parameter(torch.ones(num_tasks))
        self.register_buffer("initial_losses", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def _terms(self, losses: Tensor) -> Tensor:
        with torch.no_grad():  # the paper's renormalisation: sum_t w_t = T
            self.loss_weights.mul_(self.num_tasks / self.loss_weights.sum())
        rows = []
        for t in range(self.num_tasks):
            grads = torch.autograd.grad(
                losses[t], self.shared, retain_graph=True, allow_unused=True
            )
            rows.append(torch.cat([
                (torch.zeros_like(p) if g is None else g).reshape(-1).to(torch.float64)
                for p, g in zip(self.shared, grads, strict=True)
            ]))  # fmt: skip
        per_task = self._average(torch.stack(rows))
        detached = self._average(losses.detach().to(torch.float64))
        if not bool(self.started):
            self.initial_losses.copy_(detached)
            self.started.fill_(True)
        w = self.loss_weights.detach().to(torch.float64)
        step = gradnorm_weight_gradient(
            w, per_task.norm(dim=1), detached, self.initial_losses, self.alpha
        )
        step = step.to(self.loss_weights)
        if self.loss_weights.grad is None:
            self.loss_weights.grad = step
        else:
            self.loss_weights.grad += step
        self._remember(w)
        return self.loss_weights.detach().to(losses.dtype) * losses
