"""What a multi-task step saw and did: the geometry of the task gradients and the weights applied."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gradtools.aggregation import cosine_similarity, magnitude_similarity

__all__ = ["MultiTaskStats", "PCGradStats"]


@dataclass(frozen=True)
class MultiTaskStats:
    """What the last combination saw and did, for logging or plotting (CPU tensors).

    The geometry is measured on the shared parameters (those the aggregator runs on).

    Attributes:
        cosine: ``[T, T]`` pairwise cosine similarity of the original task gradients.
        magnitude_similarity: ``[T, T]`` Phi(g_i, g_j) = 2|g_i||g_j| / (|g_i|^2 + |g_j|^2).
        conflicts: ``[T, T]`` bool, True where two different tasks' gradients conflict
            (negative dot product).
        projected: ``[..., T, T]`` bool, True where task i was projected onto task j
            (one ``[T, T]`` per block: the whole shared vector, a group, or a tensor);
            ``None`` for aggregators that do not project pairwise (all but PCGrad).
        weights: ``[..., T]`` per-task weights applied to the shared parameters, one
            row per block; the reduction (``"mean"`` divides by T) is included.
        grad_norms: ``[T]`` norm of each task's gradient on the shared parameters.
        draw: the aggregator's random draw for this step (PCGrad: ``[T, T-1]``, the
            order in which each task visited the others), ``None`` if it draws nothing.
        num_shared: number of shared parameter tensors.
        nonfinite_tasks: indices of tasks whose gradient holds inf or NaN; when not
            empty, no aggregation ran (``.grad`` holds the plain combination so that a
            GradScaler skips the step) and the other fields are NaN.
        aggregator: the aggregator's name.
        undefined: bool, one per block (a 0-dim tensor with ``granularity="all"``):
            True where the aggregator's direction does not exist at the gradients'
            precision and its documented fallback was used (IMTL-G without an
            equal-angle direction); ``None`` for aggregators whose direction
            always exists.
    """

    cosine: Tensor
    magnitude_similarity: Tensor
    conflicts: Tensor
    projected: Tensor | None
    weights: Tensor
    grad_norms: Tensor
    draw: Tensor | None
    num_shared: int
    nonfinite_tasks: tuple[int, ...]
    aggregator: str = "pcgrad"
    undefined: Tensor | None = None

    @property
    def orders(self) -> Tensor | None:
        """PCGrad's visiting orders: the name :class:`PCGradStats` always had for ``draw``."""
        return self.draw


# The name the statistics had when PCGrad was the only method.
PCGradStats = MultiTaskStats


def step_stats(
    shared_blocks: Tensor,
    log2_unit: int,
    projected: Tensor | None,
    weights: Tensor,
    draw: Tensor | None,
    num_shared: int,
    aggregator: str,
    *,
    squeeze: bool,
    undefined: Tensor | None = None,
) -> MultiTaskStats:
    """Statistics from the shared Gram blocks (in units of ``2 ** log2_unit``) and the weights."""
    gram = shared_blocks.sum(0)
    num_tasks = gram.shape[-1]
    off_diagonal = ~torch.eye(num_tasks, dtype=torch.bool)
    norms = torch.ldexp(gram.diagonal().clamp(min=0).sqrt(), torch.tensor(log2_unit))
    return MultiTaskStats(
        cosine=cosine_similarity(gram),
        magnitude_similarity=magnitude_similarity(gram),
        conflicts=(gram < 0) & off_diagonal,
        projected=None if projected is None else (projected[0] if squeeze else projected),
        weights=weights[0] if squeeze else weights,
        grad_norms=norms,
        draw=draw,
        num_shared=num_shared,
        nonfinite_tasks=(),
        aggregator=aggregator,
        undefined=None if undefined is None else (undefined[0] if squeeze else undefined),
    )


def nonfinite_stats(
    num_tasks: int,
    draw: Tensor | None,
    num_shared: int,
    nonfinite: tuple[int, ...],
    aggregator: str,
    *,
    projects: bool,
) -> MultiTaskStats:
    """Statistics of a step whose task gradients held inf or NaN (nothing was aggregated)."""
    nan = torch.full((num_tasks, num_tasks), math.nan, dtype=torch.float64)
    no_projection = torch.zeros(num_tasks, num_tasks, dtype=torch.bool)
    return MultiTaskStats(
        cosine=nan,
        magnitude_similarity=nan.clone(),
        conflicts=torch.zeros(num_tasks, num_tasks, dtype=torch.bool),
        projected=no_projection if projects else None,
        weights=torch.full((num_tasks,), math.nan, dtype=torch.float64),
        grad_norms=torch.full((num_tasks,), math.nan, dtype=torch.float64),
        draw=draw,
        num_shared=num_shared,
        nonfinite_tasks=nonfinite,
        aggregator=aggregator,
    )
