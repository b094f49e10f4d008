"""Random loss weighting (RLW)."""

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
    required_draw,
)


@register
class Random(Aggregator):
    """Random loss weighting (Lin et al. 2022, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR; Algorithm 2).

    Each step draws ``z ~ N(0, I_T)`` from the wrapper's seeded generator
    (:meth:`draw`) and weights the tasks by ``softmax(z)``, the same weights for
    every block. Guarantees: weighted, linear under scaling (the weights do not
    depend on the gradients), non-negative weights summing to one. Not
    non-conflicting. Heads get 1/T of their own gradient, the weights' mean
    (the paper weights each head by its task's weight; this interface has one
    head weight for all tasks).
    """

    name = "random"

    def draw(self, num_tasks: int, generator: torch.Generator | None) -> Tensor:
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        return torch.randn(num_tasks, generator=generator, dtype=torch.float64)

    def aggregate(
        self,
        gram: Tensor,
        draw: Tensor | None,
        *,
        precision: float | None = None,
        block_keys: Sequence[Hashable] | None = None,
    ) -> Aggregation:
        gram_precision(gram, precision)  # validated; the weights do not depend on the Gram
        gram = checked_gram(gram)
        num_blocks, num_tasks, _ = gram.shape
        draw = required_draw(draw, "Random", "its normal draw")
        if draw.shape != (num_tasks,) or not draw.is_floating_point():
            raise ValueError(
                f"draw must be a float tensor of shape [{num_tasks}], got {draw.dtype} {list(draw.shape)}"
            )
        weights = torch.softmax(draw.detach().to("cpu", torch.float64), dim=0)
        return Aggregation(weights.expand(num_blocks, num_tasks).clone())

    def head_weight(self, num_tasks: int) -> float:
        return 1.0 / num_tasks
