"""Nash-MTL and FairGrad: weights that balance every task's share of the update."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradtools.aggregation._base import (
    Aggregation,
    BlockAggregator,
    checked_gram,
    gram_precision,
    keyed_state,
    register,
    resolve_block_keys,
)
from gradtools.aggregation._gram import norms_and_correlation_np
from gradtools.aggregation._solvers import power_balance

# numpy 2.4's bundled stubs hide or mistype some numpy functions for mypy 2.4.
_linalg: Any = np.linalg
_np: Any = np


def _balance_on_units(gram: np.ndarray, alpha: float, start: np.ndarray | None) -> np.ndarray:
    """Weights ``w`` with ``(G w)_i = w_i^(-1/alpha)``, solved on the correlation matrix.

    With ``G = D R D`` and ``w = D^-1 b`` the equation reads
    ``(R b)_i = |g_i|^(1/alpha - 1) b_i^(-1/alpha)``, so every task's equation is in
    units of its own norm and the ridge of :func:`power_balance` means the
    same for a 1e-30 gradient as for a 1e30 one. Zero gradients get weight 0.
    """
    norms, nonzero, corr = norms_and_correlation_np(gram)
    weights = np.zeros(len(gram))
    if nonzero.any():
        n = norms[nonzero]
        # Kept inside float64: only extreme alphas with 1e-100 norm ratios reach the clip.
        coefficients = np.clip(n ** (1.0 / alpha - 1.0), 1e-300, 1e300)
        warm = None if start is None or not (start[nonzero] > 0).all() else start[nonzero] * n
        index = np.flatnonzero(nonzero)
        sub = corr[index[:, None], index[None, :]]
        on_units = power_balance(sub, alpha, coefficients, warm)
        weights[nonzero] = on_units / n
    return weights


@register
class NashMTL(BlockAggregator):
    """Nash-MTL (Navon et al. 2022, "Multi-Task Learning as a Bargaining Game", ICML).

    The Nash bargaining solution: the weights ``a > 0`` with ``a_i (G a)_i = 1`` on
    the Gram matrix G of the raw gradients (the paper's Eq. 3, and what the
    official code and torchjd solve: they divide G by its Frobenius norm for
    their solver and multiply it back in its constraint). Every task's share
    ``<d, g_i>`` of the update ``d = sum a_t g_t`` is ``1 / a_i``, and
    ``|d|^2 = sum_i a_i (G a)_i = T``: the update norm is ``sqrt(T)`` whatever the
    gradients' scale, and NashMTL equals ``FairGrad(alpha=1)`` (before the clip).
    Writing ``G = D R D`` (D the norms, R the correlations) and ``a = D^-1 b / sqrt(s)``
    (s the largest squared norm), the balance is ``(R b)_i = 1/b_i``: we solve that
    exactly, by Newton's method on its convex potential (relative residual
    <= 1e-10, ridge 1e-8 on R), where the official code and torchjd run at most
    20 sequential convex approximations with cvxpy/ECOS.

    Args:
        max_norm: clip ``|d|`` to this (per Gram block); ``None`` turns the clip
            off. 1.0 by default, as the official code (``NashMTL(max_norm=1.0)``,
            applied with ``clip_grad_norm_`` to the shared parameters, also in its
            toy example) and torchjd. Since ``|d| = sqrt(T)``, the clip makes the
            update norm 1 for every T >= 2. ``|d|`` is computed from the Gram
            block; where the update cancels below the Gram's own accuracy (almost
            opposite gradients, on the Pareto front) it takes the largest norm
            that accuracy allows (see :func:`update_norm_bound`), so the clip
            still holds there.
        update_every: reuse the last weights between updates, as the official
            ``update_weights_every``.
        normalize_gram: solve the balance on ``G / |G|_F`` instead (off by
            default): the weights then do not change when all gradients are
            scaled by one factor, and the update scales with the gradients
            (``|d| = sqrt(T |G|_F)``, like a summed loss) instead of being
            ``sqrt(T)``. Not the paper's method; for users who want Nash-MTL's
            direction with the plain sum's step size.

    The last weights of each block (the next solve's warm start, and the reused
    weights with ``update_every``) and the step count are the state, kept per
    block key (see :meth:`Aggregator.aggregate`), so a tensor that some task
    reaches on some steps only keeps its own warm start.

    Guarantees: weighted, non-conflicting (every ``<d, g_i> = 1/a_i > 0`` for
    independent gradients), ``|d|^2 = T`` without the clip. Not linear under
    scaling. Heads get their full gradient.

    Degenerate inputs: zero gradients get weight 0. When a non-negative
    combination of gradients vanishes (opposite gradients) the exact balance
    does not exist; the ridge keeps the weights finite (about 1e4 times
    ``1 / |g_i|``) while the update along the cancelling gradients stays 0.
    """

    name = "nashmtl"

    def __init__(
        self,
        max_norm: float | None = 1.0,
        update_every: int = 1,
        normalize_gram: bool = False,
    ) -> None:
        if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(f"max_norm must be a finite number > 0 or None, got {max_norm!r}")
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an integer >= 1, got {update_every!r}")
        if not isinstance(normalize_gram, bool):
            raise ValueError(f"normalize_gram must be a bool, got {normalize_gram!r}")
        self.max_norm = max_norm
        self.update_every = update_every
        self.normalize_gram = normalize_gram
        self._step = 0
        self._last: dict[Hashable, Tensor] = {}
        self._starts: list[Tensor | None] = []

    def aggregate(
        self,
        gram: Tensor,
        draw: Tensor | None,
        *,
        precision: float | None = None,
        block_keys: Sequence[Hashable] | None = None,
    ) -> Aggregation:
        gram = checked_gram(gram)
        num_blocks, num_tasks, _ = gram.shape
        keys = resolve_block_keys(block_keys, num_blocks, "NashMTL")
        last = [self._last.get(key) for key in keys]
        last = [w if w is not None and len(w) == num_tasks else None for w in last]
        reuse = self._step % self.update_every != 0
        if reuse and all(w is not None for w in last):
            weights = torch.stack([w.clone() for w in last if w is not None])
        else:
            self._starts = last
            try:
                solved = super().aggregate(gram, draw, precision=precision).weights
            finally:
                self._starts = []
            # Between updates a block seen for the first time is solved, the others reuse.
            rows = [w if reuse and w is not None else s for w, s in zip(last, solved, strict=True)]
            weights = torch.stack([row.clone() for row in rows])
            for key, row in zip(keys, weights, strict=True):
                self._last[key] = row.clone()
        self._step += 1
        if self.max_norm is not None:
            factors = clip_factors(gram, weights, self.max_norm, gram_precision(gram, precision))
            weights = weights * factors.unsqueeze(-1)
        return Aggregation(weights)

    def block_weights(self, gram: np.ndarray, scale: float, block: int) -> np.ndarray:
        # The balance only depends on the directions (see _balance_on_units); the
        # paper's weights on the raw G are those on G / scale times scale^(-1/2),
        # the normalised variant's those times sqrt(|G / scale|_F).
        factor = math.sqrt(float(_linalg.norm(gram))) if self.normalize_gram else scale**-0.5
        last = self._starts[block] if block < len(self._starts) else None
        start = None if last is None else last.numpy() / factor
        return _balance_on_units(gram, 1.0, start) * factor

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "last_weights": {key: w.clone() for key, w in self._last.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"step", "last_weights"}
        if unknown:
            raise ValueError(f"NashMTL.load_state_dict got unexpected keys {sorted(unknown)}")
        last = keyed_state(state.get("last_weights"), 1, "NashMTL", "last_weights")
        self._step, self._last = int(state.get("step", 0)), last

    def __repr__(self) -> str:
        return (
            f"NashMTL(max_norm={self.max_norm}, update_every={self.update_every}, "
            f"normalize_gram={self.normalize_gram})"
        )


# Relative accuracy, in units of float32's eps, assumed for a Gram block whose
# entries are all exactly representable in float32 (a Gram built in float32 and
# widened, as MultiTask builds it for float32, float16 and bfloat16 models).
# Measured: float32 dot products of 1e6 elements are off by up to about 150 eps
# of |g_i||g_j| (5 eps at 1e4 elements).
GRAM_EPS_FACTOR = 256.0


def gram_accuracy(block: np.ndarray) -> float:
    """Relative accuracy of one float64 Gram block: ``GRAM_EPS_FACTOR`` times float32's
    eps when every entry is a float32 number (a Gram computed in float32 carries
    float32's accuracy, not float64's), else times float64's.

    A heuristic: a sum of float32 blocks done in float64 (several buckets under
    ``granularity="all"``, a parameter group) is taken for float64-accurate.
    """
    with _np.errstate(over="ignore"):
        narrow = block.astype(np.float32)
    if _np.isfinite(narrow).all() and np.array_equal(narrow, block):
        return GRAM_EPS_FACTOR * float(np.finfo(np.float32).eps)
    return GRAM_EPS_FACTOR * float(np.finfo(np.float64).eps)


def update_norm_bound(gram: np.ndarray, weights: np.ndarray, accuracy: float) -> float:
    """An upper bound of ``|d| = |sum_i w_i g_i|`` from one ``[T, T]`` Gram block.

    ``w'Gw`` is exact only to ``accuracy * (sum_i |w_i| |g_i|)^2`` when every entry
    of G is accurate to ``accuracy * |g_i| |g_j|``. On almost opposite gradients
    with large weights, w'Gw is below that and may come out negative: the true
    ``|d|^2`` can then be anything up to the bound, so the bound adds it (a norm
    clamped to 0 instead would let any step through). Computed on ``w / max|w|``
    so that nothing overflows.
    """
    big = max(float(_np.abs(weights).max(initial=0.0)), 1e-300)
    unit = weights / big
    quadratic = max(float(unit @ gram @ unit), 0.0)
    spread = float(np.abs(unit) @ _np.sqrt(_np.maximum(gram.diagonal(), 0.0)))
    return math.sqrt(quadratic + accuracy * spread * spread) * big


def clip_factors(gram: Tensor, weights: Tensor, max_norm: float, precision: float) -> Tensor:
    """``[B]`` factors that scale each block's weights so that ``|d| <= max_norm``.

    ``precision``: the Gram's relative accuracy as the caller knows it (the
    ``precision`` of :meth:`NashMTL.aggregate`); the block's own look
    (:func:`gram_accuracy`) is taken when it is coarser.
    """
    factors = []
    for block, w in zip(gram.numpy(), weights.numpy(), strict=True):
        accuracy = max(gram_accuracy(block), GRAM_EPS_FACTOR * precision)
        norm = update_norm_bound(block, w, accuracy)
        factors.append(max_norm / norm if norm > max_norm else 1.0)
    return torch.tensor(factors, dtype=torch.float64)


@register
class FairGrad(BlockAggregator):
    """FairGrad (Ban & Ji 2024, "Fair Resource Allocation in Multi-Task Learning",
    ICML; Eq. 4 / Algorithm 1).

    alpha-fair allocation of the update: the weights ``w > 0`` with
    ``(G w)_i = w_i^(-1/alpha)``. alpha = 1 is proportional fairness (the Nash
    balance, on the raw G), alpha -> infinity max-min fairness; alpha = 0 (pure
    utility) gives weights 1/T as in torchjd. torchjd solves the equation with
    scipy's bounded least squares from 1/T; we solve it exactly (Newton on its
    convex potential, relative residual <= 1e-10) on ``G / s`` (s = largest
    squared norm), scaled back by ``s^(-alpha/(alpha+1))``, which is exact. With
    ``G = D R D``, ``w = D^-1 b``, the equation is solved on the correlation matrix
    as ``(R b)_i = |g_i|^(1/alpha-1) b_i^(-1/alpha)`` with a ridge of 1e-8 on R, so
    every task's equation holds relative to its own norm.

    Guarantees: weighted, non-conflicting for independent gradients (every
    ``<d, g_i> = w_i^(-1/alpha) > 0``). Not linear under scaling; the update
    scales as ``c^((1-alpha)/(1+alpha))`` when all gradients scale by c. Heads get
    their full gradient.

    Degenerate inputs: zero gradients get weight 0; cancelling gradients get
    large but finite weights from the ridge (as :class:`NashMTL`).
    """

    name = "fairgrad"

    def __init__(self, alpha: float = 1.0) -> None:
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self.alpha = float(alpha)

    def block_weights(self, gram: np.ndarray, scale: float, block: int) -> np.ndarray:
        num_tasks = len(gram)
        if self.alpha == 0.0:
            return np.full(num_tasks, 1.0 / num_tasks)
        exponent = -self.alpha / (self.alpha + 1.0)
        return _balance_on_units(gram, self.alpha, None) * scale**exponent

    def zero_weights(self, num_tasks: int) -> np.ndarray:
        return np.full(num_tasks, 1.0 / num_tasks) if self.alpha == 0.0 else np.zeros(num_tasks)

    def __repr__(self) -> str:
        return f"FairGrad(alpha={self.alpha})"
