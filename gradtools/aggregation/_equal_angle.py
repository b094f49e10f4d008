"""IMTL-G and ConFIG: the direction that makes the same angle with every task gradient."""

from __future__ import annotations

import numpy as np

from gradtools.aggregation._base import BlockAggregator, register
from gradtools.aggregation._gram import _ZERO_NORM
from gradtools.aggregation._solvers import psd_pinv


def equal_angle_coefficients(gram: np.ndarray) -> np.ndarray:
    """Coefficients c with ``<sum_t c_t g_t, u_i> = 1`` for every unit vector ``u_i = g_i/|g_i|``.

    That is ``c = D^-1 R^+ 1`` with R the correlation matrix and D the norms,
    worked out on R so that the gradients' scales never meet in one product.
    When the unit vectors are linearly dependent, R^+ gives the least-squares
    solution. Zero gradients get coefficient 0.
    """
    norms = np.sqrt(np.clip(gram.diagonal(), 0.0, None))
    nonzero = norms > _ZERO_NORM
    coefficients = np.zeros(len(gram))
    if not nonzero.any():
        return coefficients
    n = norms[nonzero]
    corr = gram[np.ix_(nonzero, nonzero)] / n[:, None] / n[None, :]
    coefficients[nonzero] = (psd_pinv(corr) @ np.ones(len(n))) / n
    return coefficients


@register
class IMTLG(BlockAggregator):
    """IMTL-G, the gradient half of Impartial Multi-Task Learning (Liu et al. 2021,
    "Towards Impartial Multi-task Learning", ICLR).

    Finds the combination ``d = sum w_t g_t`` with ``sum w_t = 1`` whose
    projections on every task's unit gradient are equal. For linearly
    independent gradients this is the paper's closed form, and equals torchjd's
    ``pinv(G) |g|`` normalised. With dependent gradients we take the
    least-squares solution on the correlation matrix, ``D^-1 R^+ 1``, while torchjd
    takes ``pinv(G) |g|``; the two differ then (ours does not depend on how the
    dependent gradients' norms compare).

    Guarantees: weighted, weights sum to 1 and do not change when all
    gradients are scaled by one factor; for independent gradients with a
    positive weight sum, every task improves equally (in angle). Not linear
    under scaling. Heads get 1/T of their gradient.

    Degenerate inputs: zero gradients get weight 0; if the weights sum to
    (nearly) zero, relative to their magnitudes by 1e-12, all weights are 0
    (torchjd: below an absolute 1e-12, which also fires for any gradients with
    norms above about 1e6, since the sum scales as 1/|g|). T=1 gives weight 1.
    """

    name = "imtlg"

    def block_weights(self, gram: np.ndarray, scale: float, block: int) -> np.ndarray:
        v = equal_angle_coefficients(gram)
        total = float(v.sum())
        if abs(total) <= 1e-12 * float(np.abs(v).sum()) or total == 0.0:
            return np.zeros(len(gram))
        return v / total

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
    from :func:`equal_angle_coefficients` and ``d_c = sum c_t g_t``.

    Guarantees: weighted; non-conflicting when the gradients are linearly
    independent (every ``<d, g_i>`` has the sign of the length, which is then
    positive); weights unchanged when all gradients are scaled by one factor.
    Not linear under scaling. Heads get their full gradient (sum's scale).

    Degenerate inputs: zero gradients get weight 0 and count 0 in the length;
    an all-zero direction gives zero weights.
    """

    name = "config"

    def block_weights(self, gram: np.ndarray, scale: float, block: int) -> np.ndarray:
        c = equal_angle_coefficients(gram)
        projections = gram @ c
        squared = float(c @ projections)
        if squared <= 0.0:
            return np.zeros(len(gram))
        return c * (float(projections.sum()) / squared)
