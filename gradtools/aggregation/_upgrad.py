"""UPGrad and DualProj: projections onto the dual cone of the task gradients."""

from __future__ import annotations

import numpy as np

from gradtools.aggregation._base import BlockAggregator, register
from gradtools.aggregation._solvers import nonneg_qp


def project_onto_dual_cone(gram: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Weights v with ``J'v`` the projection of ``J'u`` onto ``{x : <x, g_j> >= 0 for all j}``.

    By Quinton & Rey (2024), Proposition 1, ``v = argmin v'Gv s.t. v >= u``;
    with ``v = u + y`` that is ``min 1/2 y'Gy + (Gu)'y`` over ``y >= 0``.
    """
    return u + nonneg_qp(gram, gram @ u)


@register
class UPGrad(BlockAggregator):
    """UPGrad (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization",
    arXiv:2406.16232).

    Each task gradient g_i is projected onto the dual cone of all gradients
    (the directions that conflict with none), and the projections are averaged.
    Each projection is the QP ``min v'Gv s.t. v >= e_i`` over the T x T Gram
    matrix, solved exactly by our active-set solver (KKT residual <= 1e-12
    relative to the largest squared norm, ridge 1e-13). torchjd solves the same
    QP with quadprog after adding 1e-4 to the diagonal of the trace-normalised
    Gram matrix, which moves its answer by up to about that much.

    Guarantees: weighted, non-conflicting (``<d, g_i> >= 0`` for every task, up
    to the solver tolerance), linear under scaling (scaling g_i by c_i > 0
    scales its projection by c_i), permutation equivariant. Heads get 1/T of
    their gradient (the weights have the mean's scale).

    Degenerate inputs: a zero gradient projects to zero; opposite gradients
    project to zero each (update 0); T=1 gives weight 1; identical gradients
    give the mean. All-zero block: weights 1/T.
    """

    name = "upgrad"

    def block_weights(self, gram: np.ndarray, scale: float, block: int) -> np.ndarray:
        num_tasks = len(gram)
        eye = np.eye(num_tasks)
        projections = [project_onto_dual_cone(gram, eye[i]) for i in range(num_tasks)]
        return sum(projections[1:], projections[0]) / num_tasks

    def head_weight(self, num_tasks: int) -> float:
        return 1.0 / num_tasks


@register
class DualProj(BlockAggregator):
    """DualProj: the mean gradient projected onto the dual cone of the task gradients
    (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for Continual Learning",
    NeurIPS, Eq. 11-13, applied to task gradients as in torchjd).

    Solves ``min v'Gv s.t. v >= 1/T`` with the same solver and tolerance as
    :class:`UPGrad` (torchjd: quadprog with the 1e-4 ridge).

    Guarantees: weighted, non-conflicting, weights unchanged when all gradients
    are scaled by one factor; not linear under per-task scaling. Heads get 1/T.
    Degenerate inputs as UPGrad.
    """

    name = "dualproj"

    def block_weights(self, gram: np.ndarray, scale: float, block: int) -> np.ndarray:
        num_tasks = len(gram)
        return project_onto_dual_cone(gram, np.full(num_tasks, 1.0 / num_tasks))

    def head_weight(self, num_tasks: int) -> float:
        return 1.0 / num_tasks
