"""GradVac: steer every pairwise gradient cosine towards its running average."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

from gradtools.aggregation._base import (
    Aggregation,
    Aggregator,
    checked_gram,
    gram_precision,
    keyed_state,
    register,
    required_draw,
    resolve_block_keys,
)
from gradtools.aggregation._gram import norms_and_correlation_lists
from gradtools.aggregation._pcgrad import draw_orders, validate_orders


@register
class GradVac(Aggregator):
    """Gradient Vaccine (Wang et al. 2021, "Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models", ICLR).

    Like PCGrad, each task i visits the other tasks j in a random order (from
    :meth:`draw`); with ``phi`` the cosine of the *current* g_i and the original
    g_j and ``phi_hat[i, j]`` its exponential moving average, when
    ``phi < phi_hat`` it adds the multiple of g_j that raises the cosine to
    ``phi_hat`` (the paper's Eq. 3):

        g_i += |g_i| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2))
               / (|g_j| sqrt(1 - phi_hat^2)) g_j

    then ``phi_hat[i, j] <- (1 - beta) phi_hat[i, j] + beta phi``. The combined
    gradient is the sum of the modified g_i. The targets, one ``[T, T]`` matrix per
    block key (see :meth:`Aggregator.aggregate`: under :class:`gradtools.MultiTask`
    one per parameter or group, so a tensor that some task reaches on some steps
    only keeps its own targets), start at 0 and are the state (``state_dict``),
    so a resumed run continues exactly. As in PCGrad, the walk runs in the basis of unit
    gradients on the correlation matrix, so any gradient scale stays finite.

    Differences from torchjd 0.18 (which follows the same equations): no
    ``eps`` in the denominators (torchjd adds 1e-8, which depends on the
    gradients' scale); a pair involving a zero gradient is skipped and its
    target left unchanged (torchjd averages a cosine of 0 in); a target with
    ``1 - phi_hat^2 <= 1e-12`` cannot be reached by a finite multiple of g_j and
    is skipped (torchjd divides by eps); the orders come from the wrapper's
    generator, not the global one.

    Guarantees: weighted; weights unchanged when all gradients are scaled by one
    factor. Not non-conflicting, not linear under scaling. Heads get their full
    gradient (sum's scale). With targets at 0 and beta irrelevant, the first step
    is PCGrad's.
    """

    name = "gradvac"

    def __init__(self, beta: float = 0.5) -> None:
        if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
            raise ValueError(f"beta must be in [0, 1], got {beta!r}")
        self.beta = float(beta)
        self._targets: dict[Hashable, Tensor] = {}

    def draw(self, num_tasks: int, generator: torch.Generator | None) -> Tensor:
        return draw_orders(num_tasks, generator)

    def aggregate(
        self,
        gram: Tensor,
        draw: Tensor | None,
        *,
        precision: float | None = None,
        block_keys: Sequence[Hashable] | None = None,
    ) -> Aggregation:
        gram_precision(gram, precision)  # validated; the walk is continuous in the Gram
        gram = checked_gram(gram)
        num_blocks, num_tasks, _ = gram.shape
        keys = resolve_block_keys(block_keys, num_blocks, "GradVac")
        draw = required_draw(draw, "GradVac", "the visiting orders")
        validate_orders(draw, num_tasks)
        for key in keys:
            held = self._targets.get(key)
            if held is not None and held.shape[0] != num_tasks:
                raise ValueError(
                    f"GradVac holds targets for {held.shape[0]} tasks in block {key!r} but got "
                    f"{num_tasks} tasks; the number of tasks must not change"
                )
        orders = draw.tolist()
        weights = []
        for block, key in zip(gram.tolist(), keys, strict=True):
            held = self._targets.get(key)
            targets = (
                [[0.0] * num_tasks for _ in range(num_tasks)] if held is None else held.tolist()
            )
            weights.append(_gradvac_block(block, orders, targets, self.beta))
            self._targets[key] = torch.tensor(targets, dtype=torch.float64)
        return Aggregation(torch.tensor(weights, dtype=torch.float64))

    def state_dict(self) -> dict[str, Any]:
        return {"targets": {key: t.clone() for key, t in self._targets.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"targets"}
        if unknown:
            raise ValueError(f"GradVac.load_state_dict got unexpected keys {sorted(unknown)}")
        held = keyed_state(state.get("targets"), 2, "GradVac", "targets")
        for key, t in held.items():
            if t.shape[0] != t.shape[1]:
                raise ValueError(f"GradVac state 'targets'[{key!r}] must be a [T, T] tensor")
        self._targets = held

    def __repr__(self) -> str:
        return f"GradVac(beta={self.beta})"


def _gradvac_block(
    gram: list[list[float]], orders: list[list[int]], targets: list[list[float]], beta: float
) -> list[float]:
    """GradVac on one Gram block; updates ``targets`` in place, returns the weights."""
    num_tasks = len(gram)
    norms, nonzero, inv, corr = norms_and_correlation_lists(gram)
    weights = [0.0] * num_tasks
    for i in range(num_tasks):
        # basis[k]: coefficient of g_i^vac / |g_i| on the unit vector g_k / |g_k|;
        # along[k] = <g_i^vac, u_k> / |g_i| and squared = |g_i^vac|^2 / |g_i|^2, both
        # kept up to date as basis changes so each pair costs O(T).
        basis = [0.0] * num_tasks
        basis[i] = 1.0
        along = list(corr[i])
        squared = 1.0
        for j in orders[i]:
            if not (nonzero[i] and nonzero[j]):
                continue
            length = math.sqrt(max(squared, 0.0))
            phi = min(1.0, max(-1.0, along[j] / length)) if length > 0.0 else 0.0
            target = targets[i][j]
            room = 1.0 - target * target
            if phi < target and room > 1e-12:
                step = (
                    length
                    * (target * math.sqrt(1.0 - phi * phi) - phi * math.sqrt(room))
                    / math.sqrt(room)
                )
                basis[j] += step
                squared += 2.0 * step * along[j] + step * step
                row = corr[j]
                for k in range(num_tasks):
                    along[k] += step * row[k]
            targets[i][j] = (1.0 - beta) * target + beta * phi
        for j in range(num_tasks):
            weights[j] += basis[j] if j == i else (basis[j] * norms[i]) * inv[j]
    return weights
