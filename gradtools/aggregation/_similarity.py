"""Pairwise similarity statistics of task gradients, from their Gram matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from gradtools.aggregation._gram import _check_gram, _norms_and_correlation


def cosine_similarity(gram: Tensor) -> Tensor:
    """Pairwise cosine similarities ``<g_i, g_j> / (|g_i| |g_j|)`` from a Gram matrix.

    float64 ``[..., T, T]``; 0 where either gradient is zero, 1 on the diagonal
    of non-zero gradients.
    """
    _check_gram(gram)
    return _norms_and_correlation(gram.to(torch.float64))[2]


def magnitude_similarity(gram: Tensor) -> Tensor:
    """Gradient magnitude similarity Phi(g_i, g_j) = 2 |g_i| |g_j| / (|g_i|^2 + |g_j|^2).

    From the PCGrad paper: 1 for equal norms, towards 0 as they diverge. float64
    ``[..., T, T]``; defined as 1 when both gradients are zero.
    """
    _check_gram(gram)
    norms = _norms_and_correlation(gram.to(torch.float64))[0]
    # Written with the ratio r = small/large, Phi = 2r / (1 + r^2), so that
    # neither the squares nor the product can overflow or underflow.
    big = torch.maximum(norms.unsqueeze(-1), norms.unsqueeze(-2))
    small = torch.minimum(norms.unsqueeze(-1), norms.unsqueeze(-2))
    ratio = torch.where(big > 0, small / torch.where(big > 0, big, torch.ones_like(big)), 1.0)
    return 2.0 * ratio / (1.0 + ratio * ratio)
