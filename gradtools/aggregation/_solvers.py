"""Small dense solvers for the T x T sub-problems of the aggregators (numpy, float64).

T is a handful (2..20), so these work on tiny dense matrices where numpy's
per-call overhead (about a microsecond) beats torch's by an order of magnitude.
All of them expect an input already rescaled to order one (a Gram matrix
divided by its largest diagonal entry), so their absolute tolerances are
relative ones.

- :func:`nonneg_qp`: ``min 1/2 y'Qy + c'y`` over ``y >= 0`` or over the
  probability simplex, by a primal active-set method (Lawson and Hanson's NNLS
  scheme, applied to the Gram form). It terminates in finitely many steps and
  returns a point whose reduced gradient is at least ``-QP_TOL`` on every
  inactive coordinate (the KKT conditions to that tolerance). ``Q`` gets a
  ridge of ``QP_RIDGE`` so that every free-set system is non-singular even when
  the gradients are linearly dependent.
- :func:`power_balance`: the positive ``x`` with ``(Qx)_i = k_i x_i^(-1/a)`` (Nash-MTL
  for a = 1, FairGrad in general), by damped Newton on a strictly convex
  potential, to a relative residual of ``BALANCE_TOL`` or until a step leaves
  x unchanged.
- :func:`psd_pinv`: pseudo-inverse of a symmetric PSD matrix by eigendecomposition,
  dropping the eigenvalues below :func:`noise_floor`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# numpy 2.4's bundled stubs hide or mistype some numpy functions for mypy 2.4.
_linalg: Any = np.linalg
_np: Any = np

# Dual feasibility tolerance of the active-set QP, on an order-one Q.
QP_TOL = 1e-12
# Added to the diagonal of an order-one Q: keeps free-set systems invertible when
# gradients are linearly dependent, moving the solution by about this much.
QP_RIDGE = 1e-13
# Relative residual |x_i^(1/a) (Qx)_i - 1| at which power_balance stops.
BALANCE_TOL = 1e-10
# Ridge of power_balance: without it the balance has no solution when a
# non-negative combination of the gradients vanishes (e.g. opposite gradients).
BALANCE_RIDGE = 1e-8


def _solve_free(q: np.ndarray, c: np.ndarray, free: list[int], simplex: bool) -> np.ndarray:
    """Minimiser of the quadratic over the coordinates in ``free`` (others fixed at 0)."""
    z = np.zeros(len(c))
    if not free:
        return z
    index = _np.asarray(free, dtype=np.int64)
    qf = q[index[:, None], index[None, :]]
    if simplex:
        # KKT of the equality: z = y + nu x with Q y = -c, Q x = 1 and nu set by sum(z) = 1.
        rhs = np.empty((len(index), 2))
        rhs[:, 0] = -c[index]
        rhs[:, 1] = 1.0
        sol = _solve(qf, rhs)
        y, x = sol[:, 0], sol[:, 1]
        z[index] = y + x * ((1.0 - y.sum()) / x.sum())
    else:
        z[index] = _solve(qf, -c[index])
    return z


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    try:
        return _linalg.solve(a, b)
    except _linalg.LinAlgError:  # singular despite the ridge: least squares
        return _linalg.lstsq(a, b, rcond=None)[0]


def nonneg_qp(
    q: np.ndarray, c: np.ndarray, simplex: bool = False, start: np.ndarray | None = None
) -> np.ndarray:
    """Minimise ``1/2 y'Qy + c'y`` over ``y >= 0`` (and ``sum(y) = 1`` if ``simplex``).

    ``Q`` must be symmetric PSD with entries of order one; ``start`` is an
    optional feasible warm start. The problem must be bounded below (it always
    is on the simplex; over ``y >= 0`` it is when ``c`` lies in ``Q``'s range
    with ``c = Qu`` for some ``u >= 0``, as in every caller here).
    """
    n = len(c)
    q = q + QP_RIDGE * np.eye(n)
    if start is not None:
        y = start.copy()
        free = [i for i in range(n) if y[i] > 0.0]
    elif simplex:
        first = int(np.argmin(0.5 * np.diag(q) + c))
        y = np.zeros(n)
        y[first] = 1.0
        free = [first]
    else:
        y = np.zeros(n)
        free = []
    # Each outer pass frees one coordinate and the objective strictly decreases,
    # so no active set repeats; 3n + 10 passes is far beyond what is ever needed
    # and only guards against rounding loops (the iterate stays feasible).
    for _ in range(3 * n + 10):
        for _ in range(n + 1):
            z = _solve_free(q, c, free, simplex)
            if all(z[i] > 0.0 for i in free):
                y = z
                break
            # Walk from y towards z until the first free coordinate hits zero,
            # then fix it there (Lawson-Hanson's inner loop).
            ratios = [
                (y[i] / (y[i] - z[i]) if y[i] > z[i] else 0.0, i) for i in free if z[i] <= 0.0
            ]
            step, leaving = min(ratios)
            y = y + step * (z - y)
            y[leaving] = 0.0
            free = [i for i in free if i != leaving and y[i] > 0.0]
        grad = q @ y + c
        reduced = grad - grad[free].sum() / len(free) if simplex and free else grad
        candidates = [i for i in range(n) if i not in free and reduced[i] < -QP_TOL]
        if not candidates:
            break
        free.append(min(candidates, key=lambda i: reduced[i]))
    return _np.maximum(y, 0.0)


def power_balance(
    q: np.ndarray,
    alpha: float,
    coefficients: np.ndarray | None = None,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """The ``x > 0`` with ``((Q + rI) x)_i = k_i x_i^(-1/alpha)`` for every i (r = ``BALANCE_RIDGE``).

    ``k`` (``coefficients``, default all ones) must be positive. The solution is
    the unique minimiser of the strictly convex potential
    ``1/2 x'(Q + rI)x + sum_i k_i h(x_i)`` with ``h'(x) = -x^(-1/alpha)``, found by
    Newton's method with a backtracking line search that keeps x positive,
    started from the solution for Q = I. Stops when every
    ``|x_i^(1/alpha) ((Q + rI)x)_i / k_i - 1| <= BALANCE_TOL``, or when a step no
    longer changes x (bit-identical: the residual is then at float64's limit for
    this Q, which happens when Q is nearly singular), or after 200 steps,
    returning the last positive iterate.
    """
    n = q.shape[0]
    q = q + BALANCE_RIDGE * np.eye(n)
    p = 1.0 / alpha
    k = np.ones(n) if coefficients is None else coefficients
    x = k ** (alpha / (alpha + 1.0)) if start is None else start.copy()

    def potential(v: np.ndarray) -> float:
        barrier = -np.log(v) if alpha == 1.0 else v ** (1.0 - p) / (p - 1.0)
        return float(0.5 * v @ q @ v + k @ barrier)

    value = potential(x)
    for _ in range(200):
        qx = q @ x
        if np.max(np.abs(x**p * qx / k - 1.0)) <= BALANCE_TOL:
            break
        grad = qx - k * x ** (-p)
        hess = q + np.diag(k * p * x ** (-p - 1.0))
        step = -_linalg.solve(hess, grad)
        # Largest step keeping x positive (fraction to the boundary), then Armijo.
        shrinking = step < 0
        t = (
            min(1.0, 0.99 * float(np.min(-x[shrinking] / step[shrinking])))
            if shrinking.any()
            else 1.0
        )
        slope = float(grad @ step)
        for _ in range(60):
            trial = x + t * step
            trial_value = potential(trial)
            if trial_value <= value + 1e-4 * t * slope:
                break
            t *= 0.5
        else:
            break
        if unchanged(trial, x):
            # The step is below x's last bit: float64 cannot get closer. This is
            # where a near-singular Q (almost opposite gradients, on the Pareto
            # front) leaves the residual above BALANCE_TOL for good.
            break
        x, value = trial, trial_value
    return x


def unchanged(new: np.ndarray, old: np.ndarray) -> bool:
    """Whether a solver step left its iterate bit-identical (its stopping rule at float64's limit)."""
    return bool(np.array_equal(new, old))


def noise_floor(n: int, precision: float) -> float:
    """Relative eigenvalue at or below which an order-n Gram's eigenpair is rounding noise.

    When every entry ``G_ij`` is known to ``precision * |g_i| |g_j|``, the error
    matrix has a spectral norm of at most ``n * precision`` times the largest
    diagonal (its Frobenius norm is at most ``precision`` times the trace, by
    Weyl's inequality it moves no eigenvalue by more), so an eigenvalue that
    small cannot be told from zero. ``8 eps`` (float64's) more covers our own
    roundings on the way (the products, the normalisation to unit diagonal: a
    few epsilons per entry), which matter when the gradients are float64.
    """
    return n * (max(precision, 0.0) + 8.0 * float(np.finfo(np.float64).eps))


def psd_pinv(q: np.ndarray, precision: float) -> np.ndarray:
    """Pseudo-inverse of a symmetric PSD matrix whose entries are known to ``precision``.

    Eigenvalues at or below ``noise_floor(n, precision) * max`` count as zero.
    """
    n = q.shape[0]
    cutoff = noise_floor(n, precision)
    values, vectors = _linalg.eigh(q)
    top = float(values.max(initial=0.0))
    keep = values > cutoff * top
    if not keep.any():
        return np.zeros_like(q)
    inv = np.where(keep, 1.0 / np.where(keep, values, 1.0), 0.0)
    return (vectors * inv) @ vectors.T
