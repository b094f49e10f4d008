"""Checks and rescalings of Gram matrices shared by every aggregator.

The Gram matrix ``G[i, j] = <g_i, g_j>`` of T task gradients is all an
aggregator sees. Gradients of a real model range over many orders of magnitude
(1e-30 to 1e30 between tasks, or over training), so the products in G would
overflow or underflow float64 if used as they are. Two rescalings keep the math
in range:

- the correlation matrix ``R = D^-1 G D^-1`` (D = diag of gradient norms), for
  methods that only look at directions or handle norms explicitly;
- the Gram matrix divided by one scalar (its largest diagonal entry), for
  methods whose weights do not change when every gradient is scaled by the
  same factor.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# Norms below this are treated as exact zeros: 1/n must stay far from overflow
# when it multiplies a Gram entry (|G_ij| <= n_i n_j), and anything this small is
# below every gradient a float32 or float64 model can hold anyway.
_ZERO_NORM = 2.0**-500


def _check_gram(gram: Tensor) -> None:
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must have shape [..., T, T], got {list(gram.shape)}")
    if gram.shape[-1] == 0:
        raise ValueError("gram must describe at least one task (T >= 1)")
    if gram.is_complex() or not gram.is_floating_point():
        raise ValueError(f"gram must be a real floating-point tensor, got {gram.dtype}")
    if not bool(torch.isfinite(gram).all()):
        raise ValueError("gram contains non-finite entries (inf or NaN)")


def _norms_and_correlation(gram: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Split a float64 Gram matrix into gradient norms and the correlation matrix.

    Returns ``(norms, nonzero, corr)``: ``norms[..., i] = |g_i|`` (0 for a gradient
    treated as zero), ``nonzero`` the mask of the others, and ``corr[..., i, j]`` the
    cosine of g_i and g_j clamped to [-1, 1] (0 where either gradient is zero, 1 on
    the diagonal of non-zero gradients).
    """
    diag = gram.diagonal(dim1=-2, dim2=-1).clamp(min=0.0)
    norms = diag.sqrt()
    nonzero = norms > _ZERO_NORM
    norms = torch.where(nonzero, norms, torch.zeros_like(norms))
    inv = torch.where(nonzero, 1.0 / torch.where(nonzero, norms, torch.ones_like(norms)), 0.0)
    # Multiply one factor at a time so no intermediate leaves float64's range.
    corr = (gram * inv.unsqueeze(-1)) * inv.unsqueeze(-2)
    corr = corr.clamp(-1.0, 1.0)
    eye = torch.eye(gram.shape[-1], dtype=torch.bool, device=gram.device)
    corr = torch.where(eye, nonzero.unsqueeze(-1).to(corr.dtype), corr)
    return norms, nonzero, corr


def norms_and_correlation_np(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy twin of :func:`_norms_and_correlation` for one ``[T, T]`` block.

    Returns ``(norms, nonzero, corr)`` with ``corr`` zero on the rows and
    columns of zero gradients (and on their diagonal).
    """
    diag = gram.diagonal()
    norms = np.sqrt(np.where(diag > 0.0, diag, 0.0))
    nonzero = norms > _ZERO_NORM
    inv = np.where(nonzero, 1.0 / np.where(nonzero, norms, 1.0), 0.0)
    corr = ((gram * inv[:, None]) * inv[None, :]).clip(-1.0, 1.0)
    index = np.arange(len(gram))
    corr[index, index] = np.where(nonzero, 1.0, 0.0)
    return np.where(nonzero, norms, 0.0), nonzero, corr
