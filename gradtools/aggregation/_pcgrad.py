"""Pure math on task gradients, expressed through their Gram matrix.

PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning") replaces each
task gradient g_i by g_i^PC: starting from g_i, it walks the other tasks j != i in
a random order and, whenever the *current* g_i^PC conflicts with the *original*
g_j (negative dot product), removes the component of g_i^PC along g_j:

    g_i^PC <- g_i^PC - (<g_i^PC, g_j> / |g_j|^2) g_j

Every g_i^PC therefore stays a linear combination of the original gradients,
g_i^PC = sum_j C[i, j] g_j, and every dot product the algorithm needs is a
combination of entries of the Gram matrix G[i, j] = <g_i, g_j>. This module maps
a T x T Gram matrix (and the visiting orders) to the T x T coefficients C, so the
caller never needs a flattened copy of the gradients: one pass builds G, one
pass applies the weights sum_i C[i, :].

Nothing here knows about autograd, parameters or devices; the functions take and
return small tensors and are batched over leading dimensions (one Gram matrix
per parameter tensor or per group, for instance).

Numerics: the math runs in float64 on the correlation matrix R = D^-1 G D^-1
(D = diag of gradient norms), in which every coefficient stays bounded by the
number of tasks whatever the scale of each gradient; the norms come back only
in the final ratios |g_i| / |g_j|. Gradients whose norm is zero (or so small
that its square underflows) are treated as exactly zero: nothing is projected
onto them, and their own coefficient row is the identity.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from gradtools.aggregation._base import (
    Aggregation,
    Aggregator,
    checked_gram,
    gram_precision,
    register,
    required_draw,
)
from gradtools.aggregation._gram import _check_gram, norms_and_correlation_lists

__all__ = [
    "PCGrad",
    "PCGradResult",
    "Reduction",
    "draw_orders",
    "pcgrad",
    "pcgrad_weights",
    "validate_orders",
]

Reduction = Literal["sum", "mean"]


class PCGradResult(NamedTuple):
    """Outcome of PCGrad on a (batch of) Gram matrices.

    Attributes:
        coefficients: ``[..., T, T]`` float64; row i gives g_i^PC as
            ``sum_j coefficients[..., i, j] * g_j``. The diagonal is 1.
        projected: ``[..., T, T]`` bool; ``projected[..., i, j]`` is True when task i
            was projected onto the normal plane of task j (never on the diagonal).
    """

    coefficients: Tensor
    projected: Tensor


def draw_orders(num_tasks: int, generator: torch.Generator | None = None) -> Tensor:
    """Draw, for each task i, a uniformly random order of the other tasks.

    Returns a ``[T, T-1]`` int64 CPU tensor whose row i is a permutation of
    ``{0..T-1} \\ {i}``: the order in which task i visits the others. A task is
    never compared with itself.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if num_tasks == 1:
        return torch.empty(1, 0, dtype=torch.int64)
    # One uniform draw per (task, slot); sorting a row gives a uniform permutation
    # of T-1 positions, which we map onto the other tasks by skipping i.
    keys = torch.rand(num_tasks, num_tasks - 1, generator=generator, dtype=torch.float64)
    slots = keys.argsort(dim=1)
    tasks = torch.arange(num_tasks).unsqueeze(1)
    return slots + (slots >= tasks).to(torch.int64)


def validate_orders(orders: Tensor, num_tasks: int) -> None:
    """Raise ``ValueError`` unless ``orders`` is ``[T, T-1]`` and row i permutes the tasks other than i."""
    if orders.shape != (num_tasks, num_tasks - 1):
        raise ValueError(
            f"orders must have shape [{num_tasks}, {num_tasks - 1}] for {num_tasks} tasks, "
            f"got {list(orders.shape)}"
        )
    if orders.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"orders must be an integer tensor, got {orders.dtype}")
    rows = orders.tolist()
    for i, row in enumerate(rows):
        expected = [j for j in range(num_tasks) if j != i]
        if sorted(row) != expected:
            raise ValueError(
                f"orders row {i} must be a permutation of the other tasks {expected}, got {row}"
            )


def pcgrad(gram: Tensor, orders: Tensor) -> PCGradResult:
    """PCGrad coefficients from the Gram matrix of the task gradients.

    Args:
        gram: ``[..., T, T]`` symmetric positive semi-definite Gram matrix
            ``G[i, j] = <g_i, g_j>`` (any real dtype; computed in float64).
        orders: ``[T, T-1]`` integer tensor; row i is the order in which task i
            visits the other tasks (see :func:`draw_orders`). Shared by all the
            batched Gram matrices.

    Returns:
        A :class:`PCGradResult` with float64 ``coefficients`` (on the CPU) such
        that ``g_i^PC = sum_j coefficients[..., i, j] * g_j``, and the
        ``projected`` mask.

    Raises:
        ValueError: on a malformed or non-finite ``gram`` or malformed ``orders``.
    """
    _check_gram(gram)
    num_tasks = gram.shape[-1]
    validate_orders(orders, num_tasks)
    batch = gram.shape[:-2]
    # The matrices are T x T with T a handful: plain Python floats (IEEE float64)
    # beat dozens of tiny tensor operations by an order of magnitude, and this
    # runs once per training step.
    grams = gram.detach().to(device="cpu", dtype=torch.float64).reshape(-1, num_tasks, num_tasks)
    visit = orders.tolist()
    coefficients = []
    projected = []
    for block in grams.tolist():
        c, p = _pcgrad_block(block, visit)
        coefficients.append(c)
        projected.append(p)
    shape = (*batch, num_tasks, num_tasks)
    return PCGradResult(
        torch.tensor(coefficients, dtype=torch.float64).reshape(shape),
        torch.tensor(projected, dtype=torch.bool).reshape(shape),
    )


def _pcgrad_block(
    gram: list[list[float]], orders: list[list[int]]
) -> tuple[list[list[float]], list[list[bool]]]:
    """PCGrad on one Gram matrix, in the normalised basis (see the module docstring)."""
    num_tasks = len(gram)
    # corr[i][j]: cosine of g_i and g_j.
    norms, nonzero, inv, corr = norms_and_correlation_lists(gram)
    coefficients = []
    projected = []
    for i in range(num_tasks):
        # basis[k]: coefficient of g_i^PC / |g_i| on the unit vector u_k = g_k / |g_k|.
        # Each projection removes at most the current vector's length (<= 1) along
        # one unit vector, so these stay within [-T, T] at any gradient scale.
        basis = [0.0] * num_tasks
        basis[i] = 1.0
        hit = [False] * num_tasks
        for j in orders[i]:
            dot = 0.0
            for k in range(num_tasks):
                dot += basis[k] * corr[k][j]
            if dot < 0.0 and nonzero[i] and nonzero[j]:
                basis[j] -= dot
                hit[j] = True
        # Back to the original gradients: C[i][j] = basis[j] |g_i| / |g_j|.
        coefficients.append(
            [1.0 if j == i else (basis[j] * norms[i]) * inv[j] for j in range(num_tasks)]
        )
        projected.append(hit)
    return coefficients, projected


def pcgrad_weights(gram: Tensor, orders: Tensor, reduction: Reduction = "sum") -> Tensor:
    """Weights w with ``sum_i g_i^PC = sum_j w[..., j] g_j`` (``"sum"``) or that divided by T (``"mean"``).

    Same arguments as :func:`pcgrad`; returns a float64 ``[..., T]`` tensor.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    weights = pcgrad(gram, orders).coefficients.sum(-2)
    if reduction == "mean":
        weights = weights / gram.shape[-1]
    return weights


@register
class PCGrad(Aggregator):
    """PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", NeurIPS).

    Each task gradient is projected, in a random order of the other tasks, onto
    the normal plane of every original gradient it conflicts with; the results
    are summed (``reduction="sum"``) or averaged (``"mean"``). See
    :func:`pcgrad` for the math.

    Guarantees: the combination is weighted (a linear combination of the
    original gradients) and, for two tasks, non-conflicting; for three or more
    tasks the sum may still conflict with a task (the paper's guarantee is for
    two). Linear under scaling for fixed orders (scaling g_i by c_i > 0 scales
    g_i^PC by c_i, the conflict signs do not change); weights do not change
    when all gradients are scaled by one factor. Random: the visiting orders
    come from :meth:`draw`.

    Degenerate inputs: a zero gradient is never projected onto and keeps
    weight 1 (its contribution is zero anyway); T=1 gives weight 1.
    """

    name = "pcgrad"

    def __init__(self, reduction: Reduction = "sum") -> None:
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction: Reduction = reduction

    def draw(self, num_tasks: int, generator: torch.Generator | None) -> Tensor:
        return draw_orders(num_tasks, generator)

    def aggregate(
        self,
        gram: Tensor,
        draw: Tensor | None,
        *,
        precision: float | None = None,
        block_keys: Sequence[Hashable] | None = None,
    ) -> Aggregation:
        gram_precision(gram, precision)  # validated; the projections are continuous in the Gram
        gram = checked_gram(gram)
        draw = required_draw(draw, "PCGrad", "the visiting orders")
        result = pcgrad(gram, draw)
        weights = result.coefficients.sum(-2)
        if self.reduction == "mean":
            weights = weights / gram.shape[-1]
        return Aggregation(weights, result.projected)

    def head_weight(self, num_tasks: int) -> float:
        return 1.0 / num_tasks if self.reduction == "mean" else 1.0

    def __repr__(self) -> str:
        return f"PCGrad(reduction={self.reduction!r})"
