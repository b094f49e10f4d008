"""Aligned-MTL: align the principal components of the task gradients."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from gradtools.aggregation._base import FLOAT64_EPS, BlockAggregator, register
from gradtools.aggregation._solvers import noise_floor

# numpy 2.4's bundled stubs hide numpy.linalg's functions from mypy 2.4.
_linalg: Any = np.linalg

ScaleMode = Literal["min", "median", "rmse"]


@register
class AlignedMTL(BlockAggregator):
    """Aligned-MTL (Senushkin et al. 2023, "Independent Component Alignment for
    Multi-Task Learning", CVPR; Algorithm 1).

    With ``G = V diag(lambda) V'`` (the non-zero eigenpairs), the balance
    transformation ``B = sqrt(sigma) V diag(lambda)^-1/2 V'`` makes the combined
    system's singular values equal to ``sqrt(sigma)``, and the weights are
    ``B @ (1/T)``. ``sigma`` is the smallest non-zero eigenvalue (``"min"``, the
    paper), the median (the lower middle one for an even count) or the mean
    (``"rmse"``, the official code). An eigenvalue counts as zero at or below
    ``T * (precision + 8 eps)`` times the largest (``precision``: the Gram's,
    see :meth:`Aggregator.aggregate`; float32 gradients give float32's epsilon;
    eps: float64's): below that it cannot be told from rounding noise, and
    keeping such a noise eigenvalue as ``sigma`` would shrink the update by its
    square root.

    Weights unchanged when every gradient is scaled by one factor; the aligned
    gradients are orthogonal with equal norms (the paper's condition-number-one
    property). Not non-conflicting, not linear under scaling. Rank-deficient
    Gram matrices use the non-zero eigenpairs only; an all-zero block gives
    weights 1/T. Heads get 1/T of their gradient. The guarantees and their
    precision are in :mod:`gradtools.aggregation.guarantees`.
    """

    name = "alignedmtl"

    def __init__(self, scale_mode: ScaleMode = "min") -> None:
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
        self.scale_mode: ScaleMode = scale_mode

    def block_weights(self, gram: np.ndarray, scale: float, block: int) -> np.ndarray:
        return self.block_weights_at(gram, scale, block, FLOAT64_EPS)[0]

    def block_weights_at(
        self, gram: np.ndarray, scale: float, block: int, precision: float
    ) -> tuple[np.ndarray, bool]:
        return self._weights(gram, precision), False

    def _weights(self, gram: np.ndarray, precision: float) -> np.ndarray:
        num_tasks = len(gram)
        values, vectors = _linalg.eigh(gram)
        keep = values > float(values.max()) * noise_floor(num_tasks, precision)
        if not keep.any():
            return np.full(num_tasks, 1.0 / num_tasks)
        values, vectors = values[keep], vectors[:, keep]
        if self.scale_mode == "min":
            sigma = float(values.min())
        elif self.scale_mode == "median":
            # The lower middle value for an even count, as torch.median.
            sigma = float(np.sort(values)[(len(values) - 1) // 2])
        else:
            sigma = float(values.mean())
        balance = (vectors * np.sqrt(sigma / values)) @ vectors.T
        return balance @ np.full(num_tasks, 1.0 / num_tasks)

    def head_weight(self, num_tasks: int) -> float:
        return 1.0 / num_tasks

    def __repr__(self) -> str:
        return f"AlignedMTL(scale_mode={self.scale_mode!r})"
