"""Nash-MTL and FairGrad on the Pareto front: almost opposite gradients (issue 25).

There the bargaining equation is nearly singular: the Newton solver must stop
when float64 cannot improve its iterate, and the ``max_norm`` clip must hold
although the Gram matrix (built in float32) cannot resolve the update's norm.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from gradtools import aggregation as agg
from gradtools.aggregation import _solvers
from gradtools.aggregation._bargaining import GRAM_EPS_FACTOR, gram_accuracy, update_norm_bound
from gradtools.aggregation._gram import norms_and_correlation_np


def _almost_opposite(rng: np.random.Generator, tilt: float, dim: int = 64) -> np.ndarray:
    g = rng.standard_normal(dim)
    return np.stack([g, -(g + tilt * rng.standard_normal(dim)) * 1.7])


@pytest.mark.parametrize("tilt", [1e-3, 1e-6, 1e-8])
def test_power_balance_stops_when_a_step_changes_nothing(monkeypatch, tilt: float) -> None:
    """With 1 + cos below 1e-6 the relative residual cannot reach 1e-10 in float64. The solver
    used to run all 200 Newton steps (each with a 60-step line search) there; it now stops once
    a step leaves the iterate bit-identical, with the same result."""
    jac = _almost_opposite(np.random.default_rng(0), tilt)
    _, _, corr = norms_and_correlation_np(jac @ jac.T)
    steps = []
    solve = np.linalg.solve

    def counting_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        steps.append(1)
        return solve(a, b)

    monkeypatch.setattr(_solvers, "_linalg", types.SimpleNamespace(solve=counting_solve))
    x = _solvers.power_balance(corr, 1.0)
    assert len(steps) <= 40
    # Running on (the pre-fix behaviour) only repeats the last iterate.
    monkeypatch.setattr(_solvers, "unchanged", lambda new, old: False)
    steps.clear()
    assert np.array_equal(_solvers.power_balance(corr, 1.0), x)


def _float32_case(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two almost exactly opposite float32 gradients: their Gram built in float32 (as
    MultiTask builds it for a float32 model), and the gradients themselves in float64."""
    rng = np.random.default_rng(seed)
    dim = int(rng.choice([2, 16, 1000]))
    tilt = 10.0 ** rng.uniform(-9, -5)
    jac = torch.from_numpy(_almost_opposite(rng, tilt, dim)).to(torch.float32)
    return (jac @ jac.T).to(torch.float64).unsqueeze(0), jac.to(torch.float64)


def test_nash_max_norm_clips_on_a_float32_gram_of_almost_opposite_gradients() -> None:
    """The Gram's small eigenvalue is below float32's accuracy and often negative, so w'Gw
    can come out negative for Nash's large weights: the old clip took that for a zero norm
    and let updates of norm up to 5 through with max_norm=1 (14 of 200 draws here)."""
    norms = []
    for seed in range(200):
        gram, jac = _float32_case(seed)
        weights = agg.NashMTL(max_norm=1.0).aggregate(gram, None).weights[0]
        norms.append(float((jac.T @ weights).norm()))
    assert max(norms) <= 1.0 + 1e-6


def test_update_norm_bound_is_the_exact_norm_on_a_float64_gram() -> None:
    """Away from cancellation the bound adds only float64 rounding: the clip is exact."""
    rng = np.random.default_rng(4)
    jac = rng.standard_normal((3, 9))
    weights = rng.uniform(0.1, 2.0, size=3)
    gram = jac @ jac.T
    bound = update_norm_bound(gram, weights, gram_accuracy(gram))
    assert math.isclose(bound, float(np.linalg.norm(jac.T @ weights)), rel_tol=1e-12)


def test_gram_accuracy_recognises_a_float32_gram() -> None:
    jac = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    float32 = gram_accuracy((jac @ jac.T).to(torch.float64).numpy())
    float64 = gram_accuracy((jac.double() @ jac.double().T).numpy())
    assert float32 == GRAM_EPS_FACTOR * torch.finfo(torch.float32).eps
    assert float64 == GRAM_EPS_FACTOR * torch.finfo(torch.float64).eps
