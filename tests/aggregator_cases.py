"""Shared helpers for the aggregator tests: random Jacobians and running an aggregator on them."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import gradtools
from gradtools import aggregation as agg

SETTINGS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def every_aggregator() -> list[agg.Aggregator]:
    """One instance of every registered method (non-default parameters where they matter)."""
    return [
        agg.Sum(),
        agg.Mean(),
        agg.Random(),
        agg.PCGrad(),
        agg.PCGrad(reduction="mean"),
        agg.MGDA(),
        agg.CAGrad(c=0.4),
        agg.IMTLG(),
        agg.ConFIG(),
        agg.AlignedMTL(),
        agg.UPGrad(),
        agg.DualProj(),
        agg.NashMTL(),
        agg.NashMTL(max_norm=None, normalize_gram=True),
        agg.FairGrad(alpha=2.0),
        agg.GradVac(),
    ]


def fresh(aggregator: agg.Aggregator) -> agg.Aggregator:
    """A new instance with the same constructor arguments (stateful methods start clean)."""
    parameters = inspect.signature(type(aggregator).__init__).parameters.values()
    named = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"]
    return type(aggregator)(**{name: getattr(aggregator, name) for name in named})


def gram_of(jac: np.ndarray) -> torch.Tensor:
    """``[1, T, T]`` float64 Gram block of a ``[T, D]`` Jacobian."""
    j = torch.from_numpy(np.ascontiguousarray(jac, dtype=np.float64))
    return (j @ j.T).unsqueeze(0)


def weights_on(
    aggregator: agg.Aggregator, jac: np.ndarray, draw: torch.Tensor | None
) -> np.ndarray:
    """``[T]`` weights for one Jacobian, with a given draw, on a fresh copy of ``aggregator``."""
    return fresh(aggregator).aggregate(gram_of(jac), draw).weights[0].numpy()


def combined(aggregator: agg.Aggregator, jac: np.ndarray, draw: torch.Tensor | None) -> np.ndarray:
    """The aggregated vector ``J' w``."""
    return jac.T @ weights_on(aggregator, jac, draw)


def draw_for(aggregator: agg.Aggregator, num_tasks: int, seed: int = 0) -> torch.Tensor | None:
    return aggregator.draw(num_tasks, torch.Generator().manual_seed(seed))


def term_scale(jac: np.ndarray, weights: np.ndarray) -> float:
    """sum_t |w_t| |g_t|: the size of the terms that make up J'w (rounding is relative to it)."""
    return float(np.abs(weights) @ np.linalg.norm(jac, axis=1))


def random_jacobian(
    rng: np.random.Generator, num_tasks: int, dim: int, rank: int | None = None
) -> np.ndarray:
    rank = min(num_tasks, dim) if rank is None else rank
    return rng.standard_normal((num_tasks, rank)) @ rng.standard_normal((rank, dim))


@st.composite
def well_conditioned(draw: st.DrawFn, max_tasks: int = 6, spread: int = 1) -> np.ndarray:
    """Full-rank [T, D] Jacobians (D >= T + 2) with per-task scales 10^[-spread, spread]."""
    num_tasks = draw(st.integers(2, max_tasks))
    dim = draw(st.integers(num_tasks + 2, num_tasks + 8))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    jac = rng.standard_normal((num_tasks, dim))
    scales = 10.0 ** rng.uniform(-spread, spread, size=num_tasks)
    return jac * scales[:, None]


@st.composite
def degenerate(draw: st.DrawFn, max_tasks: int = 7) -> np.ndarray:
    """[T, D] Jacobians of any rank with zero rows, opposite pairs, duplicates and
    per-task scales 1e-30..1e30 (structure drawn by hypothesis, values seeded)."""
    num_tasks = draw(st.integers(1, max_tasks))
    dim = draw(st.integers(1, 10))
    rank = draw(st.integers(1, min(num_tasks, dim)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    jac = random_jacobian(rng, num_tasks, dim, rank)
    for _ in range(draw(st.integers(0, num_tasks // 2))):
        i, j = draw(st.integers(0, num_tasks - 1)), draw(st.integers(0, num_tasks - 1))
        if i != j:
            jac[j] = draw(st.sampled_from([-3.0, -1.0, 1.0, 2.0])) * jac[i]
    for _ in range(draw(st.integers(0, num_tasks // 2))):
        jac[draw(st.integers(0, num_tasks - 1))] = 0.0
    exponents = draw(st.lists(st.integers(-30, 30), min_size=num_tasks, max_size=num_tasks))
    return jac * (10.0 ** np.array(exponents, dtype=np.float64))[:, None]


# --------------------------------------------------------------------------- end to end


@dataclass
class Step:
    """What one MultiTask step wrote: per block, the task rows it saw, its weights and its .grad."""

    jacs: list[np.ndarray]  # per block [T, D_b], the gradients as stored (float64 copies)
    weights: np.ndarray  # [B, T]
    grads: list[np.ndarray]  # per block [D_b]
    undefined: np.ndarray | None  # [B] or None

    def term_scale(self, b: int) -> float:
        """sum_t |w_t| |g_t| on block b: what the rounding of the combined gradient is relative to."""
        return float(np.abs(self.weights[b]) @ np.linalg.norm(self.jacs[b], axis=1))

    def scale(self, b: int) -> float:
        """max_t |g_t| + sum_t |w_t| |g_t| on block b: the solvers' accuracy is relative to
        the largest gradient (they work on G / max diag), the rounding to the terms."""
        return float(np.linalg.norm(self.jacs[b], axis=1).max()) + self.term_scale(b)


def run_step(
    aggregator: agg.Aggregator | str,
    jac: np.ndarray,
    dtype: torch.dtype,
    sizes: list[int] | None = None,
    seed: int = 0,
) -> Step:
    """One MultiTask step with loss_i = <J_i, p> over shared tensors of ``sizes`` (None: one tensor)."""
    num_tasks, dim = jac.shape
    widths = [dim] if sizes is None else sizes
    rows = torch.from_numpy(np.ascontiguousarray(jac)).to(dtype)
    params = [torch.nn.Parameter(torch.zeros(w, dtype=dtype)) for w in widths]
    bounds = np.cumsum([0, *widths])
    opt = gradtools.MultiTask(
        torch.optim.SGD(params, lr=0.1),
        aggregator,
        granularity="all" if sizes is None else "tensor",
        generator=torch.Generator().manual_seed(seed),
        shared_params=params,
    )
    opt.zero_grad()
    losses = [
        sum((rows[t, bounds[k] : bounds[k + 1]] * p).sum() for k, p in enumerate(params))
        for t in range(num_tasks)
    ]
    opt.backward(losses)
    stats = opt.stats
    assert stats is not None
    weights = stats.weights.reshape(-1, num_tasks).numpy()
    stored = rows.to(torch.float64).numpy()
    grads = [
        np.zeros(w) if p.grad is None else p.grad.double().numpy()
        for w, p in zip(widths, params, strict=True)
    ]
    if sizes is None:
        jacs = [stored]
        grads = [np.concatenate(grads)]
    else:
        jacs = [stored[:, bounds[k] : bounds[k + 1]] for k in range(len(widths))]
    undefined = None if stats.undefined is None else stats.undefined.reshape(-1).numpy()
    return Step(jacs, weights, grads, undefined)
