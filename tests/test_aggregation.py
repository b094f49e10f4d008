"""Property tests for the Gram-matrix PCGrad math in gradtools.aggregation.

The reference is the algorithm as written in the paper, run directly on explicit
float64 vectors: for each task, walk the others in the given order and subtract
the projection of the current vector onto each conflicting original gradient.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradtools.aggregation import (
    cosine_similarity,
    draw_orders,
    magnitude_similarity,
    pcgrad,
    pcgrad_weights,
    validate_orders,
)

SETTINGS = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def walk(grads: np.ndarray, i: int, order: list[int]) -> np.ndarray:
    """g_i^PC by direct sequential projection (slow, obviously correct)."""
    current = grads[i].copy()
    for j in order:
        norm_sq = float(grads[j] @ grads[j])
        dot = float(current @ grads[j])
        if dot < 0 and norm_sq > 0:
            current = current - (dot / norm_sq) * grads[j]
    return current


def reference_pcgrad_sum(grads: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """sum_i g_i^PC, each by direct sequential projection."""
    return sum(
        (walk(grads, i, [int(j) for j in orders[i]]) for i in range(grads.shape[0])),
        np.zeros(grads.shape[1]),
    )


@st.composite
def task_gradients(draw: st.DrawFn, min_tasks: int = 1, max_tasks: int = 8) -> np.ndarray:
    """[T, d] float64 gradients of controlled rank and per-task scale 1e-30..1e30.

    Structure (rank, zero rows, anti-parallel pairs, scales) is drawn by
    hypothesis so failures shrink to readable cases; the values come from a
    seeded generator.
    """
    num_tasks = draw(st.integers(min_tasks, max_tasks))
    dim = draw(st.integers(1, 12))
    rank = draw(st.integers(1, min(num_tasks, dim)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    grads = rng.standard_normal((num_tasks, rank)) @ rng.standard_normal((rank, dim))
    # Anti-parallel pairs: task j becomes a negative multiple of task i.
    for _ in range(draw(st.integers(0, num_tasks // 2))):
        i, j = draw(st.integers(0, num_tasks - 1)), draw(st.integers(0, num_tasks - 1))
        if i != j:
            grads[j] = -draw(st.floats(0.1, 10.0)) * grads[i]
    # Exact zeros: whole tasks and single coordinates.
    for _ in range(draw(st.integers(0, num_tasks // 2))):
        grads[draw(st.integers(0, num_tasks - 1))] = 0.0
    if draw(st.booleans()):
        grads[:, draw(st.integers(0, dim - 1))] = 0.0
    exponents = draw(st.lists(st.integers(-30, 30), min_size=num_tasks, max_size=num_tasks))
    return grads * (10.0 ** np.array(exponents, dtype=np.float64))[:, None]


def random_orders(num_tasks: int, seed: int) -> torch.Tensor:
    return draw_orders(num_tasks, torch.Generator().manual_seed(seed))


def gram_of(grads: np.ndarray) -> torch.Tensor:
    array = torch.from_numpy(grads)
    return array @ array.T


def combine(weights: torch.Tensor, grads: np.ndarray) -> np.ndarray:
    return (weights.numpy()[:, None] * grads).sum(0)


def assert_close_to(actual: np.ndarray, expected: np.ndarray, grads: np.ndarray) -> None:
    # The error of both computations scales with the largest input gradient; a
    # projection whose dot product is near zero removes a near-zero amount, so a
    # sign decided differently by rounding cannot move the result by more.
    scale = np.abs(grads).max(initial=0.0) * math.sqrt(grads.shape[1]) * grads.shape[0]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-10 * scale + 1e-300)


@SETTINGS
@given(grads=task_gradients(), seed=st.integers(0, 1000))
def test_matches_direct_sequential_projection(grads: np.ndarray, seed: int) -> None:
    orders = random_orders(grads.shape[0], seed)
    weights = pcgrad_weights(gram_of(grads), orders, "sum")
    assert_close_to(combine(weights, grads), reference_pcgrad_sum(grads, orders.numpy()), grads)


@SETTINGS
@given(grads=task_gradients(), seed=st.integers(0, 1000))
def test_coefficient_rows_are_the_projected_gradients(grads: np.ndarray, seed: int) -> None:
    orders = random_orders(grads.shape[0], seed)
    result = pcgrad(gram_of(grads), orders)
    for i in range(grads.shape[0]):
        expected = walk(grads, i, orders[i].tolist())
        assert_close_to(combine(result.coefficients[i], grads), expected, grads)
    assert not result.projected.diagonal().any(), "a task was compared with itself"


@SETTINGS
@given(grads=task_gradients(), seed=st.integers(0, 1000))
def test_output_is_finite_and_bounded(grads: np.ndarray, seed: int) -> None:
    orders = random_orders(grads.shape[0], seed)
    result = pcgrad(gram_of(grads), orders)
    assert torch.isfinite(result.coefficients).all()
    # |g_i^PC| <= |g_i|: projection never lengthens a gradient.
    norms = np.linalg.norm(grads, axis=1)
    for i in range(grads.shape[0]):
        projected = combine(result.coefficients[i], grads)
        assert np.linalg.norm(projected) <= norms[i] * (1 + 1e-9) + 1e-300


@SETTINGS
@given(
    num_tasks=st.integers(1, 8),
    dim=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    exponents=st.lists(st.integers(-30, 30), min_size=8, max_size=8),
)
def test_no_conflict_gives_plain_sum_exactly(
    num_tasks: int, dim: int, seed: int, exponents: list[int]
) -> None:
    rng = np.random.default_rng(seed)
    # Non-negative vectors never conflict.
    grads = np.abs(rng.standard_normal((num_tasks, dim)))
    grads *= (10.0 ** np.array(exponents[:num_tasks], dtype=np.float64))[:, None]
    result = pcgrad(gram_of(grads), random_orders(num_tasks, seed % 1000))
    assert not result.projected.any()
    assert torch.equal(result.coefficients, torch.eye(num_tasks, dtype=torch.float64))
    weights = pcgrad_weights(gram_of(grads), random_orders(num_tasks, 1), "sum")
    assert torch.equal(weights, torch.ones(num_tasks, dtype=torch.float64))


@SETTINGS
@given(grads=task_gradients(min_tasks=2, max_tasks=2))
def test_two_tasks_no_longer_conflict(grads: np.ndarray) -> None:
    gram = gram_of(grads)
    orders = draw_orders(2)
    coefficients = pcgrad(gram, orders).coefficients
    projected_gram = coefficients @ gram @ coefficients.T
    # Rounding errors scale with the input norms (the outputs may be exactly 0,
    # e.g. for anti-parallel gradients).
    tolerance = 1e-9 * math.sqrt(gram[0, 0] * gram[1, 1])
    # <g_0^PC, g_1^PC> = -<g_0, g_1> (1 - cos^2) >= 0 when they conflicted.
    assert projected_gram[0, 1] >= -tolerance
    # After the projection, each one is orthogonal to the other's original gradient.
    after = coefficients @ gram
    if gram[0, 1] < 0:
        assert abs(after[0, 1]) <= tolerance
        assert abs(after[1, 0]) <= tolerance


@SETTINGS
@given(
    grads=task_gradients(),
    seed=st.integers(0, 1000),
    power=st.integers(-60, 60),
)
def test_positive_homogeneity(grads: np.ndarray, seed: int, power: int) -> None:
    orders = random_orders(grads.shape[0], seed)
    gram = gram_of(grads)
    # A power-of-two scale is exact in floating point, so the weights must be
    # bit-for-bit the same: PCGrad(s g) = s PCGrad(g).
    scaled = gram * (2.0 ** (2 * power))
    assert torch.equal(pcgrad_weights(gram, orders), pcgrad_weights(scaled, orders))
    # Any other positive scale: equal up to rounding.
    other = pcgrad_weights(gram * 7.3**2, orders)
    assert_close_to(
        combine(other, grads),
        combine(pcgrad_weights(gram, orders), grads),
        grads,
    )


@SETTINGS
@given(grads=task_gradients(), seed=st.integers(0, 1000), perm_seed=st.integers(0, 1000))
def test_permutation_equivariance(grads: np.ndarray, seed: int, perm_seed: int) -> None:
    num_tasks = grads.shape[0]
    orders = random_orders(num_tasks, seed)
    perm = torch.randperm(num_tasks, generator=torch.Generator().manual_seed(perm_seed))
    inverse = torch.argsort(perm)
    # New task a is old task perm[a]; it visits the same old tasks, relabelled.
    permuted_orders = inverse[orders[perm]]
    gram = gram_of(grads)
    permuted_gram = gram[perm][:, perm]
    base = pcgrad(gram, orders)
    moved = pcgrad(permuted_gram, permuted_orders)
    permuted_grads = grads[perm.numpy()]
    # Coefficients on (near-)collinear gradients are not unique, so compare what
    # they describe: each projected gradient.
    for a in range(num_tasks):
        assert_close_to(
            combine(moved.coefficients[a], permuted_grads),
            combine(base.coefficients[int(perm[a])], grads),
            grads,
        )


@SETTINGS
@given(grads=task_gradients(min_tasks=1, max_tasks=5), seed=st.integers(0, 1000))
def test_mean_is_sum_over_num_tasks(grads: np.ndarray, seed: int) -> None:
    orders = random_orders(grads.shape[0], seed)
    gram = gram_of(grads)
    torch.testing.assert_close(
        pcgrad_weights(gram, orders, "mean") * grads.shape[0],
        pcgrad_weights(gram, orders, "sum"),
        rtol=1e-15,
        atol=0,
    )


def test_batched_equals_one_by_one() -> None:
    rng = np.random.default_rng(0)
    grams = torch.stack([gram_of(rng.standard_normal((4, 6))) for _ in range(5)])
    orders = random_orders(4, 3)
    batched = pcgrad(grams.view(5, 1, 4, 4), orders)
    for b in range(5):
        single = pcgrad(grams[b], orders)
        torch.testing.assert_close(batched.coefficients[b, 0], single.coefficients)
        assert torch.equal(batched.projected[b, 0], single.projected)


def test_known_two_task_example() -> None:
    # g0 = (1, 0), g1 = (-1, 1): dot -1. g0^PC = g0 + 1/2 g1, g1^PC = g1 + g0.
    grads = np.array([[1.0, 0.0], [-1.0, 1.0]])
    result = pcgrad(gram_of(grads), draw_orders(2))
    torch.testing.assert_close(
        result.coefficients, torch.tensor([[1.0, 0.5], [1.0, 1.0]], dtype=torch.float64)
    )
    assert result.projected.tolist() == [[False, True], [True, False]]
    np.testing.assert_allclose(combine(result.coefficients.sum(0), grads), [0.5, 1.5])


def test_order_matters_and_is_respected() -> None:
    # Three tasks where task 0's result depends on which conflict it resolves first.
    grads = np.array([[1.0, 0.0], [-1.0, 1.0], [-1.0, -2.0]])
    gram = gram_of(grads)
    first = torch.tensor([[1, 2], [0, 2], [0, 1]])
    second = torch.tensor([[2, 1], [0, 2], [0, 1]])
    row_first = combine(pcgrad(gram, first).coefficients[0], grads)
    row_second = combine(pcgrad(gram, second).coefficients[0], grads)
    np.testing.assert_allclose(row_first, walk(grads, 0, [1, 2]))
    np.testing.assert_allclose(row_second, walk(grads, 0, [2, 1]))
    np.testing.assert_allclose(row_first, [0.2, -0.1])
    np.testing.assert_allclose(row_second, [0.2, 0.2])


def test_zero_gradient_gives_finite_identity_row() -> None:
    grads = np.array([[0.0, 0.0], [1.0, -2.0], [-3.0, 1.0]])
    result = pcgrad(gram_of(grads), random_orders(3, 0))
    assert torch.isfinite(result.coefficients).all()
    torch.testing.assert_close(
        result.coefficients[0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    )
    assert not result.projected[:, 0].any(), "projected onto a zero gradient"


def test_single_task_is_identity() -> None:
    result = pcgrad(torch.tensor([[4.0]]), draw_orders(1))
    assert result.coefficients.tolist() == [[1.0]]
    assert pcgrad_weights(torch.tensor([[0.0]]), draw_orders(1)).tolist() == [1.0]


def test_draw_orders_permutes_the_other_tasks_and_is_seeded() -> None:
    for num_tasks in range(1, 9):
        orders = draw_orders(num_tasks, torch.Generator().manual_seed(num_tasks))
        validate_orders(orders, num_tasks)
    a = draw_orders(6, torch.Generator().manual_seed(5))
    b = draw_orders(6, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    # Over many draws, every other task shows up first for task 0.
    gen = torch.Generator().manual_seed(0)
    firsts = {int(draw_orders(4, gen)[0, 0]) for _ in range(200)}
    assert firsts == {1, 2, 3}


@pytest.mark.parametrize(
    ("orders", "message"),
    [
        (torch.tensor([[1, 2], [0, 2]]), "shape"),
        (torch.tensor([[0, 2], [0, 2], [0, 1]]), "row 0"),
        (torch.tensor([[1, 1], [0, 2], [0, 1]]), "row 0"),
        (torch.tensor([[1.0, 2.0], [0.0, 2.0], [0.0, 1.0]]), "integer"),
    ],
)
def test_bad_orders_are_rejected(orders: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pcgrad(torch.eye(3), orders)


@pytest.mark.parametrize(
    ("gram", "message"),
    [
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "non-finite"),
        (torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), "non-finite"),
        (torch.ones(2, 3), "shape"),
        (torch.ones(2, 2, dtype=torch.int64), "floating"),
    ],
)
def test_bad_gram_is_rejected(gram: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pcgrad(gram, draw_orders(gram.shape[-1]))


def test_bad_reduction_is_rejected() -> None:
    with pytest.raises(ValueError, match="reduction"):
        pcgrad_weights(torch.eye(2), draw_orders(2), "avg")  # type: ignore[arg-type]


@SETTINGS
@given(grads=task_gradients())
def test_cosine_and_magnitude_similarity(grads: np.ndarray) -> None:
    gram = gram_of(grads)
    cos = cosine_similarity(gram)
    phi = magnitude_similarity(gram)
    norms = np.linalg.norm(grads, axis=1)
    for i in range(grads.shape[0]):
        for j in range(grads.shape[0]):
            if norms[i] > 0 and norms[j] > 0:
                expected_cos = (grads[i] / norms[i]) @ (grads[j] / norms[j])
                assert abs(float(cos[i, j]) - expected_cos) <= 1e-9
                ratio = min(norms[i], norms[j]) / max(norms[i], norms[j])
                assert abs(float(phi[i, j]) - 2 * ratio / (1 + ratio**2)) <= 1e-12
            elif i != j:
                assert float(cos[i, j]) == 0.0
    assert torch.isfinite(phi).all() and (phi >= 0).all() and (phi <= 1).all()
    assert torch.equal(phi, phi.T)


def test_magnitude_similarity_known_values() -> None:
    gram = torch.tensor([[1.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    phi = magnitude_similarity(gram)
    # |g0| = 1, |g1| = 2: 2*2/(1+4) = 0.8.
    assert float(phi[0, 1]) == pytest.approx(0.8)
    assert float(phi[0, 2]) == 1.0
