"""CAGrad: the best worst-case improvement in a ball around the mean gradient."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradtools.aggregation._base import FLOAT64_EPS, BlockAggregator, register
from gradtools.aggregation._solvers import QP_RIDGE, QP_TOL, nonneg_qp

# numpy 2.4's bundled stubs hide or mistype some numpy functions for mypy 2.4.
_linalg: Any = np.linalg
_np: Any = np

# Relative bracket width (on s) at which the one-dimensional search stops.
_SEARCH_TOL = 1e-13
# Accuracy of |g_w|^2 (relative to the largest squared gradient norm) that the
# search and the active-set QP deliver on an exact Gram: a few times their own
# tolerances. The Gram's own precision adds to it (see stationary_threshold).
_QP_ACCURACY = 10.0 * (QP_TOL + QP_RIDGE + _SEARCH_TOL)


def stationary_threshold(precision: float) -> float:
    """|g_w| (relative to the largest gradient norm) at or below which g_w cannot be told from 0.

    With every ``G_ij`` known to ``precision * |g_i| |g_j|`` and w on the simplex,
    ``|g_w|^2 = w'Gw`` is known to ``precision * (sum_i w_i |g_i|)^2 <= precision``
    (in units of the largest squared norm), plus the solver's own accuracy; |g_w|
    to the square root of that: about 3.5e-6 for float64 gradients, 3.5e-4 for
    float32 ones.
    """
    return math.sqrt(_QP_ACCURACY + precision)


@register
class CAGrad(BlockAggregator):
    """Conflict-Averse Gradient descent (Liu et al. 2021, "Conflict-Averse Gradient
    Descent for Multi-task Learning", NeurIPS; Algorithm 1).

    With g0 the mean gradient and ``sqrt(phi) = c |g0|``, CAGrad solves the dual
    ``min_{w in simplex} F(w) = <g_w, g0> + sqrt(phi) |g_w|`` (``g_w = sum w_t g_t``)
    and returns ``d = g0 + (sqrt(phi) / |g_w|) g_w``. We solve the dual without a
    conic solver: writing ``|x| = min_t |x|^2/(2t) + t/2`` turns it into a family of
    simplex QPs ``min 1/2 w'Gw + s <g_w, g0>`` (solved exactly by the active-set QP)
    and a one-dimensional root ``c |g0| s = |g_{w(s)}|``, found by a
    bracketing search whose steps solve the root exactly on the current QP
    support (the solution is affine in s there), to 1e-13 (the sign of
    ``c |g0| s - |g_w(s)|`` is that of the derivative of a convex function of s,
    so the bracket stays valid).

    Weights unchanged when every gradient is scaled by one factor; c = 0 gives
    the mean; for c < 1 it converges to a Pareto-stationary point (the paper's
    theorem). Not non-conflicting in general, not linear under scaling. Like the
    paper we do not divide by ``1 + c^2`` (the official code's ``rescale``
    option does). Heads get 1/T of their gradient.

    Pareto stationarity: when the dual solution's ``|g_w|`` cannot be told from
    0 at the Gram's precision (:func:`stationary_threshold`: the square root of
    the accuracy of ``|g_w|^2``, about 3.5e-6 of the largest gradient norm for
    float64 gradients and 3.5e-4 for float32 ones), the weights are zero.
    For c >= 1 that is the exact answer at a strongly Pareto-stationary point
    (the zero update is then feasible and optimal); dividing by a ``|g_w|`` made
    of rounding noise would instead point the update anywhere. g0 = 0 gives the
    mean (a zero update); T = 1 gives weight 1 + c. The guarantees and their
    precision are in :mod:`gradtools.aggregation.guarantees`.
    """

    name = "cagrad"

    def __init__(self, c: float = 0.4) -> None:
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0):
            raise ValueError(f"c must be a finite number >= 0, got {c!r}")
        self.c = float(c)

    def block_weights(self, gram: np.ndarray, scale: float, block: int) -> np.ndarray:
        return self.block_weights_at(gram, scale, block, FLOAT64_EPS)[0]

    def block_weights_at(
        self, gram: np.ndarray, scale: float, block: int, precision: float
    ) -> tuple[np.ndarray, bool]:
        return self._weights(gram, precision), False

    def _weights(self, gram: np.ndarray, precision: float) -> np.ndarray:
        num_tasks = len(gram)
        mean = np.full(num_tasks, 1.0 / num_tasks)
        toward_mean = gram @ mean  # <g_t, g0>
        radius = self.c * math.sqrt(max(float(mean @ toward_mean), 0.0))
        if radius <= 1e-15:
            return mean
        # The root of radius * s = |g_w(s)| lies in [0, 1/radius] since |g_w| <= 1 here.
        lo, hi = 0.0, 1.0 / radius
        s = 0.5 * hi
        w = None
        for _ in range(100):
            w = nonneg_qp(gram, s * toward_mean, simplex=True, start=w)
            gap = radius * s - math.sqrt(max(float(w @ gram @ w), 0.0))
            if abs(gap) <= _SEARCH_TOL:
                break
            if gap > 0.0:
                hi = s
            else:
                lo = s
            if hi - lo <= _SEARCH_TOL * (1.0 / radius):
                break
            guess = _root_on_support(gram, toward_mean, radius, w > 0.0, s, lo, hi)
            s = guess if guess is not None else 0.5 * (lo + hi)
        assert w is not None
        norm = math.sqrt(max(float(w @ gram @ w), 0.0))
        if norm <= stationary_threshold(precision):
            return np.zeros(num_tasks)
        return mean + (radius / norm) * w

    def head_weight(self, num_tasks: int) -> float:
        return 1.0 / num_tasks

    def __repr__(self) -> str:
        return f"CAGrad(c={self.c})"


def _root_on_support(
    gram: np.ndarray,
    toward_mean: np.ndarray,
    radius: float,
    support: np.ndarray,
    s: float,
    lo: float,
    hi: float,
) -> float | None:
    """Where ``radius * s = |g_w(s)|`` if the QP's support stayed ``support``, or None.

    On a fixed support the simplex QP's solution is affine in s, w = w0 + s w1,
    so the condition is a quadratic equation in s: this is the step that makes
    the search converge in a few QP solves instead of dozens of bisections.
    """
    index = np.flatnonzero(support)
    q = gram[index[:, None], index[None, :]] + QP_RIDGE * np.eye(len(index))
    try:
        sol = _linalg.solve(q, _np.stack([np.ones(len(index)), toward_mean[index]], axis=1))
    except _linalg.LinAlgError:
        return None
    x, p = sol[:, 0], sol[:, 1]
    w0 = np.zeros(len(gram))
    w1 = np.zeros(len(gram))
    w0[index] = x / x.sum()
    w1[index] = -p + x * (p.sum() / x.sum())
    a = float(w1 @ gram @ w1) - radius * radius
    b = 2.0 * float(w0 @ gram @ w1)
    c = float(w0 @ gram @ w0)
    if abs(a) <= 1e-15 * (abs(b) + abs(c)):
        roots = [-c / b] if b != 0.0 else []
    else:
        disc = b * b - 4.0 * a * c
        if disc < 0.0:
            return None
        root = math.sqrt(disc)
        roots = [(-b - root) / (2.0 * a), (-b + root) / (2.0 * a)]
    inside = [r for r in roots if lo < r < hi]
    return min(inside, key=lambda r: abs(r - s)) if inside else None
