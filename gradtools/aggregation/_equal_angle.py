"""IMTL-G and ConFIG: the direction that makes the same angle with every task gradient."""

from __future__ import annotations

import math

import numpy as np

from gradtools.aggregation._base import FLOAT64_EPS, BlockAggregator, register
from gradtools.aggregation._gram import _ZERO_NORM
from gradtools.aggregation._solvers import psd_pinv


def equal_angle_coefficients(gram: np.ndarray, precision: float) -> tuple[np.ndarray, bool]:
    """Coefficients c with ``<sum_t c_t g_t, u_i> = 1`` for every unit vector ``u_i = g_i/|g_i|``.

    That is ``c = D^-1 R^+ 1`` with R the correlation matrix and D the norms,
    worked out on R so that the gradients' scales never meet in one product;
    R's eigenvalues below the Gram's precision count as zero (see
    :func:`~gradtools.aggregation._solvers.noise_floor`). Zero gradients get
    coefficient 0.

    Returns ``(c, exists)``. ``exists`` says whether the equations can be met:
    whether the all-ones vector lies in R's range, to within ``sqrt(T * precision)``
    of its length. When it does not (e.g. rank-one gradients whose signs differ),
    c is the least-squares solution, whose projections are not equal; when the
    all-ones vector has no component in R's range beyond that slack (e.g.
    opposite gradients), c is 0.
    """
    norms = np.sqrt(np.clip(gram.diagonal(), 0.0, None))
    nonzero = norms > _ZERO_NORM
    coefficients = np.zeros(len(gram))
    if not nonzero.any():
        return coefficients, False
    n = norms[nonzero]
    corr = gram[np.ix_(nonzero, nonzero)] / n[:, None] / n[None, :]
    ones = np.ones(len(n))
    solution = psd_pinv(corr, precision) @ ones
    reached = corr @ solution  # the all-ones vector's component in R's range
    slack = math.sqrt(len(gram) * precision) * math.sqrt(len(n))
    if math.sqrt(float(reached @ reached)) <= slack:
        # Nothing of it is in R's range (e.g. opposite gradients): what the
        # pseudo-inverse returns is rounding noise, which the normalisations of
        # IMTL-G and ConFIG would blow up to order one.
        return coefficients, False
    miss = reached - ones
    exists = math.sqrt(float(miss @ miss)) <= slack
    coefficients[nonzero] = solution / n
    return coefficients, exists


@register
class IMTLG(BlockAggregator):
    """IMTL-G, the gradient half of Impartial Multi-Task Learning (Liu et al. 2021,
    "Towards Impartial Multi-task Learning", ICLR).

    The combination ``d = sum w_t g_t`` with ``sum w_t = 1`` whose projections on
    every task's unit gradient are equal: ``w = c / sum(c)`` with
    ``c = D^-1 R^+ 1`` (R the correlation matrix, D the gradient norms; for
    independent gradients, the paper's closed form).

    When no such direction exists at the Gram's precision (the all-ones vector
    is not in R's range: more tasks than the gradients' rank, in general, or
    rank-one gradients whose signs differ), c is the least-squares solution (R's
    eigenvalues below the precision dropped, so rounding noise never enters),
    still normalised to ``sum w = 1``: its projections are as equal as the span
    allows, not equal. When ``sum(c)`` vanishes (relative to ``sum |c|``, by
    ``max(1e-12, T * precision)``; e.g. rank-one gradients whose signs cancel)
    the weights are all zero. Both cases are flagged in the step's statistics
    (:attr:`gradtools.MultiTaskStats.undefined`). The pseudo-inverse on R makes
    the direction independent of how dependent gradients' norms compare.

    Zero gradients get weight 0; T=1 gives weight 1. Heads get 1/T of their
    gradient. The properties asserted for it are in
    :mod:`gradtools.aggregation.guarantees`.
    """

    name = "imtlg"
    may_be_undefined = True

    def block_weights(self, gram: np.ndarray, scale: float, block: int) -> np.ndarray:
        return self.block_weights_at(gram, scale, block, FLOAT64_EPS)[0]

    def block_weights_at(
        self, gram: np.ndarray, scale: float, block: int, precision: float
    ) -> tuple[np.ndarray, bool]:
        v, exists = equal_angle_coefficients(gram, precision)
        total = float(v.sum())
        vanishing = abs(total) <= max(1e-12, len(gram) * precision) * float(np.abs(v).sum())
        if vanishing:
            return np.zeros(len(gram)), True
        return v / total, not exists

    def head_weight(self, num_tasks: int) -> float:
        return 1.0 / num_tasks


@register
class ConFIG(BlockAggregator):
    """ConFIG (Liu et al. 2024, "ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks", ICLR 2025; Eq. 2, equal preference).

    Direction: the unit vector ``u = normalize(U^+ 1)`` (U the matrix of unit task
    gradients), which makes the same angle with every task; length: the sum of
    the gradients' projections on it, ``sum_i <g_i, u>``. On the Gram matrix,
    ``U^+ 1 = U' R^+ 1``, so the weights are ``c * sum_i <g_i, d_c> / |d_c|^2`` with c
    from :func:`equal_angle_coefficients` (R's eigenvalues below the Gram's
    precision count as zero; where no equal-angle direction exists, U^+ 1 is the
    least-squares one).

    Scaling task i's gradient by ``a_i > 0`` leaves u unchanged and scales its
    projection on u by a_i: the update is linear under scaling in the sense of
    :mod:`gradtools.aggregation.guarantees`. Non-conflicting when the gradients
    are linearly independent (every ``<d, g_i>`` has the sign of the length,
    then positive). Zero gradients get weight 0 and count 0 in the length; an
    all-zero direction gives zero weights. Heads get their full gradient
    (sum's scale).
    """

    name = "config"

    def block_weights(self, gram: np.ndarray, scale: float, block: int) -> np.ndarray:
        return self.block_weights_at(gram, scale, block, FLOAT64_EPS)[0]

    def block_weights_at(
        self, gram: np.ndarray, scale: float, block: int, precision: float
    ) -> tuple[np.ndarray, bool]:
        c, _ = equal_angle_coefficients(gram, precision)
        projections = gram @ c
        squared = float(c @ projections)
        if squared <= 0.0:
            return np.zeros(len(gram)), False
        return c * (float(projections.sum()) / squared), False
