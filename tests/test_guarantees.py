"""Every property of gradtools.aggregation.guarantees, asserted end to end through MultiTask.

For each aggregator, each property the table claims for it is checked on a real
optimizer step: task i's loss is ``<J_i, p>``, so its gradient on the shared
parameters is exactly row i of a Jacobian J, in float32 or float64. The
Jacobians include linearly dependent rows (rank below T, duplicates, opposite
pairs), zero rows, per-task scales from 1e-10 to 1e15, and, under
``granularity="tensor"``, shared tensors with fewer elements than tasks. The
tolerances are the table's own (:func:`guarantees.tolerance`): a claim is made
to the precision stated there, and a property the table does not list is not
claimed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from aggregator_cases import run_step
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradtools import aggregation as agg
from gradtools.aggregation import guarantees

FEW = settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
DTYPES = [torch.float32, torch.float64]


def build(name: str, **kwargs: float) -> agg.Aggregator:
    return agg.from_name(name, **kwargs)


def claims(prop: str) -> list[str]:
    return sorted(n for n, held in guarantees.GUARANTEES.items() if prop in held)


# --------------------------------------------------------------------------- inputs


@st.composite
def jacobians(
    draw: st.DrawFn, min_tasks: int = 2, max_tasks: int = 6
) -> tuple[np.ndarray, list[int] | None]:
    """A [T, D] Jacobian of any rank with dependent and zero rows and per-task scales
    10^[-10, 15], and a layout: None (one shared tensor) or tensor sizes starting
    with one element (fewer elements than tasks)."""
    num_tasks = draw(st.integers(min_tasks, max_tasks))
    dim = draw(st.integers(1, 8))
    rank = draw(st.integers(1, min(num_tasks, dim)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    jac = rng.standard_normal((num_tasks, rank)) @ rng.standard_normal((rank, dim))
    for _ in range(draw(st.integers(0, num_tasks // 2))):
        i, j = draw(st.integers(0, num_tasks - 1)), draw(st.integers(0, num_tasks - 1))
        if i != j:
            jac[j] = draw(st.sampled_from([-2.0, -1.0, 1.0, 3.0])) * jac[i]
    for _ in range(draw(st.integers(0, num_tasks // 3))):
        jac[draw(st.integers(0, num_tasks - 1))] = 0.0
    exponents = draw(st.lists(st.integers(-10, 15), min_size=num_tasks, max_size=num_tasks))
    jac = jac * (10.0 ** np.array(exponents, dtype=np.float64))[:, None]
    layout = None
    if dim >= 2 and draw(st.booleans()):
        layout = [1, dim - 1]
    return jac, layout


@st.composite
def independent(draw: st.DrawFn) -> np.ndarray:
    """Linearly independent rows (T <= D - 2), per-task scales 10^[-10, 15]."""
    num_tasks = draw(st.integers(2, 5))
    dim = draw(st.integers(num_tasks + 2, num_tasks + 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    exponents = draw(st.lists(st.integers(-10, 15), min_size=num_tasks, max_size=num_tasks))
    scales = 10.0 ** np.array(exponents, dtype=np.float64)
    return rng.standard_normal((num_tasks, dim)) * scales[:, None]


@st.composite
def strongly_stationary(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """(J, v) with v'J = 0 and v > 0 (T 3-6, D 2-11): a strongly Pareto-stationary point."""
    num_tasks = draw(st.integers(3, 6))
    dim = draw(st.integers(2, 11))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    v = rng.uniform(0.5, 1.0, num_tasks)
    jac = rng.standard_normal((num_tasks, dim))
    jac[-1] = -(v[:-1] @ jac[:-1]) / v[-1]
    scales = 10.0 ** rng.uniform(-1, 1, num_tasks)
    return jac * scales[:, None], v / scales


# --------------------------------------------------------------------------- the checks


def check_weighted(
    name: str, dtype: torch.dtype, jac: np.ndarray, layout: list[int] | None
) -> None:
    step = run_step(build(name), jac, dtype, layout)
    tol = guarantees.tolerance("weighted", dtype, jac.shape[0])
    for b, (rows, grad) in enumerate(zip(step.jacs, step.grads, strict=True)):
        expected = rows.T @ step.weights[b]
        per_element = np.abs(rows.T) @ np.abs(step.weights[b])
        assert np.all(np.abs(grad - expected) <= tol * per_element + 1e-300), (b, grad, expected)


def check_finite(name: str, dtype: torch.dtype, jac: np.ndarray, layout: list[int] | None) -> None:
    step = run_step(build(name), jac, dtype, layout)
    assert np.isfinite(step.weights).all()
    assert all(np.isfinite(g).all() for g in step.grads)


def check_non_conflicting(
    name: str, dtype: torch.dtype, jac: np.ndarray, layout: list[int] | None
) -> None:
    step = run_step(build(name), jac, dtype, layout)
    floor = guarantees.solver_floor("non_conflicting")
    rounding = guarantees.tolerance("non_conflicting", dtype, jac.shape[0]) - floor
    for b, (rows, grad) in enumerate(zip(step.jacs, step.grads, strict=True)):
        dots = rows @ grad
        norms = np.linalg.norm(rows, axis=1)
        bound = rounding * norms * step.scale(b) + floor * norms.max() ** 2
        assert np.all(dots >= -bound), (b, dots, bound)


def check_permutation_invariant(
    name: str, dtype: torch.dtype, jac: np.ndarray, layout: list[int] | None
) -> None:
    perm = np.random.default_rng(jac.shape[0] * 7 + jac.shape[1]).permutation(jac.shape[0])
    plain = run_step(build(name), jac, dtype, layout)
    permuted = run_step(build(name), jac[perm], dtype, layout)
    tol = guarantees.tolerance("permutation_invariant", dtype, jac.shape[0])
    for b in range(len(plain.grads)):
        scale = max(plain.scale(b), permuted.scale(b))
        np.testing.assert_allclose(
            permuted.grads[b], plain.grads[b], rtol=0, atol=tol * scale + 1e-300
        )


def check_linear_under_scaling(
    name: str, dtype: torch.dtype, jac: np.ndarray, layout: list[int] | None
) -> None:
    rng = np.random.default_rng(jac.shape[0] * 11 + jac.shape[1])
    c1, c2 = 10.0 ** rng.uniform(-2, 2, size=(2, jac.shape[0]))
    steps = [run_step(build(name), jac * c[:, None], dtype, layout) for c in (c1, c2, c1 + c2)]
    tol = guarantees.tolerance("linear_under_scaling", dtype, jac.shape[0])
    for b in range(len(steps[0].grads)):
        scale = sum(s.scale(b) for s in steps)
        np.testing.assert_allclose(
            steps[2].grads[b],
            steps[0].grads[b] + steps[1].grads[b],
            rtol=0,
            atol=tol * scale + 1e-300,
        )


def check_scale_invariant_weights(
    name: str, dtype: torch.dtype, jac: np.ndarray, layout: list[int] | None
) -> None:
    # Powers of two scale float32 and float64 gradients exactly (no overflow here).
    plain = run_step(build(name), jac, dtype, layout)
    for exponent in (-20, 20):
        scaled = run_step(build(name), jac * 2.0**exponent, dtype, layout)
        tol = guarantees.tolerance("scale_invariant_weights", dtype, jac.shape[0])
        np.testing.assert_allclose(
            scaled.weights, plain.weights, rtol=0, atol=tol * np.abs(plain.weights).max() + 1e-300
        )


def check_convex_weights(
    name: str, dtype: torch.dtype, jac: np.ndarray, layout: list[int] | None
) -> None:
    step = run_step(build(name), jac, dtype, layout)
    tol = guarantees.tolerance("convex_weights", dtype, jac.shape[0])
    assert np.all(step.weights >= -tol)
    np.testing.assert_allclose(step.weights.sum(-1), 1.0, rtol=0, atol=tol)


def check_equal_angle(name: str, dtype: torch.dtype, jac: np.ndarray) -> None:
    step = run_step(build(name), jac, dtype)
    rows, grad = step.jacs[0], step.grads[0]
    if step.undefined is not None and step.undefined[0]:
        return  # IMTL-G's weights vanished: checked in test_aggregator_precision.py
    projections = (rows @ grad) / np.linalg.norm(rows, axis=1)
    tol = guarantees.tolerance("equal_angle", dtype, jac.shape[0])
    spread = projections.max() - projections.min()
    assert spread <= tol * step.scale(0), (projections, step.scale(0))


def check_zero_at_stationary(
    name: str, dtype: torch.dtype, case: tuple[np.ndarray, np.ndarray], **kwargs: float
) -> None:
    jac, v = case
    prop = "zero_at_stationary_c_ge_1" if kwargs else "zero_at_stationary"
    step = run_step(build(name, **kwargs), jac, dtype)
    norms = np.linalg.norm(step.jacs[0], axis=1)
    tol = guarantees.tolerance(prop, dtype, jac.shape[0])
    bound = tol * norms.max() * v.max() / v.min()
    assert np.linalg.norm(step.grads[0]) <= bound, (np.linalg.norm(step.grads[0]), bound)


# --------------------------------------------------------------------------- the table


GENERAL: dict[str, Callable[..., None]] = {
    "weighted": check_weighted,
    "finite": check_finite,
    "non_conflicting": check_non_conflicting,
    "permutation_invariant": check_permutation_invariant,
    "linear_under_scaling": check_linear_under_scaling,
    "scale_invariant_weights": check_scale_invariant_weights,
    "convex_weights": check_convex_weights,
}
SPECIAL = {"equal_angle", "zero_at_stationary", "zero_at_stationary_c_ge_1"}


def test_every_property_has_a_check_and_every_aggregator_an_entry() -> None:
    """A claim the tests do not assert is not made: the table and these checks name the same things."""
    assert set(GENERAL) | SPECIAL == set(guarantees.PROPERTIES)
    assert set(guarantees.GUARANTEES) == set(agg.available())
    for name, held in guarantees.GUARANTEES.items():
        assert held <= set(guarantees.PROPERTIES), name
        assert {"weighted", "finite"} <= held, name
    assert set(guarantees.HOLDS_TO) == set(guarantees.PROPERTIES)


def test_markdown_table_lists_every_aggregator_and_property() -> None:
    table = guarantees.markdown_table()
    escaped = chr(92) + "|"  # a | inside a cell must be written \|
    for name in agg.available():
        assert f"| `{name}` |" in table
    for prop, meaning in guarantees.PROPERTIES.items():
        assert f"| `{prop}` | {meaning.replace('|', escaped)} |" in table
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == len(agg.available()) + len(guarantees.PROPERTIES)
    separators = [line.replace(escaped, "").count("|") for line in rows]
    assert set(separators[: len(agg.available())]) == {len(guarantees.PROPERTIES) + 2}
    assert set(separators[len(agg.available()) :]) == {4}


GENERAL_CASES = [
    pytest.param(prop, name, dtype, id=f"{prop}-{name}-{str(dtype)[6:]}")
    for prop in GENERAL
    for name in claims(prop)
    for dtype in DTYPES
]


@pytest.mark.parametrize(("prop", "name", "dtype"), GENERAL_CASES)
@FEW
@given(case=jacobians())
def test_claimed_property_holds_through_multitask(
    prop: str, name: str, dtype: torch.dtype, case: tuple[np.ndarray, list[int] | None]
) -> None:
    jac, layout = case
    GENERAL[prop](name, dtype, jac, layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", claims("equal_angle"))
@FEW
@given(jac=independent())
def test_equal_angle_on_independent_gradients(
    name: str, dtype: torch.dtype, jac: np.ndarray
) -> None:
    check_equal_angle(name, dtype, jac)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", claims("zero_at_stationary"))
@FEW
@given(case=strongly_stationary())
def test_zero_update_at_strongly_stationary_points(
    name: str, dtype: torch.dtype, case: tuple[np.ndarray, np.ndarray]
) -> None:
    check_zero_at_stationary(name, dtype, case)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("c", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("name", claims("zero_at_stationary_c_ge_1"))
@settings(FEW, max_examples=25)
@given(case=strongly_stationary())
def test_zero_update_at_strongly_stationary_points_for_c_at_least_one(
    name: str, c: float, dtype: torch.dtype, case: tuple[np.ndarray, np.ndarray]
) -> None:
    check_zero_at_stationary(name, dtype, case, c=c)
