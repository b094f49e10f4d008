"""The multi-task aggregators of gradtools.aggregation: stated guarantees and paper transcriptions.

Each aggregator maps a Gram block to weights; the tests look at the aggregated
vector J'w on random Jacobians of controlled rank and scale. Comparisons with
torchjd live in test_aggregators_torchjd.py. Where torchjd's solver needs a
package we do not install (quadprog for UPGrad/DualProj, cvxpy for CAGrad and
Nash-MTL), the reference here is a direct transcription of the paper's
problem, solved by scipy in the gradient space (the primal), independently of
our Gram-space (dual) solvers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from aggregator_cases import (
    SETTINGS,
    combined,
    degenerate,
    draw_for,
    every_aggregator,
    fresh,
    gram_of,
    random_jacobian,
    term_scale,
    weights_on,
    well_conditioned,
)
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import least_squares, minimize

from gradtools import aggregation as agg

DETERMINISTIC = [a for a in every_aggregator() if a.draw(2, None) is None]
NON_CONFLICTING = [agg.UPGrad(), agg.DualProj(), agg.MGDA()]


def ids(aggregators: list[agg.Aggregator]) -> list[str]:
    return [repr(a) for a in aggregators]


# --------------------------------------------------------------------------- references


def _faces(num_tasks: int) -> list[list[int]]:
    return [[i for i in range(num_tasks) if mask >> i & 1] for mask in range(2**num_tasks)]


def project_onto_dual_cone_primal(jac: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """argmin_x |x - x0| s.t. J x >= 0, by definition: the closest feasible point among the
    projections of x0 onto every face {J_S x = 0} of the cone (exact, 2^T faces)."""
    best, best_dist = None, math.inf
    scale = float(np.linalg.norm(jac, axis=1).max() * max(np.linalg.norm(x0), 1e-300))
    for face in _faces(len(jac)):
        rows = jac[face]
        x = x0 - rows.T @ np.linalg.lstsq(rows @ rows.T, rows @ x0, rcond=None)[0] if face else x0
        if (jac @ x >= -1e-10 * scale).all() and np.linalg.norm(x - x0) < best_dist:
            best, best_dist = x, float(np.linalg.norm(x - x0))
    assert best is not None
    return best


def mgda_reference(jac: np.ndarray) -> np.ndarray:
    """Min-norm point of the convex hull of the rows (Désidéri 2012), by definition: the
    shortest among the min-norm points of the affine hulls of every subset of rows whose
    weights are non-negative (exact, 2^T subsets)."""
    best, best_norm = None, math.inf
    for face in _faces(len(jac))[1:]:
        rows = jac[face]
        k = len(face)
        kkt = np.block([[rows @ rows.T, np.ones((k, 1))], [np.ones((1, k)), np.zeros((1, 1))]])
        w = np.linalg.lstsq(kkt, np.append(np.zeros(k), 1.0), rcond=None)[0][:k]
        if (w >= -1e-12).all():
            d = rows.T @ w
            if np.linalg.norm(d) < best_norm:
                best, best_norm = d, float(np.linalg.norm(d))
    assert best is not None
    return best


def cagrad_reference(jac: np.ndarray, c: float) -> np.ndarray:
    """CAGrad as the paper's Algorithm 1 writes it: w = argmin over the simplex of
    <g_w, g0> + c |g0| |g_w| (SLSQP, on the Jacobian rescaled to unit largest norm),
    then d = g0 + (c |g0| / |g_w|) g_w."""
    scale = float(np.linalg.norm(jac, axis=1).max())
    unit = jac / scale
    num_tasks = len(unit)
    gram = unit @ unit.T
    g0 = unit.mean(axis=0)
    radius = c * float(np.linalg.norm(g0))
    toward = unit @ g0

    def objective(w: np.ndarray) -> float:
        return float(w @ toward) + radius * math.sqrt(max(float(w @ gram @ w), 1e-300))

    def gradient(w: np.ndarray) -> np.ndarray:
        return toward + radius * (gram @ w) / math.sqrt(max(float(w @ gram @ w), 1e-300))

    result = minimize(
        objective,
        np.full(num_tasks, 1.0 / num_tasks),
        jac=gradient,
        bounds=[(0.0, None)] * num_tasks,
        constraints=[
            {"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}
        ],
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    w = result.x
    g_w = unit.T @ w
    return scale * (g0 + (radius / float(np.linalg.norm(g_w))) * g_w)


def nash_reference(jac: np.ndarray) -> np.ndarray:
    """Nash-MTL's bargaining solution (Navon et al. 2022, Eq. 3): (G a)_i = 1/a_i, a > 0,
    on the raw G (the official code's constraint a_i (G a)_i >= 1 has the normalisation of G
    multiplied back in); scipy least squares, on G / |G|_F for its conditioning, scaled back."""
    gram = jac @ jac.T
    frobenius = float(np.linalg.norm(gram))
    gram = gram / frobenius
    result = least_squares(
        lambda a: gram @ a - 1.0 / a,
        np.ones(len(gram)),
        bounds=(1e-12, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
    )
    return jac.T @ result.x / math.sqrt(frobenius)


# --------------------------------------------------------------------------- registry


def test_from_name_is_case_insensitive_and_passes_arguments() -> None:
    assert isinstance(agg.from_name("UPGrad"), agg.UPGrad)
    assert isinstance(agg.from_name("nash-mtl"), agg.NashMTL)
    assert isinstance(agg.from_name("IMTL_G"), agg.IMTLG)
    cagrad = agg.from_name("CAGrad", c=0.7)
    assert isinstance(cagrad, agg.CAGrad) and cagrad.c == 0.7
    assert agg.from_name("pcgrad", reduction="mean").head_weight(4) == 0.25


def test_from_name_rejects_unknown_names_listing_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown aggregator 'graddrop'.*upgrad"):
        agg.from_name("graddrop")


def test_every_method_of_the_issue_is_registered() -> None:
    expected = {
        "sum", "mean", "random", "pcgrad", "mgda", "cagrad", "imtlg", "nashmtl",
        "alignedmtl", "upgrad", "dualproj", "gradvac", "fairgrad", "config",
    }  # fmt: skip
    assert set(agg.available()) == expected


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: agg.CAGrad(c=-1.0), "c must be"),
        (lambda: agg.FairGrad(alpha=-0.5), "alpha must be"),
        (lambda: agg.GradVac(beta=1.5), "beta must be"),
        (lambda: agg.AlignedMTL(scale_mode="max"), "scale_mode"),  # type: ignore[arg-type]
        (lambda: agg.NashMTL(update_every=0), "update_every"),
        (lambda: agg.NashMTL(max_norm=0.0), "max_norm"),
        (lambda: agg.PCGrad(reduction="avg"), "reduction"),  # type: ignore[arg-type]
    ],
)
def test_bad_parameters_are_rejected_by_name(factory, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        factory()


@pytest.mark.parametrize("aggregator", every_aggregator(), ids=ids(every_aggregator()))
def test_malformed_gram_is_rejected_naming_it(aggregator: agg.Aggregator) -> None:
    draw = draw_for(aggregator, 2)
    with pytest.raises(ValueError, match="gram"):
        aggregator.aggregate(torch.eye(2, dtype=torch.float64), draw)  # missing block dim
    with pytest.raises(ValueError, match="gram"):
        aggregator.aggregate(torch.full((1, 2, 2), math.nan, dtype=torch.float64), draw)


@pytest.mark.parametrize("aggregator", [agg.PCGrad(), agg.GradVac(), agg.Random()], ids=repr)
def test_random_methods_demand_their_draw(aggregator: agg.Aggregator) -> None:
    with pytest.raises(ValueError, match="draw"):
        aggregator.aggregate(torch.eye(3, dtype=torch.float64).unsqueeze(0), None)


# --------------------------------------------------------------------------- finiteness


@pytest.mark.parametrize("aggregator", every_aggregator(), ids=ids(every_aggregator()))
@SETTINGS
@given(jac=degenerate())
def test_weights_are_finite_on_degenerate_inputs(
    aggregator: agg.Aggregator, jac: np.ndarray
) -> None:
    """Any rank, zero and duplicate/opposite gradients, scales 1e-30..1e30: finite weights
    and a finite aggregated vector of the scale of its terms."""
    weights = weights_on(aggregator, jac, draw_for(aggregator, jac.shape[0]))
    assert weights.shape == (jac.shape[0],)
    assert np.isfinite(weights).all()
    d = jac.T @ weights
    assert np.isfinite(d).all()


@pytest.mark.parametrize("aggregator", every_aggregator(), ids=ids(every_aggregator()))
def test_all_zero_block_gives_the_documented_finite_weights(aggregator: agg.Aggregator) -> None:
    weights = weights_on(aggregator, np.zeros((3, 4)), draw_for(aggregator, 3))
    assert np.isfinite(weights).all()
    if isinstance(aggregator, agg.BlockAggregator):
        np.testing.assert_array_equal(weights, aggregator.zero_weights(3))


@pytest.mark.parametrize(
    ("aggregator", "expected"),
    [
        (agg.Sum(), 1.0),
        (agg.Mean(), 1.0),
        (agg.Random(), 1.0),
        (agg.PCGrad(), 1.0),
        (agg.MGDA(), 1.0),
        (agg.CAGrad(c=0.4), 1.4),
        (agg.IMTLG(), 1.0),
        (agg.ConFIG(), 1.0),
        (agg.AlignedMTL(), 1.0),
        (agg.UPGrad(), 1.0),
        (agg.DualProj(), 1.0),
        # The paper's balance a (|g|^2 a) = 1: the unit vector along g (not clipped at 1).
        (agg.NashMTL(), 1.0 / (math.sqrt(26.0) * 1e-7)),
        (agg.GradVac(), 1.0),
    ],
    ids=repr,
)
def test_single_task_weights(aggregator: agg.Aggregator, expected: float) -> None:
    """T = 1: every method returns (a documented multiple of) the task's own gradient."""
    jac = np.array([[3.0, -4.0, 1.0]]) * 1e-7
    np.testing.assert_allclose(
        weights_on(aggregator, jac, draw_for(aggregator, 1)), [expected], rtol=1e-7
    )


def test_fairgrad_single_task_follows_its_scale_law() -> None:
    """(G w) = w^(-1/alpha) with G = |g|^2 gives w = |g|^(-2 alpha/(alpha+1))."""
    for alpha in (0.5, 1.0, 3.0):
        jac = np.array([[3.0, -4.0]])  # |g| = 5
        expected = 5.0 ** (-2 * alpha / (alpha + 1))
        np.testing.assert_allclose(
            weights_on(agg.FairGrad(alpha), jac, None), [expected], rtol=1e-6
        )


@pytest.mark.parametrize("aggregator", NON_CONFLICTING, ids=repr)
def test_opposite_gradients_give_a_zero_update(aggregator: agg.Aggregator) -> None:
    g = np.array([1.0, -2.0, 0.5])
    jac = np.stack([g, -2.0 * g])
    d = combined(aggregator, jac, None)
    assert np.linalg.norm(d) <= 1e-10 * np.linalg.norm(g)


def test_cagrad_on_exactly_cancelling_gradients_is_the_zero_mean() -> None:
    g = np.array([1.0, -2.0, 0.5])
    weights = weights_on(agg.CAGrad(c=0.4), np.stack([g, -g]), None)
    np.testing.assert_array_equal(weights, [0.5, 0.5])


@SETTINGS
@given(jac=degenerate())
def test_cagrad_with_c_zero_is_the_mean(jac: np.ndarray) -> None:
    weights = weights_on(agg.CAGrad(c=0.0), jac, None)
    np.testing.assert_array_equal(weights, np.full(len(jac), 1.0 / len(jac)))


@pytest.mark.parametrize(
    "aggregator", [agg.UPGrad(), agg.DualProj(), agg.IMTLG(), agg.AlignedMTL()], ids=repr
)
def test_identical_gradients_give_the_mean(aggregator: agg.Aggregator) -> None:
    g = np.array([1.0, -2.0, 0.5])
    jac = np.stack([g, g, g])
    np.testing.assert_allclose(combined(aggregator, jac, None), g, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- guarantees


@pytest.mark.parametrize("aggregator", [agg.UPGrad(), agg.DualProj()], ids=repr)
@SETTINGS
@given(jac=degenerate())
def test_dual_cone_methods_never_conflict(aggregator: agg.Aggregator, jac: np.ndarray) -> None:
    """<J'w, g_i> >= 0 for every task, relative to each task's own norm (the QP runs on the
    correlation matrix), up to the rounding of forming J'w from its terms."""
    weights = weights_on(aggregator, jac, None)
    d = jac.T @ weights
    norms = np.linalg.norm(jac, axis=1)
    assert (jac @ d >= -1e-9 * norms * term_scale(jac, weights)).all()


@SETTINGS
@given(jac=degenerate())
def test_mgda_never_conflicts(jac: np.ndarray) -> None:
    """<d, g_i> >= |d|^2 - tol for MGDA's d, tol relative to the largest squared norm."""
    d = combined(agg.MGDA(), jac, None)
    largest = float(np.max(np.sum(jac * jac, axis=1)))
    assert (jac @ d >= float(d @ d) - 1e-9 * largest).all()


@pytest.mark.parametrize(
    "aggregator", [agg.NashMTL(), agg.FairGrad(0.5), agg.FairGrad(2.0), agg.ConFIG()], ids=repr
)
@SETTINGS
@given(jac=well_conditioned(spread=3))
def test_balance_methods_do_not_conflict_on_independent_gradients(
    aggregator: agg.Aggregator, jac: np.ndarray
) -> None:
    weights = weights_on(aggregator, jac, None)
    d = jac.T @ weights
    assert (jac @ d > 0).all()


@SETTINGS
@given(jac=well_conditioned(spread=2))
def test_nash_gives_every_task_the_share_of_its_bargaining_weight(jac: np.ndarray) -> None:
    """The paper's condition a_i (G a)_i = 1 on the raw G, to the solver's tolerance (relative
    residual 1e-10 plus the 1e-8 ridge), so |d| = sqrt(T); normalize_gram=True solves it on
    G / |G|_F instead."""
    gram = jac @ jac.T
    a = weights_on(agg.NashMTL(max_norm=None), jac, None)
    np.testing.assert_allclose(a * (gram @ a), 1.0, rtol=1e-6)
    d = jac.T @ a
    assert math.isclose(float(np.linalg.norm(d)), math.sqrt(len(jac)), rel_tol=1e-6)
    normalized = gram / np.linalg.norm(gram)
    b = weights_on(agg.NashMTL(max_norm=None, normalize_gram=True), jac, None)
    np.testing.assert_allclose(b * (normalized @ b), 1.0, rtol=1e-6)


@SETTINGS
@given(jac=well_conditioned(spread=3), exponent=st.integers(-30, 30))
def test_nash_is_fairgrad_with_alpha_one(jac: np.ndarray, exponent: int) -> None:
    """Both solve a_i (G a)_i = 1 on the raw Gram (torchjd: NashMTL == FairGrad(alpha=1))."""
    jac = jac * 10.0**exponent
    nash = weights_on(agg.NashMTL(max_norm=None), jac, None)
    fair = weights_on(agg.FairGrad(alpha=1.0), jac, None)
    np.testing.assert_allclose(nash, fair, rtol=1e-9)


@pytest.mark.parametrize("exponent", [-20, -3, 0, 3, 20])
def test_nash_update_norm_is_the_papers_whatever_the_scale(exponent: int) -> None:
    """|d| = sqrt(T) without the clip and 1 with the default max_norm, at any gradient scale."""
    jac = random_jacobian(np.random.default_rng(11), 3, 7) * 10.0**exponent
    unclipped = combined(agg.NashMTL(max_norm=None), jac, None)
    assert math.isclose(float(np.linalg.norm(unclipped)), math.sqrt(3.0), rel_tol=1e-6)
    clipped = combined(agg.NashMTL(), jac, None)
    assert math.isclose(float(np.linalg.norm(clipped)), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize(
    "aggregator", [agg.Sum(), agg.Mean(), agg.UPGrad(), agg.PCGrad(), agg.Random()], ids=repr
)
@SETTINGS
@given(jac=degenerate(), seed=st.integers(0, 2**16))
def test_linear_under_scaling(aggregator: agg.Aggregator, jac: np.ndarray, seed: int) -> None:
    """c -> A(diag(c) J) is linear on c > 0: additive and positively homogeneous."""
    num_tasks = jac.shape[0]
    rng = np.random.default_rng(seed)
    c1, c2 = 10.0 ** rng.uniform(-2, 2, size=(2, num_tasks))
    draw = draw_for(aggregator, num_tasks, seed)

    def run(c: np.ndarray) -> tuple[np.ndarray, float]:
        scaled = jac * c[:, None]
        weights = weights_on(aggregator, scaled, draw)
        return scaled.T @ weights, term_scale(scaled, weights)

    d1, s1 = run(c1)
    d2, s2 = run(c2)
    d12, s12 = run(c1 + c2)
    np.testing.assert_allclose(d12, d1 + d2, rtol=0, atol=1e-8 * (s1 + s2 + s12) + 1e-300)


@pytest.mark.parametrize("aggregator", every_aggregator(), ids=ids(every_aggregator()))
@SETTINGS
@given(jac=well_conditioned(spread=2), exponent=st.integers(-30, 30))
def test_global_scale(aggregator: agg.Aggregator, jac: np.ndarray, exponent: int) -> None:
    """Scaling every gradient by c = 10^k (k in -30..30) leaves the weights unchanged,
    except FairGrad's, which scale by c^(-2 alpha/(alpha+1)) (the exact law of its equation),
    and NashMTL's (FairGrad's with alpha = 1) unless normalize_gram."""
    num_tasks = jac.shape[0]
    c = 10.0**exponent
    plain = weights_on(fresh(aggregator), jac, draw_for(aggregator, num_tasks))
    scaled = weights_on(fresh(aggregator), jac * c, draw_for(aggregator, num_tasks))
    if isinstance(aggregator, agg.FairGrad):
        scaled = scaled * c ** (2 * aggregator.alpha / (aggregator.alpha + 1))
    if isinstance(aggregator, agg.NashMTL) and not aggregator.normalize_gram:
        scaled = scaled * c  # a_i (G a)_i = 1: FairGrad's law with alpha = 1
    np.testing.assert_allclose(scaled, plain, rtol=1e-7, atol=1e-12 * np.abs(plain).max())


@pytest.mark.parametrize("aggregator", DETERMINISTIC, ids=ids(DETERMINISTIC))
@SETTINGS
@given(jac=well_conditioned(), seed=st.integers(0, 2**16))
def test_permutation_equivariance(aggregator: agg.Aggregator, jac: np.ndarray, seed: int) -> None:
    perm = np.random.default_rng(seed).permutation(jac.shape[0])
    copy = fresh(aggregator)
    weights = weights_on(aggregator, jac, None)
    np.testing.assert_allclose(
        weights_on(copy, jac[perm], None), weights[perm], rtol=1e-7, atol=1e-12
    )


@pytest.mark.parametrize("aggregator", DETERMINISTIC, ids=ids(DETERMINISTIC))
def test_blocks_are_aggregated_independently(aggregator: agg.Aggregator) -> None:
    rng = np.random.default_rng(3)
    jacs = [random_jacobian(rng, 4, 6) * s for s in (1.0, 1e-20, 1e20)]
    batch = torch.cat([gram_of(j) for j in jacs])
    together = fresh(aggregator).aggregate(batch, None).weights.numpy()
    for b, jac in enumerate(jacs):
        alone = weights_on(fresh(aggregator), jac, None)
        np.testing.assert_allclose(together[b], alone, rtol=1e-12)


# --------------------------------------------------------------------------- paper transcriptions


@SETTINGS
@given(jac=well_conditioned(max_tasks=5, spread=1))
def test_upgrad_matches_the_mean_of_primal_projections(jac: np.ndarray) -> None:
    """Quinton & Rey 2024, Eq. 3-4: project each g_i onto {x : J x >= 0}, then average.

    torchjd's UPGrad needs quadprog (not installed) and adds 1e-4 to the diagonal of
    the normalised Gram matrix, so the reference is the paper's primal problem, solved
    by brute force over the cone's faces in the gradient space."""
    expected = np.mean([project_onto_dual_cone_primal(jac, g) for g in jac], axis=0)
    actual = combined(agg.UPGrad(), jac, None)
    np.testing.assert_allclose(actual, expected, atol=1e-6 * np.linalg.norm(jac, axis=1).max())


@SETTINGS
@given(jac=well_conditioned(max_tasks=5, spread=1))
def test_dualproj_matches_the_primal_projection_of_the_mean(jac: np.ndarray) -> None:
    """GEM (Lopez-Paz & Ranzato 2017, Eq. 11) applied to the mean gradient (torchjd needs quadprog)."""
    expected = project_onto_dual_cone_primal(jac, jac.mean(axis=0))
    actual = combined(agg.DualProj(), jac, None)
    np.testing.assert_allclose(actual, expected, atol=1e-6 * np.linalg.norm(jac, axis=1).max())


@SETTINGS
@given(jac=well_conditioned(max_tasks=5, spread=1))
def test_mgda_matches_the_min_norm_point(jac: np.ndarray) -> None:
    expected = mgda_reference(jac)
    actual = combined(agg.MGDA(), jac, None)
    np.testing.assert_allclose(actual, expected, atol=1e-6 * np.linalg.norm(jac, axis=1).max())


@pytest.mark.parametrize("c", [0.1, 0.4, 0.9, 2.0])
@SETTINGS
@given(jac=well_conditioned(max_tasks=5, spread=1))
def test_cagrad_matches_its_primal_problem(c: float, jac: np.ndarray) -> None:
    """Liu et al. 2021, Algorithm 1 (torchjd's CAGrad needs cvxpy, not installed). The
    reference minimises the dual directly; ours goes through a family of QPs."""
    expected = cagrad_reference(jac, c)
    actual = combined(agg.CAGrad(c=c), jac, None)
    np.testing.assert_allclose(actual, expected, atol=1e-5 * np.linalg.norm(jac, axis=1).max())


@SETTINGS
@given(jac=well_conditioned(max_tasks=5, spread=1))
def test_nash_matches_a_least_squares_solution_of_the_bargaining_equation(jac: np.ndarray) -> None:
    """torchjd's NashMTL needs cvxpy and ECOS (not installed) and stops its convex-concave
    iterations after 20 steps; the reference solves the paper's equation itself."""
    expected = nash_reference(jac)
    actual = combined(agg.NashMTL(max_norm=None), jac, None)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-8 * np.linalg.norm(expected))


def test_imtlg_projections_are_equal() -> None:
    """Liu et al. 2021 (IMTL): <d, u_i> is the same for every task, and the weights sum to 1."""
    rng = np.random.default_rng(0)
    jac = random_jacobian(rng, 4, 9) * np.array([[1e-3], [1.0], [10.0], [1e4]])
    weights = weights_on(agg.IMTLG(), jac, None)
    units = jac / np.linalg.norm(jac, axis=1, keepdims=True)
    projections = units @ (jac.T @ weights)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-9)
    assert math.isclose(weights.sum(), 1.0, rel_tol=1e-12)


def test_aligned_mtl_makes_the_aligned_gradients_orthogonal_with_equal_norms() -> None:
    """Senushkin et al. 2023: with B the balance transformation, the rows of B J are
    orthogonal with squared norm sigma_min (the paper's condition number one), and the
    weights are B @ (1/T)."""
    rng = np.random.default_rng(1)
    jac = random_jacobian(rng, 4, 9)
    gram = jac @ jac.T
    values, vectors = np.linalg.eigh(gram)
    balance = vectors @ np.diag(np.sqrt(values.min() / values)) @ vectors.T
    np.testing.assert_allclose(
        weights_on(agg.AlignedMTL(), jac, None), balance @ np.full(4, 0.25), rtol=1e-9
    )
    aligned = balance.T @ jac
    np.testing.assert_allclose(
        aligned @ aligned.T, values.min() * np.eye(4), atol=1e-9 * values.max()
    )


def test_gradvac_first_step_is_pcgrad() -> None:
    """With all targets at 0, raising a negative cosine to 0 is exactly PCGrad's projection."""
    rng = np.random.default_rng(2)
    jac = random_jacobian(rng, 5, 7)
    orders = agg.draw_orders(5, torch.Generator().manual_seed(4))
    np.testing.assert_allclose(
        weights_on(agg.GradVac(), jac, orders), weights_on(agg.PCGrad(), jac, orders), rtol=1e-12
    )


def test_random_weights_are_a_seeded_softmax() -> None:
    aggregator = agg.Random()
    draw = aggregator.draw(4, torch.Generator().manual_seed(7))
    again = aggregator.draw(4, torch.Generator().manual_seed(7))
    assert torch.equal(draw, again)
    weights = aggregator.aggregate(gram_of(np.eye(4)), draw).weights[0]
    torch.testing.assert_close(weights, torch.softmax(draw, 0))
    assert math.isclose(float(weights.sum()), 1.0, rel_tol=1e-12)


def test_head_weights() -> None:
    assert agg.Sum().head_weight(4) == 1.0
    assert agg.PCGrad().head_weight(4) == 1.0
    for aggregator in (
        agg.Mean(),
        agg.PCGrad(reduction="mean"),
        agg.UPGrad(),
        agg.MGDA(),
        agg.Random(),
    ):
        assert aggregator.head_weight(4) == 0.25


# --------------------------------------------------------------------------- state


def _steps(rng: np.random.Generator, count: int, num_blocks: int = 2) -> list[torch.Tensor]:
    return [
        torch.cat(
            [
                gram_of(random_jacobian(rng, 4, 6) * 10.0 ** rng.uniform(-3, 3))
                for _ in range(num_blocks)
            ]
        )
        for _ in range(count)
    ]


@pytest.mark.parametrize(
    "factory", [lambda: agg.GradVac(beta=0.3), lambda: agg.NashMTL(update_every=3)]
)
def test_state_dict_round_trip_resumes_exactly(factory) -> None:
    """Run 4 steps, checkpoint (through torch.save), run 3 more; a fresh instance loaded from
    the checkpoint gives bit-identical weights on those 3 steps."""
    import io

    rng = np.random.default_rng(5)
    grams = _steps(rng, 7)
    orders = [agg.draw_orders(4, torch.Generator().manual_seed(k)) for k in range(7)]
    first = factory()
    for k in range(4):
        first.aggregate(grams[k], orders[k])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = factory()
    second.load_state_dict(torch.load(buffer, weights_only=True))
    resumed = []
    for k in range(4, 7):
        a = first.aggregate(grams[k], orders[k]).weights
        b = second.aggregate(grams[k], orders[k]).weights
        assert torch.equal(a, b)
        resumed.append(a)
    # And the state matters: a fresh instance does not reproduce them.
    assert not torch.equal(factory().aggregate(grams[4], orders[4]).weights, resumed[0])


def test_gradvac_rejects_a_changed_number_of_tasks() -> None:
    aggregator = agg.GradVac()
    aggregator.aggregate(_steps(np.random.default_rng(0), 1)[0], agg.draw_orders(4, None))
    three = torch.from_numpy(np.eye(3))[None].repeat(2, 1, 1)
    with pytest.raises(ValueError, match="number of tasks"):
        aggregator.aggregate(three, agg.draw_orders(3, None))


def test_stateless_methods_reject_state() -> None:
    with pytest.raises(ValueError, match="stateless"):
        agg.UPGrad().load_state_dict({"targets": 1})


def test_nash_update_every_reuses_weights_between_updates() -> None:
    grams = _steps(np.random.default_rng(6), 4, num_blocks=1)
    aggregator = agg.NashMTL(max_norm=None, update_every=2)
    w = [aggregator.aggregate(g, None).weights for g in grams]
    assert torch.equal(w[0], w[1]) and torch.equal(w[2], w[3])
    assert not torch.equal(w[1], w[2])


def test_nash_max_norm_clips_the_update() -> None:
    jac = random_jacobian(np.random.default_rng(8), 3, 5) * 100.0
    d = combined(agg.NashMTL(max_norm=0.5), jac, None)
    assert math.isclose(float(np.linalg.norm(d)), 0.5, rel_tol=1e-9)
