"""Nash-MTL and FairGrad: weights that balance every task's share of the update."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradtools.aggregation._base import Aggregation, BlockAggregator, register
from gradtools.aggregation._gram import norms_and_correlation_np
from gradtools.aggregation._solvers import power_balance

# numpy 2.4's bundled stubs hide numpy.linalg's functions from mypy 2.4.
_linalg: Any = np.linalg


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

    The Nash bargaining solution: the weights ``a > 0`` with ``(G a)_i = 1 / a_i``,
    so that every task's share ``<d, g_i>`` of the update ``d = sum a_t g_t`` is
    ``1 / a_i``. As the official code, G is first divided by its Frobenius norm
    (so the weights do not change when all gradients are scaled by one factor
    and the update scales with the gradients). Writing ``G = D R D`` (D the norms,
    R the correlations) and ``a = D^-1 b``, the balance is ``(R b)_i = 1/b_i``: it only
    depends on the directions. We solve that exactly, by Newton's method on its
    convex potential (relative residual <= 1e-10, ridge 1e-8 on R), where the
    official code and torchjd run at most 20 sequential convex approximations
    with cvxpy/ECOS on the normalised G.

    ``max_norm`` (off by default; torchjd and the official code use 1.0) clips
    ``|d|``, computed from the Gram block. ``update_every`` reuses the last
    weights between updates, as the official ``update_weights_every``; the last
    weights (also the next solve's warm start) and the step count are the state.

    Guarantees: weighted, non-conflicting (every ``<d, g_i> = 1/a_i > 0`` for
    independent gradients), ``|d|^2 = T`` on the normalised Gram matrix. Not
    linear under scaling. Heads get their full gradient.

    Degenerate inputs: zero gradients get weight 0. When a non-negative
    combination of gradients vanishes (opposite gradients) the exact balance
    does not exist; the ridge keeps the weights finite (about 1e4 times
    ``sqrt(|G|_F) / |g_i|``) while the update along the cancelling gradients stays 0.
    """

    name = "nashmtl"

    def __init__(self, max_norm: float | None = None, update_every: int = 1) -> None:
        if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(f"max_norm must be a finite number > 0 or None, got {max_norm!r}")
        if not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an integer >= 1, got {update_every!r}")
        self.max_norm = max_norm
        self.update_every = update_every
        self._step = 0
        self._last: Tensor | None = None

    def aggregate(
        self, gram: Tensor, draw: Tensor | None, *, precision: float | None = None
    ) -> Aggregation:
        reuse = self._last is not None and self._step % self.update_every != 0
        if reuse and self._last is not None and self._last.shape == gram.shape[:2]:
            weights = self._last.clone()
        else:
            weights = super().aggregate(gram, draw, precision=precision).weights
            self._last = weights.clone()
        self._step += 1
        if self.max_norm is not None:
            weights = self._clip(gram, weights)
        return Aggregation(weights)

    def _clip(self, gram: Tensor, weights: Tensor) -> Tensor:
        assert self.max_norm is not None
        # |d|^2 = a'Ga per block; computed as (a/m)'G(a/m) m^2 so it cannot overflow.
        big = weights.abs().amax(-1, keepdim=True).clamp(min=1e-300)
        unit = weights / big
        norm = torch.einsum("bi,bij,bj->b", unit, gram.to(torch.float64), unit).clamp(min=0).sqrt()
        norm = norm * big.squeeze(-1)
        factor = torch.where(norm > self.max_norm, self.max_norm / norm.clamp(min=1e-300), 1.0)
        return weights * factor.unsqueeze(-1)

    def block_weights(self, gram: np.ndarray, scale: float, block: int) -> np.ndarray:
        # The balance only depends on the directions (see _balance_on_units);
        # the official code's G / |G|_F multiplies the weights by sqrt(|G|_F).
        root_frobenius = math.sqrt(float(_linalg.norm(gram)))
        start = None
        last = self._last
        if last is not None and block < last.shape[0] and last.shape[1] == len(gram):
            start = last[block].numpy() / root_frobenius
        return _balance_on_units(gram, 1.0, start) * root_frobenius

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "last_weights": None if self._last is None else self._last.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"step", "last_weights"}
        if unknown:
            raise ValueError(f"NashMTL.load_state_dict got unexpected keys {sorted(unknown)}")
        last = state.get("last_weights")
        if last is not None and (not isinstance(last, Tensor) or last.dim() != 2):
            raise ValueError("NashMTL state 'last_weights' must be a [B, T] tensor or None")
        self._step = int(state.get("step", 0))
        self._last = None if last is None else last.detach().to("cpu", torch.float64).clone()

    def __repr__(self) -> str:
        return f"NashMTL(max_norm={self.max_norm}, update_every={self.update_every})"


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
