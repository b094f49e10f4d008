"""gradtools' aggregators against torchjd 0.18 where torchjd implements the same algorithm.

torchjd is a test/bench dependency only. Compared: the aggregated vector J'w
against torchjd's aggregator applied to J. Not compared here, because their
torchjd versions need solvers we do not install (quadprog for UPGrad and
DualProj, cvxpy/ECOS for CAGrad and Nash-MTL); test_aggregators.py checks those
against transcriptions of the papers instead.

Where torchjd 0.18 differs by design (kept out of the aggregators' docstrings,
which say only what a user needs; the numbers are torchjd's source):
- UPGrad/DualProj: quadprog on the trace-normalised Gram plus a 1e-4 ridge; we
  solve the same QP on the correlation matrix with no ridge (KKT to 1e-12).
- MGDA: Frank-Wolfe stopping at a step of 1e-3; we solve the min-norm QP exactly.
- CAGrad: a zero update below an absolute |g_w| of 1e-4; our threshold is
  relative and follows the Gram's precision (cagrad.stationary_threshold).
- IMTL-G: ``pinv(G) |g|`` with an absolute 1e-12 test on the weight sum (which
  fires for any gradients with norms above about 1e6); we use ``D^-1 R^+ 1``
  and a relative test, so dependent gradients' norms do not change the answer.
- AlignedMTL and ConFIG: eigenvalue and pseudo-inverse cutoffs at the Gram
  dtype's epsilon; ours follow the ``precision`` argument (MultiTask: the
  gradients' epsilon, its Gram being float64). On full-rank inputs, as tested
  below, the answers agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aggregator_cases import (
    SETTINGS,
    combined,
    gram_of,
    random_jacobian,
    run_step,
    well_conditioned,
)
from hypothesis import given
from hypothesis import strategies as st

from gradtools import aggregation as agg

jd = pytest.importorskip("torchjd.aggregation")


def torchjd_on(aggregator, jac: np.ndarray) -> np.ndarray:
    return aggregator(torch.from_numpy(jac)).numpy()


def scale_of(jac: np.ndarray) -> float:
    return float(np.linalg.norm(jac, axis=1).max())


@st.composite
def full_rank(draw: st.DrawFn, max_exponent: int = 20) -> np.ndarray:
    """Well-conditioned Jacobians times one global scale 10^[-max_exponent, max_exponent]."""
    jac = draw(well_conditioned(max_tasks=6, spread=1))
    return jac * 10.0 ** draw(st.integers(-max_exponent, max_exponent))


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (agg.Sum(), jd.Sum()),
        (agg.Mean(), jd.Mean()),
        (agg.ConFIG(), jd.ConFIG()),
        (agg.AlignedMTL("min"), jd.AlignedMTL(scale_mode="min")),
        (agg.AlignedMTL("median"), jd.AlignedMTL(scale_mode="median")),
        (agg.AlignedMTL("rmse"), jd.AlignedMTL(scale_mode="rmse")),
    ],
    ids=repr,
)
@SETTINGS
@given(jac=full_rank())
def test_closed_form_methods_match_torchjd(ours: agg.Aggregator, theirs, jac: np.ndarray) -> None:
    np.testing.assert_allclose(
        combined(ours, jac, None), torchjd_on(theirs, jac), rtol=1e-7, atol=1e-9 * scale_of(jac)
    )


@SETTINGS
@given(jac=full_rank(max_exponent=2))
def test_imtlg_matches_torchjd_at_moderate_scales(jac: np.ndarray) -> None:
    """torchjd returns zero weights when |sum(pinv(G) |g|)| < 1e-12, an absolute threshold
    that large gradients (norms above about 1e6) cross; ours is relative, so we compare
    where torchjd's threshold does not fire."""
    np.testing.assert_allclose(
        combined(agg.IMTLG(), jac, None),
        torchjd_on(jd.IMTLG(), jac),
        rtol=1e-7,
        atol=1e-9 * scale_of(jac),
    )


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_config_matches_torchjd_on_dependent_gradients(rank: int) -> None:
    """Both take the pseudo-inverse of the unit gradients (ours through R^+)."""
    rng = np.random.default_rng(rank)
    jac = random_jacobian(rng, 5, 8, rank) * 10.0 ** rng.uniform(-2, 2, size=(5, 1))
    np.testing.assert_allclose(
        combined(agg.ConFIG(), jac, None),
        torchjd_on(jd.ConFIG(), jac),
        rtol=1e-6,
        atol=1e-9 * scale_of(jac),
    )


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
@SETTINGS
@given(jac=well_conditioned(max_tasks=5, spread=1))
def test_fairgrad_matches_torchjd(alpha: float, jac: np.ndarray) -> None:
    """torchjd solves (G w)_i = w_i^(-1/alpha) with scipy's least squares (tolerance about
    1e-8); we solve it by Newton on the correlation matrix with a 1e-8 ridge."""
    np.testing.assert_allclose(
        combined(agg.FairGrad(alpha), jac, None),
        torchjd_on(jd.FairGrad(alpha=alpha), jac),
        rtol=1e-5,
        atol=1e-7 * scale_of(jac),
    )


@SETTINGS
@given(jac=well_conditioned(max_tasks=4, spread=1))
def test_mgda_is_the_limit_of_torchjds_frank_wolfe(jac: np.ndarray) -> None:
    """torchjd runs Frank-Wolfe (Sener & Koltun, Algorithm 2), which only approaches the
    min-norm point; ours is exact, so it is never longer than Frank-Wolfe's and close to it."""
    ours = combined(agg.MGDA(), jac, None)
    theirs = torchjd_on(jd.MGDA(epsilon=1e-9, max_iters=3000), jac)
    assert np.linalg.norm(ours) <= np.linalg.norm(theirs) * (1 + 1e-9)
    np.testing.assert_allclose(ours, theirs, atol=1e-3 * scale_of(jac))


def test_random_matches_torchjd_for_the_same_seed() -> None:
    """torchjd draws N(0, I) from the global generator; ours from the wrapper's, seeded alike."""
    jac = random_jacobian(np.random.default_rng(0), 4, 6)
    for seed in range(5):
        torch.manual_seed(seed)
        theirs = torchjd_on(jd.Random(), jac)
        draw = agg.Random().draw(4, torch.Generator().manual_seed(seed))
        np.testing.assert_allclose(combined(agg.Random(), jac, draw), theirs, rtol=1e-12)


def _torchjd_orders(seed: int, num_tasks: int) -> torch.Tensor:
    """The visiting orders torchjd's GradVac draws after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    orders = []
    for i in range(num_tasks):
        others = [j for j in range(num_tasks) if j != i]
        orders.append([others[k] for k in torch.randperm(num_tasks - 1).tolist()])
    return torch.tensor(orders)


@pytest.mark.parametrize("beta", [0.5, 0.1])
def test_gradvac_matches_torchjd_over_several_steps(beta: float) -> None:
    """Same orders, same EMA targets over 6 steps. torchjd adds eps = 1e-8 to its
    denominators, hence the tolerance on these unit-scale gradients."""
    rng = np.random.default_rng(11)
    ours, theirs = agg.GradVac(beta=beta), jd.GradVac(beta=beta)
    for step in range(6):
        jac = random_jacobian(rng, 4, 6) + rng.standard_normal(6)  # some agreement, some conflict
        orders = _torchjd_orders(100 + step, 4)
        torch.manual_seed(100 + step)
        expected = torchjd_on(theirs, jac)
        actual = jac.T @ ours.aggregate(gram_of(jac), orders).weights[0].numpy()
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7 * scale_of(jac))


def float32_rank_two_jacobian(seed: int) -> torch.Tensor:
    """[4, 50] float32 task gradients of rank 2, each computed through three float32 layers
    (so the third singular value is float32 rounding noise, about 1e-7 of the first)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 2, generator=g)
    b = torch.randn(2, 50, generator=g)
    layers = [torch.randn(50, 50, generator=g) / 50**0.5 for _ in range(3)]
    p = torch.zeros(50, requires_grad=True)
    rows = []
    for i in range(4):
        h = p
        for w in layers:
            h = w @ h
        rows.append(torch.autograd.grad((a[i] * (b @ h)).sum(), p)[0])
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("name", "theirs"), [("alignedmtl", jd.AlignedMTL()), ("config", jd.ConFIG())], ids=str
)
def test_float32_rank_deficient_steps_match_torchjd_at_float32(name: str, theirs) -> None:
    """torchjd cuts eigenvalues at the float32 Gram's epsilon; MultiTask passes the float32
    gradients' epsilon, so both drop the rounding-noise direction and agree (before issue 20
    ours kept it: AlignedMTL's update shrank by ~1e4, ConFIG's direction was noise)."""
    for seed in range(4):
        jac = float32_rank_two_jacobian(seed)
        expected = theirs(jac).double().numpy()
        ours = run_step(name, jac.double().numpy(), torch.float32).grads[0]
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-3 * np.linalg.norm(expected))
