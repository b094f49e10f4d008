"""PCGrad as a wrapper around any ``torch.optim.Optimizer``: :class:`MultiTask` with the PCGrad aggregator.

Usage::

    opt = PCGrad(torch.optim.AdamW(model.parameters(), lr=2e-5))
    opt.zero_grad()
    opt.backward([loss_a, loss_b, loss_c])   # call again to accumulate
    opt.step()
    opt.stats                                # cosines, conflicts, weights, ...

The machinery (per-task backward, Gram blocks, DDP, statistics) is
:class:`gradtools.MultiTask`'s; the projection math is
:class:`gradtools.aggregation.PCGrad`'s. This class keeps PCGrad's historical
signature and its ``state_dict`` entry (``"pcgrad"``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from gradtools import aggregation as agg
from gradtools.aggregation import Reduction
from gradtools.multitask import Granularity, MultiTask, PlainBackward
from gradtools.multitask_stats import PCGradStats

__all__ = ["Granularity", "PCGrad", "PCGradStats"]


class PCGrad(MultiTask):
    """Projecting Conflicting Gradients (Yu et al. 2020) around an inner optimizer.

    For each task i, the other tasks j != i are visited in a fresh random order;
    whenever the current g_i^PC has a negative dot product with the *original*
    g_j, its component along g_j is removed. The update is the sum (or mean) of the
    g_i^PC on the parameters that two or more tasks share; a parameter only one task
    reaches (a task head) gets that task's plain gradient, under the same reduction.

    Args:
        optimizer: the inner optimizer that applies the combined gradient.
        reduction: ``"sum"`` (the paper) or ``"mean"`` of the task gradients, for
            shared and task-specific parameters alike.
        generator: draws the per-task visiting orders; seed it for reproducible
            runs. ``None`` creates a private generator seeded from torch's global RNG.
        shared_params, granularity, process_group, gradient_buckets, plain_backward:
            as for :class:`gradtools.MultiTask` (the visiting orders are the draw
            broadcast from the first rank under ``process_group``).

    Closures (LBFGS) are supported as described in :class:`gradtools.MultiTask`.
    """

    _STATE_KEY = "pcgrad"

    def __init__(
        self,
        optimizer: Optimizer,
        reduction: Reduction = "sum",
        generator: torch.Generator | None = None,
        *,
        shared_params: Iterable[torch.Tensor] | None = None,
        granularity: Granularity = "all",
        process_group: dist.ProcessGroup | None = None,
        gradient_buckets: bool | None = None,
        plain_backward: PlainBackward = "warn",
    ) -> None:
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        super().__init__(
            optimizer,
            agg.PCGrad(reduction),
            granularity=granularity,
            generator=generator,
            shared_params=shared_params,
            process_group=process_group,
            gradient_buckets=gradient_buckets,
            plain_backward=plain_backward,
        )
        self.reduction: Reduction = reduction

    def _describe(self) -> str:
        return f"reduction={self.reduction!r}"

    def _wrapper_state(self) -> dict[str, Any]:
        # The format PCGrad always had (the aggregator is stateless).
        return {
            "generator_state": self.generator.get_state(),
            "reduction": self.reduction,
            "granularity": self.granularity,
        }
