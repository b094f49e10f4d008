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
    Each projection is the QP ``min v'Gv s.t. v >= e_i`` over the T x T Gram
    matrix, solved exactly by our active-set solver on the correlation matrix
    (KKT residual <= 1e-12 in units of each gradient's own norm, ridge 1e-13),
    so no task's constraint is lost when the gradients' scales differ by 1e60. torchjd solves the same
    QP with quadprog after adding 1e-4 to the diagonal of the trace-normalised
    Gram matrix, which moves its answer by up to about that much.

    Guarantees: weighted, non-conflicting (``<d, g_i> >= 0`` for every task, up
    to the solver tolerance), linear under scaling (scaling g_i by c_i > 0
    scales its projection by c_i), permutation equivariant. Heads get 1/T of
    their gradient (the weights have the mean's scale).

    Degenerate inputs: a zero gradient projects to zero and gets weight 0
    (its term is zero whatever the weight); opposite gradients
    project to zero each (update 0); T=1 gives weight 1; identical gradients
    give the mean. All-zero block: weights 1/T.
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
    NeurIPS, Eq. 11-13, applied to task gradients as in torchjd).

    Solves ``min v'Gv s.t. v >= 1/T`` with the same solver, on the correlation
    matrix, to the same tolerance as :class:`UPGrad` (torchjd: quadprog with
    the 1e-4 ridge).

    Guarantees: weighted, non-conflicting, weights unchanged when all gradients
    are scaled by one factor; not linear under per-task scaling. Heads get 1/T.
    Degenerate inputs as UPGrad.
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
