"""UPGrad and DualProj: projections onto the dual cone of the task gradients."""

from __future__ import annotations

import numpy as np

from gradtools.aggregation._base import BlockAggregator, register
from gradtools.aggregation._gram import norms_and_correlation_np
from gradtools.aggregation._solvers import nonneg_qp


def project_onto_dual_cone(corr: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """Weights v on the *unit* gradients with ``U'v`` the projection of ``U'floor`` onto the dual cone.

    By Quinton & Rey (2024), Proposition 1, projecting ``J'u`` onto
    ``{x : <x, g_j> >= 0 for all j}`` is ``J'v`` with ``v = argmin v'Gv s.t. v >= u``.
    The cone does not change when a gradient is rescaled, so we solve it on the
    correlation matrix R (unit gradients u_j = g_j/|g_j|), where the constraint
    reads ``v >= floor = D u``; with ``v = floor + y`` that is
    ``min 1/2 y'Ry + (R floor)'y`` over ``y >= 0``. Every task's constraint is then
    enforced relative to its own norm, whatever the gradients' scales.
    """
    return floor + nonneg_qp(corr, corr @ floor)


@register
class UPGrad(BlockAggregator):
    """UPGrad (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization",
    arXiv:2406.16232).

    Each task gradient g_i is projected onto the dual cone of all gradients
    (the directions that conflict with none), and the projections are averaged.
    Each projection is the QP ``min v'Gv s.t. v >= e_i``, solved exactly by our
    active-set solver on the correlation matrix, so every task's constraint is
    enforced relative to its own norm whatever the spread of scales. Where we
    differ: no ridge on the Gram matrix (torchjd adds 1e-4 to the
    trace-normalised Gram, which moves its answer by about that much).

    Non-conflicting, linear under scaling, permutation invariant, and zero at
    strongly Pareto-stationary points: see :mod:`gradtools.aggregation.guarantees`
    for the table and the precision each holds to (the QP is exact for the Gram
    it is given; MultiTask builds it in float64, exact for the stored gradients).
    A zero gradient gets weight 0, opposite gradients give a zero update, T=1
    gives weight 1, identical gradients give the mean, an all-zero block 1/T.
    Heads get 1/T of their gradient (the weights have the mean's scale).
    """

    name = "upgrad"

    def block_weights(self, gram: np.ndarray, scale: float, block: int) -> np.ndarray:
        num_tasks = len(gram)
        norms, nonzero, corr = norms_and_correlation_np(gram)
        inv = np.where(nonzero, 1.0 / np.where(nonzero, norms, 1.0), 0.0)
        on_units = np.zeros(num_tasks)
        for i in np.flatnonzero(nonzero):
            # Projection of g_i = |g_i| u_i: the cone QP is positively homogeneous.
            floor = np.zeros(num_tasks)
            floor[i] = 1.0
            on_units += norms[i] * project_onto_dual_cone(corr, floor)
        return on_units * inv / num_tasks

    def head_weight(self, num_tasks: int) -> float:
        return 1.0 / num_tasks


@register
class DualProj(BlockAggregator):
    """DualProj: the mean gradient projected onto the dual cone of the task gradients
    (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning",
    NeurIPS, Eq. 11-13, applied to task gradients).

    Solves ``min v'Gv s.t. v >= 1/T`` exactly, on the correlation matrix, as
    :class:`UPGrad` does (no ridge). Non-conflicting and zero at strongly
    Pareto-stationary points (:mod:`gradtools.aggregation.guarantees`); not
    linear under per-task scaling. Heads get 1/T. Degenerate inputs as UPGrad.
    """

    name = "dualproj"

    def block_weights(self, gram: np.ndarray, scale: float, block: int) -> np.ndarray:
        num_tasks = len(gram)
        norms, nonzero, corr = norms_and_correlation_np(gram)
        inv = np.where(nonzero, 1.0 / np.where(nonzero, norms, 1.0), 0.0)
        # The mean gradient on the unit gradients: coefficient |g_t| / T on u_t.
        on_units = project_onto_dual_cone(corr, norms / num_tasks)
        return on_units * inv

    def head_weight(self, num_tasks: int) -> float:
        return 1.0 / num_tasks
