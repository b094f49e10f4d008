"""Aggregators exact at the precision they are given (issue 20, items 1, 2 and 5).

The Gram blocks are multiplied in float64 (exact for float32 gradients), and
every decision a rounding error could flip (rank, equal-angle existence, Pareto
stationarity) is taken at the gradients' precision, which MultiTask passes to
``Aggregator.aggregate(..., precision=)``. Each test here reproduces a failure
of the float32 Gram or of float64-only cutoffs on a real MultiTask step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aggregator_cases import gram_of, run_step

import gradtools
from gradtools import aggregation as agg
from gradtools._task_gradients import GramItem, gram_blocks

EPS32 = float(torch.finfo(torch.float32).eps)


def mixed_signs(generator: torch.Generator, num_tasks: int) -> torch.Tensor:
    while True:
        c = torch.randn(num_tasks, generator=generator)
        if (c > 0).any() and (c < 0).any():
            return c


@pytest.mark.parametrize("name", ["upgrad", "dualproj"])
@pytest.mark.parametrize("num_tasks", [3, 5])
def test_dual_cone_on_a_one_element_shared_tensor_never_conflicts(
    name: str, num_tasks: int
) -> None:
    """loss_i = c_i p with mixed signs: the dual cone is {0}, so the exact update is 0.

    With float32 Gram blocks, 69/200 (UPGrad) and 43/200 (DualProj) such draws wrote
    a .grad conflicting with a task by up to 2% of the gradients' rms."""
    for seed in range(25):
        generator = torch.Generator().manual_seed(seed)
        c = mixed_signs(generator, num_tasks)
        p = torch.nn.Parameter(torch.randn(1, generator=generator))
        opt = gradtools.MultiTask(
            torch.optim.SGD([p], lr=0.1), name, granularity="tensor", shared_params=[p]
        )
        opt.zero_grad()
        opt.backward([ci * p.sum() for ci in c])
        assert p.grad is not None
        rms = float(c.pow(2).mean().sqrt())
        # Only the float32 rounding of the weighted sum is left: T terms of size <= rms.
        assert abs(float(p.grad)) <= 4 * num_tasks * EPS32 * rms, (seed, float(p.grad))


def rank_two_through_float32_layers(seed: int, dtype: torch.dtype, num_tasks: int = 4):
    """Task gradients W1'W2'W3'B'a_i: rank 2 exactly, float32-rounded three times over."""
    g = torch.Generator().manual_seed(seed)
    dim = 50
    b = torch.randn(2, dim, generator=g, dtype=torch.float64).to(dtype)
    a = torch.randn(num_tasks, 2, generator=g, dtype=torch.float64).to(dtype)
    layers = [
        (torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5).to(dtype)
        for _ in range(3)
    ]
    return a, b, layers


def step_on_rank_two(name: str, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, object]:
    a, b, layers = rank_two_through_float32_layers(seed, dtype)
    p = torch.nn.Parameter(torch.zeros(b.shape[1], dtype=dtype))
    opt = gradtools.MultiTask(torch.optim.SGD([p], lr=0.1), name, shared_params=[p])
    opt.zero_grad()

    def features() -> torch.Tensor:
        h = p
        for w in layers:
            h = w @ h
        return b @ h

    opt.backward([(a[i] * features()).sum() for i in range(len(a))])
    assert p.grad is not None
    return p.grad.double(), opt.stats


@pytest.mark.parametrize("name", ["alignedmtl", "config", "imtlg"])
def test_rank_decisions_follow_the_gradients_precision(name: str) -> None:
    """A rank-2 Jacobian from a float32 backward has a third singular value of rounding
    noise (about 1e-7 of the largest): kept as signal, it made AlignedMTL's and ConFIG's
    float32 update differ from the float64 model's by 100% on 44-50 of 50 draws."""
    for seed in range(6):
        ours, _ = step_on_rank_two(name, seed, torch.float32)
        exact, _ = step_on_rank_two(name, seed, torch.float64)
        scale = max(float(exact.norm()), float(ours.norm()))
        assert float((ours - exact).norm()) <= 1e-4 * scale, (seed, ours, exact)


def strongly_stationary(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    num_tasks = int(rng.integers(3, 7))
    dim = int(rng.integers(2, 12))
    v = rng.uniform(0.1, 1.0, num_tasks)
    jac = rng.standard_normal((num_tasks, dim))
    jac[-1] -= (v @ jac) / v[-1]
    return jac


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_cagrad_with_c_at_least_one_makes_no_step_at_stationary_points(dtype: torch.dtype) -> None:
    """v'J = 0 with v > 0 and c >= 1: the exact CAGrad update is 0. With a 1e-10
    stationarity threshold, 54/100 float64 inputs got a conflicting step (cosine down
    to -1, |d| up to 23% of max|g_i|)."""
    for seed in range(40):
        jac = strongly_stationary(seed)
        step = run_step(agg.CAGrad(c=2.0), jac, dtype)
        assert np.all(step.weights == 0.0), (seed, step.weights)
        assert np.all(step.grads[0] == 0.0)


def test_cagrad_stationary_threshold_is_the_documented_size() -> None:
    from gradtools.aggregation._cagrad import stationary_threshold

    assert 3e-6 < stationary_threshold(2.0**-52) < 4e-6
    assert 3e-4 < stationary_threshold(EPS32) < 4e-4


def test_cagrad_still_steps_off_stationary_points() -> None:
    """The stationarity threshold is not so loose that it stops ordinary steps."""
    rng = np.random.default_rng(0)
    for dtype in (torch.float32, torch.float64):
        for _ in range(10):
            jac = rng.standard_normal((4, 6))
            step = run_step(agg.CAGrad(c=2.0), jac, dtype)
            assert np.linalg.norm(step.grads[0]) > 1e-3 * np.linalg.norm(jac, axis=1).max()


def test_imtlg_without_an_equal_angle_direction_is_defined_and_flagged() -> None:
    """Rank-one gradients whose signs differ: no equal-angle direction exists. The
    float32 Gram made IMTL-G's answer change by 52-128% between two row orders; now it
    is the least-squares direction (row-order independent) and the stats flag it."""
    v = np.array([0.3, -1.2, 0.7])
    jac = np.array([1.0, -2.0, 0.5, 3.0])[:, None] * v[None, :]
    first = run_step("imtlg", jac, torch.float32)
    flipped = run_step("imtlg", jac[::-1].copy(), torch.float32)
    np.testing.assert_allclose(flipped.grads[0], first.grads[0], rtol=1e-5)
    assert first.undefined is not None and bool(first.undefined[0])
    # Signs that cancel (v, -v, 2v, -2v): the weights' sum vanishes, zero weights, flagged.
    cancel = np.array([1.0, -1.0, 2.0, -2.0])[:, None] * v[None, :]
    step = run_step("imtlg", cancel, torch.float32)
    assert np.all(step.weights == 0.0) and step.undefined is not None and bool(step.undefined[0])
    # Independent gradients: the direction exists, nothing is flagged.
    independent = run_step("imtlg", np.random.default_rng(1).standard_normal((3, 5)), torch.float32)
    assert independent.undefined is not None and not independent.undefined.any()


def test_imtlg_direction_does_not_depend_on_dependent_gradients_norms() -> None:
    rng = np.random.default_rng(2)
    g1, g2 = rng.standard_normal((2, 6))
    for dtype in (torch.float32, torch.float64):
        updates = [
            run_step("imtlg", np.stack([g1, g2, k * g2]), dtype).grads[0] for k in (0.01, 1.0, 50.0)
        ]
        for d in updates[1:]:
            cosine = d @ updates[0] / (np.linalg.norm(d) * np.linalg.norm(updates[0]))
            assert cosine > 1 - 1e-6, cosine


def test_undefined_is_reported_per_block_and_none_for_other_methods() -> None:
    v = np.array([0.3, -1.2, 0.7])
    rank_one = np.array([1.0, -2.0, 0.5])[:, None] * v[None, :]
    jac = np.concatenate([rank_one, np.eye(3) + 0.1], axis=1)
    step = run_step("imtlg", jac, torch.float64, sizes=[3, 3])
    assert step.undefined is not None and step.undefined.tolist() == [True, False]
    assert run_step("upgrad", jac, torch.float64).undefined is None


def test_gram_blocks_are_exact_for_float32_gradients() -> None:
    """Products of float32 numbers are exact in float64: the Gram of a rank-one float32
    Jacobian is exactly rank one (float32 arithmetic left eigenvalues of 1e-8)."""
    rng = np.random.default_rng(0)
    values = torch.tensor(rng.standard_normal(5), dtype=torch.float32)
    items = [GramItem([(t, values[t : t + 1]) for t in range(5)], 1)]
    block = gram_blocks(items, 5).blocks[0]
    exact = values.double()[:, None] * values.double()[None, :]
    assert torch.equal(block, exact)
    # Longer vectors: float64 accumulation, to float64's rounding of the sums.
    long = torch.tensor(rng.standard_normal((3, 100_000)), dtype=torch.float32)
    items = [GramItem([(t, long[t]) for t in range(3)], 100_000)]
    block = gram_blocks(items, 3).blocks[0]
    wide = long.double()
    torch.testing.assert_close(block, wide @ wide.T, rtol=1e-13, atol=0)


def test_precision_defaults_to_the_grams_dtype_and_is_validated() -> None:
    jac = np.random.default_rng(0).standard_normal((3, 2)) @ np.random.default_rng(
        1
    ).standard_normal((2, 4))
    gram = gram_of(jac)
    direct = agg.AlignedMTL().aggregate(gram, None).weights
    explicit = agg.AlignedMTL().aggregate(gram, None, precision=2.0**-52).weights
    assert torch.equal(direct, explicit)
    assert agg.gram_precision(gram.float(), None) == EPS32
    assert agg.gram_precision(gram, None) == 2.0**-52
    assert agg.gram_precision(gram, 0.0) == 2.0**-52  # never below float64's epsilon
    for bad in (-1e-3, 1.0, float("nan"), "1e-7", True):
        with pytest.raises(ValueError, match="precision"):
            agg.Mean().aggregate(gram, None, precision=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="precision"):
            agg.UPGrad().aggregate(gram, None, precision=bad)  # type: ignore[arg-type]


def test_aggregators_written_without_precision_still_run_under_multitask() -> None:
    class Legacy(agg.Aggregator):
        name = "legacy-test"

        def aggregate(self, gram: torch.Tensor, draw: torch.Tensor | None) -> agg.Aggregation:
            return agg.Aggregation(torch.full(gram.shape[:2], 0.5, dtype=torch.float64))

    seen: list[float] = []

    class Modern(agg.Aggregator):
        name = "modern-test"

        def aggregate(
            self, gram: torch.Tensor, draw: torch.Tensor | None, *, precision: float | None = None
        ) -> agg.Aggregation:
            seen.append(agg.gram_precision(gram, precision))
            return agg.Aggregation(torch.full(gram.shape[:2], 0.5, dtype=torch.float64))

    for aggregator in (Legacy(), Modern()):
        p = torch.nn.Parameter(torch.ones(3))
        opt = gradtools.MultiTask(torch.optim.SGD([p], lr=0.1), aggregator, shared_params=[p])
        opt.zero_grad()
        opt.backward([p.sum(), 2 * p.sum()])
        torch.testing.assert_close(p.grad, torch.full((3,), 1.5))
    assert seen == [EPS32]


def test_multitask_passes_the_coarsest_gradient_dtype() -> None:
    seen: list[float | None] = []
    original = agg.Mean.aggregate

    class Spy(agg.Mean):
        def aggregate(self, gram, draw, *, precision=None):  # type: ignore[no-untyped-def,override]
            seen.append(precision)
            return original(self, gram, draw, precision=precision)

    wide = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    half = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = gradtools.MultiTask(
        torch.optim.SGD([wide, half], lr=0.1), Spy(), shared_params=[wide, half]
    )
    opt.zero_grad()
    opt.backward([wide.sum() + half.float().sum(), 2 * wide.sum() + half.float().sum()])
    assert seen == [float(torch.finfo(torch.bfloat16).eps)]
