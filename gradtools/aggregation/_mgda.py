"""MGDA: the minimum-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import numpy as np

from gradtools.aggregation._base import BlockAggregator, register
from gradtools.aggregation._solvers import nonneg_qp


@register
class MGDA(BlockAggregator):
    """Multiple-gradient descent (Désidéri 2012, "Multiple-gradient descent algorithm
    (MGDA) for multiobjective optimization", C. R. Math.; as used for deep multi-task
    learning by Sener & Koltun 2018, "Multi-Task Learning as Multi-Objective
    Optimization", NeurIPS).

    Weights: ``w = argmin_{w in simplex} |sum_t w_t g_t|^2``, the minimum-norm
    point of the convex hull of the gradients, solved exactly by the active-set
    QP of :mod:`gradtools.aggregation._solvers`. Where we differ: Sener &
    Koltun's Frank-Wolfe loop (torchjd's default) stops early and only
    approximates this point.

    Convex weights, non-conflicting (``<d, g_i> >= |d|^2``), zero at strongly
    Pareto-stationary points (0 is then in the convex hull), weights unchanged
    when every gradient is scaled by one factor: see
    :mod:`gradtools.aggregation.guarantees`. Not linear under per-task scaling
    (the smallest gradient dominates). When several weight vectors give the zero
    update (a zero gradient, opposite gradients) we return the solver's. All-zero
    block: uniform weights. Heads get 1/T of their gradient.
    """

    name = "mgda"

    def block_weights(self, gram: np.ndarray, scale: float, block: int) -> np.ndarray:
        return nonneg_qp(gram, np.zeros(len(gram)), simplex=True)

    def head_weight(self, num_tasks: int) -> float:
        return 1.0 / num_tasks
