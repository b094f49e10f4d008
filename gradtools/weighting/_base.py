"""The interface every loss-weighting method implements.

A loss weighting maps the T task losses of a step to one scalar loss, with
per-task weights that it learns (Uncertainty weighting, IMTL-L, GradNorm), that
follow the losses' history (DWA, FAMO) or that it draws (RLW). It is an
``nn.Module``: learnable weights are parameters (give them to your optimizer,
any optimizer), running state lives in buffers, and both are in ``state_dict()``.

``weighting(losses)`` returns the scalar to backpropagate; ``weighting.weights``
the weights the last call used. ``weighting.task_losses(losses)`` returns the T
weighted per-task terms instead, so that a :class:`gradtools.MultiTask` can
aggregate them (``opt.backward(weighting.task_losses(losses))``): with the
``Sum`` aggregator that is exactly ``weighting(losses).backward()``.

Under data parallelism, pass ``process_group``: running statistics and the
weights' own gradients are averaged over its ranks, so every rank keeps the same
state (random draws come from a seeded generator, the same on every rank).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["LossWeighting", "checked_task_losses"]


def checked_task_losses(losses: Sequence[Tensor] | Tensor, num_tasks: int) -> Tensor:
    """The losses as one 1-D tensor of ``num_tasks`` entries (differentiable)."""
    if isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(
                f"losses must be a sequence of scalars or a 1-D tensor, got shape {list(losses.shape)}"
            )
        stacked = losses
    else:
        listed = list(losses)
        for t, loss in enumerate(listed):
            if not isinstance(loss, Tensor):
                raise TypeError(f"losses[{t}] must be a Tensor, got {type(loss).__name__}")
            if loss.numel() != 1:
                raise ValueError(f"losses[{t}] must be a scalar, got shape {list(loss.shape)}")
        if not listed:
            raise ValueError("losses is empty: pass one scalar loss per task")
        stacked = torch.stack([loss.reshape(()) for loss in listed])
    if stacked.shape[0] != num_tasks:
        raise ValueError(f"got {stacked.shape[0]} losses for a weighting of {num_tasks} tasks")
    if not stacked.is_floating_point():
        raise TypeError(f"losses must be floating point, got {stacked.dtype}")
    if not bool(torch.isfinite(stacked.detach()).all()):
        raise ValueError(f"losses hold inf or NaN: {stacked.detach().tolist()}")
    return stacked


class LossWeighting(nn.Module, abc.ABC):
    """Maps T task losses to one loss; see the module docstring."""

    last_weights: Tensor

    def __init__(self, num_tasks: int, process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        self.num_tasks = num_tasks
        self.process_group = process_group
        self.register_buffer("last_weights", torch.ones(num_tasks))

    @property
    def weights(self) -> Tensor:
        """The per-task weights of the last call (detached; ones before the first)."""
        return self.last_weights.clone()

    def forward(self, losses: Sequence[Tensor] | Tensor) -> Tensor:
        """The scalar loss to backpropagate."""
        return self._terms(checked_task_losses(losses, self.num_tasks)).sum()

    def task_losses(self, losses: Sequence[Tensor] | Tensor) -> list[Tensor]:
        """The T weighted per-task terms whose sum is ``self(losses)``."""
        stacked = checked_task_losses(losses, self.num_tasks)
        terms = self._terms(stacked)
        return list(terms.unbind())

    @abc.abstractmethod
    def _terms(self, losses: Tensor) -> Tensor:
        """``[T]`` per-task terms from the ``[T]`` losses; sets ``last_weights``."""

    def _remember(self, weights: Tensor) -> None:
        self.last_weights.copy_(weights.detach().to(self.last_weights))

    def _average(self, value: Tensor) -> Tensor:
        """``value`` averaged over ``process_group`` (itself without one)."""
        if self.process_group is None:
            return value
        shipped = value.detach().clone()
        dist.all_reduce(shipped, group=self.process_group)
        return shipped / dist.get_world_size(self.process_group)

    def _average_gradients_of(self, parameter: nn.Parameter) -> None:
        """Average a learnable weight's gradient over the ranks as soon as it is accumulated."""
        if self.process_group is None:
            return

        def hook(p: Tensor) -> None:
            assert p.grad is not None
            p.grad.copy_(self._average(p.grad))

        parameter.register_post_accumulate_grad_hook(hook)
