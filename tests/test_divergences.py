"""Divergences used by SMART and the Bregman teacher: values, symmetry, shape checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gradtools.divergences import (
    bernoulli_symmetric_kl,
    divergence,
    output_divergences,
    squared_error,
    symmetric_kl,
)

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def logit_pairs(draw: st.DrawFn, classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    rows = draw(st.integers(1, 4))
    width = classes if classes is not None else draw(st.integers(2, 6))
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0, 40.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, width, generator=gen, dtype=torch.float64) * scale
    b = torch.randn(rows, width, generator=gen, dtype=torch.float64) * scale
    return a, b


@SETTINGS
@given(logit_pairs())
def test_symmetric_kl_matches_both_kl_directions(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    a, b = pair
    log_p, log_q = F.log_softmax(a, -1), F.log_softmax(b, -1)
    # KL(p||q) + KL(q||p) from torch's own kl_div, averaged over rows.
    expected = (
        F.kl_div(log_q, log_p, log_target=True, reduction="sum")
        + F.kl_div(log_p, log_q, log_target=True, reduction="sum")
    ) / a.shape[0]
    got = symmetric_kl(a, b)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert torch.allclose(got, symmetric_kl(b, a), rtol=1e-12, atol=0)
    assert got >= 0


@SETTINGS
@given(logit_pairs(classes=1))
def test_bernoulli_symmetric_kl_matches_the_definition(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    a, b = pair

    def kl(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # KL(Bernoulli(sigmoid(x)) || Bernoulli(sigmoid(y))) with log-probabilities
        # from logsigmoid, so that 1 - sigmoid(x) does not round to 0 for large x.
        log_p1, log_p0 = F.logsigmoid(x), F.logsigmoid(-x)
        log_q1, log_q0 = F.logsigmoid(y), F.logsigmoid(-y)
        return log_p1.exp() * (log_p1 - log_q1) + log_p0.exp() * (log_p0 - log_q0)

    expected = (kl(a, b) + kl(b, a)).mean()
    got = bernoulli_symmetric_kl(a, b)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-9)
    assert got == bernoulli_symmetric_kl(b, a)


def test_bernoulli_symmetric_kl_is_nonzero_for_different_logits() -> None:
    a = torch.tensor([0.3, -1.0, 2.0])
    b = torch.tensor([0.5, -1.0, -2.0])
    assert bernoulli_symmetric_kl(a, b) > 0
    assert bernoulli_symmetric_kl(a, a) == 0
    # The bug this kind exists for: a softmax over one logit sees no difference at all.
    assert F.softmax(a[:, None], -1).equal(F.softmax(b[:, None], -1))


def test_kl_over_one_logit_is_refused_with_a_pointer_to_bkl() -> None:
    with pytest.raises(ValueError, match="bkl"):
        symmetric_kl(torch.zeros(4, 1), torch.ones(4, 1))


@pytest.mark.parametrize("kind", ["kl", "bkl", "mse"])
def test_b_against_b1_is_an_error_not_a_broadcast(kind: str) -> None:
    a, b = torch.randn(8, 2 if kind == "kl" else 1), torch.randn(8)
    with pytest.raises(ValueError, match=r"sts.*\[8, \w\].*\[8\]"):
        divergence(kind, a, b, name="sts")


def test_regression_divergence_refuses_b_vs_b1() -> None:
    with pytest.raises(ValueError, match=r"\[4\].*\[4, 1\]"):
        squared_error(torch.zeros(4), torch.zeros(4, 1))
    assert squared_error(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1.0])) == 2.5


def test_half_precision_outputs_are_compared_in_float32() -> None:
    a = torch.randn(3, 4).to(torch.bfloat16)
    b = (a.float() + 0.25).to(torch.bfloat16)
    assert symmetric_kl(a, a + 1).dtype == torch.float32
    assert squared_error(a, b).dtype == torch.float32
    assert bernoulli_symmetric_kl(a, b).dtype == torch.float32


def test_saturated_softmax_stays_finite() -> None:
    a = torch.tensor([[1e4, -1e4, 0.0]])
    b = torch.tensor([[-1e4, 1e4, 0.0]])
    value = symmetric_kl(a, b)
    assert math.isfinite(value.item()) and value > 0


def test_bad_inputs_name_the_argument() -> None:
    with pytest.raises(ValueError, match="kind for para"):
        divergence("softmax", torch.zeros(2, 2), torch.zeros(2, 2), name="para")
    with pytest.raises(TypeError, match="floating point"):
        divergence("mse", torch.zeros(2, dtype=torch.long), torch.zeros(2), name="sts")


def test_structured_outputs_use_one_kind_per_output() -> None:
    a = {"sst": torch.randn(4, 5), "para": torch.randn(4), "sts": torch.randn(4)}
    b = {key: value + 0.1 for key, value in a.items()}
    kinds = {"sst": "kl", "para": "bkl", "sts": "mse"}
    got = dict(output_divergences(a, b, kinds))
    assert got["outputs['sts']"] == squared_error(a["sts"], b["sts"])
    assert got["outputs['para']"] == bernoulli_symmetric_kl(a["para"], b["para"])
    assert got["outputs['sst']"] == symmetric_kl(a["sst"], b["sst"])
    pairs = output_divergences((a["sst"], a["sts"]), (b["sst"], b["sts"]), ("kl", "mse"))
    assert [v for _, v in pairs] == [got["outputs['sst']"], got["outputs['sts']"]]


def test_structure_mismatches_are_errors() -> None:
    a = {"sst": torch.randn(4, 5)}
    with pytest.raises(ValueError, match="keys"):
        output_divergences(a, {"para": torch.randn(4, 5)})
    with pytest.raises(ValueError, match="kind"):
        output_divergences(a, a, {"para": "kl"})
    with pytest.raises(ValueError, match="structures"):
        output_divergences((a["sst"],), (a["sst"], a["sst"]))
    with pytest.raises(TypeError, match=r"outputs\[0\] is a float"):
        output_divergences((1.0,), (a["sst"],))  # type: ignore[arg-type]
