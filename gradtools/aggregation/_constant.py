"""Sum and Mean: fixed weights, the plain multi-task baselines."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from gradtools.aggregation._base import (
    Aggregation,
    Aggregator,
    checked_gram,
    gram_precision,
    register,
)


@register
class Sum(Aggregator):
    """Sum of the task gradients, ``sum_t g_t`` (the gradient of the summed loss).

    Guarantees: weighted, linear under scaling (scaling task i's gradient by
    c_i >= 0 scales its term by c_i), permutation equivariant. Not
    non-conflicting: a large gradient can overwhelm a smaller opposite one.
    Degenerate inputs: none; weights are always 1.
    """

    name = "sum"

    def aggregate(
        self,
        gram: Tensor,
        draw: Tensor | None,
        *,
        precision: float | None = None,
        block_keys: Sequence[Hashable] | None = None,
    ) -> Aggregation:
        gram_precision(gram, precision)  # validated; fixed weights need none
        gram = checked_gram(gram)
        return Aggregation(torch.ones(gram.shape[:2], dtype=torch.float64))


@register
class Mean(Aggregator):
    """Mean of the task gradients, ``(1/T) sum_t g_t``; heads get 1/T of their gradient too.

    Guarantees: as :class:`Sum` (weighted, linear under scaling), scaled by 1/T.
    """

    name = "mean"

    def aggregate(
        self,
        gram: Tensor,
        draw: Tensor | None,
        *,
        precision: float | None = None,
        block_keys: Sequence[Hashable] | None = None,
    ) -> Aggregation:
        gram_precision(gram, precision)  # validated; fixed weights need none
        gram = checked_gram(gram)
        num_tasks = gram.shape[-1]
        return Aggregation(torch.full(gram.shape[:2], 1.0 / num_tasks, dtype=torch.float64))

    def head_weight(self, num_tasks: int) -> float:
        return 1.0 / num_tasks
