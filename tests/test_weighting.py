"""gradtools.weighting: each method against a reference update on a fixed sequence of losses.

References (named per test): torchjd 0.18's ``torchjd/scalarization/_uw.py``,
``_imtl_l.py``, ``_dwa.py``, ``_random.py`` and ``_famo.py`` (the last adapted from
FAMO's official code) where torchjd implements the method; for GradNorm (not in
torchjd; LibMTL would pull a different torch) the paper's Eq. 2 written out here
with autograd, independently of the module's closed-form gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradtools
from gradtools import aggregation as agg
from gradtools import weighting as wt

T = 3


def loss_sequence(steps: int, seed: int = 0) -> list[Tensor]:
    """Positive, decreasing-ish task losses (float64), one [T] vector per step."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(T, generator=g, dtype=torch.float64) + 0.5)
        * (1.0 / (1 + 0.3 * k)) ** torch.arange(1, T + 1)
        for k in range(steps)
    ]


def grad_wrt_losses(weighting: nn.Module, values: Tensor) -> tuple[Tensor, Tensor]:
    """The loss a weighting returns and its gradient w.r.t. the losses (the effective weights)."""
    losses = values.clone().requires_grad_(True)
    out = weighting(losses)
    (grad,) = torch.autograd.grad(out, losses, retain_graph=True)
    return out, grad


@pytest.mark.parametrize(
    ("ours", "theirs_name", "param"),
    [
        (lambda: wt.UncertaintyWeighting(T), "UW", ("log_variance", "log_var")),
        (lambda: wt.IMTLL(T), "IMTLL", ("log_scale", "log_scale")),
    ],
    ids=["uncertainty (torchjd/scalarization/_uw.py)", "imtl-l (torchjd/scalarization/_imtl_l.py)"],
)
def test_learnable_weightings_match_torchjd(ours, theirs_name: str, param: tuple[str, str]) -> None:  # type: ignore[no-untyped-def]
    scalarization = pytest.importorskip("torchjd.scalarization")
    mine = ours().double()
    ref = getattr(scalarization, theirs_name)(T).double()
    opt_mine = torch.optim.SGD(mine.parameters(), lr=0.3)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.3)
    for values in loss_sequence(6):
        for opt in (opt_mine, opt_ref):
            opt.zero_grad()
        out_mine, w_mine = grad_wrt_losses(mine, values)
        out_ref, w_ref = grad_wrt_losses(ref, values)
        torch.testing.assert_close(out_mine, out_ref)
        torch.testing.assert_close(w_mine, w_ref)
        torch.testing.assert_close(mine.weights.double(), w_ref, rtol=1e-6, atol=1e-7)
        out_mine.backward()
        out_ref.backward()
        opt_mine.step()
        opt_ref.step()
        torch.testing.assert_close(getattr(mine, param[0]), getattr(ref, param[1]))


def test_dwa_matches_torchjd() -> None:
    """Reference: torchjd/scalarization/_dwa.py (the paper's Eq. 1 over epoch averages)."""
    scalarization = pytest.importorskip("torchjd.scalarization")
    mine, ref = wt.DWA(T, temperature=2.0), scalarization.DWA(temperature=2.0)
    sequence = loss_sequence(15, seed=1)
    seen_non_uniform = False
    for epoch in range(5):
        for values in sequence[3 * epoch : 3 * epoch + 3]:
            _, w_mine = grad_wrt_losses(mine, values)
            _, w_ref = grad_wrt_losses(ref, values)
            torch.testing.assert_close(w_mine, w_ref)
            seen_non_uniform |= not torch.allclose(w_mine, torch.ones(T, dtype=torch.float64))
        mine.end_epoch()
        ref.step()
    assert seen_non_uniform


def test_dwa_is_the_sum_for_two_epochs_then_eq1_of_the_epoch_averages() -> None:
    """Without a reference library: weights exactly 1 while fewer than two epochs have
    ended (why a one-epoch DWA run equals the summed-loss run), then T * softmax of the
    ratio of the last two epochs' average losses over the temperature."""
    dwa = wt.DWA(T, temperature=2.0)
    sequence = loss_sequence(9, seed=3)
    averages = []
    for epoch in range(3):
        batch = sequence[3 * epoch : 3 * epoch + 3]
        for values in batch:
            _, weights = grad_wrt_losses(dwa, values)
            if epoch < 2:
                assert torch.equal(weights, torch.ones(T, dtype=torch.float64))
            else:
                rates = averages[1] / averages[0]
                expected = T * torch.exp(rates / 2.0) / torch.exp(rates / 2.0).sum()
                torch.testing.assert_close(weights, expected)
                assert not torch.allclose(weights, torch.ones(T, dtype=torch.float64))
        averages.append(torch.stack(batch).mean(0))
        dwa.end_epoch()


def test_rlw_matches_torchjd_random_with_the_same_seed() -> None:
    """Reference: torchjd/scalarization/_random.py (softmax of a standard normal draw)."""
    scalarization = pytest.importorskip("torchjd.scalarization")
    mine = wt.RLW(T, seed=5)
    torch.manual_seed(5)  # torchjd draws from the global generator
    ref = scalarization.Random()
    for values in loss_sequence(4):
        _, w_mine = grad_wrt_losses(mine, values)
        _, w_ref = grad_wrt_losses(ref, values)
        torch.testing.assert_close(w_mine, w_ref)
        assert math.isclose(float(w_mine.sum()), 1.0)


def test_famo_matches_torchjd() -> None:
    """Reference: torchjd/scalarization/_famo.py (adapted from FAMO's official code):
    the same effective weights on the losses, the same logits after each update."""
    scalarization = pytest.importorskip("torchjd.scalarization")
    mine = wt.FAMO(T, lr=0.025, weight_decay=1e-3)
    ref = scalarization.FAMO(T, lr=0.025, weight_decay=1e-3).double()
    sequence = loss_sequence(12, seed=2)
    for before, after in zip(sequence[::2], sequence[1::2], strict=True):
        _, w_mine = grad_wrt_losses(mine, before)
        _, w_ref = grad_wrt_losses(ref, before)
        torch.testing.assert_close(w_mine, w_ref)
        assert math.isclose(float(mine.weights.sum()), 1.0, rel_tol=1e-6)  # a convex combination
        mine.update(after)
        ref.update(after)
        torch.testing.assert_close(mine.logits, ref._w.detach())
    assert not torch.allclose(mine.logits, torch.zeros(T, dtype=torch.float64))


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)  # GradNorm's W: the last shared layer
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(T))

    def losses(self, x: Tensor, y: Tensor) -> list[Tensor]:
        z = torch.tanh(self.shared(torch.tanh(self.first(x))))
        return [F.mse_loss(h(z).squeeze(-1), (t + 1.0) * y) for t, h in enumerate(self.heads)]


def test_gradnorm_follows_eq_2_of_the_paper() -> None:
    """Reference: GradNorm's Eq. 2 by autograd here: G_i = ||grad_W (w_i L_i)|| with
    create_graph, L_grad = sum_i |G_i - mean(G) r_i^alpha| (target detached), renormalise."""
    x, y = torch.randn(8, 4), torch.randn(8)
    model = TwoLayer()
    ref_model = TwoLayer()
    shared = list(model.shared.parameters())
    mine = wt.GradNorm(T, shared=shared, alpha=1.5)
    opt = torch.optim.SGD([*model.parameters(), *mine.parameters()], lr=0.05)
    w = torch.ones(T, requires_grad=True)
    ref_opt = torch.optim.SGD([*ref_model.parameters(), w], lr=0.05)
    initial = None
    for _ in range(5):
        opt.zero_grad()
        ref_opt.zero_grad()
        loss = mine(model.losses(x, y))

        with torch.no_grad():
            w.mul_(T / w.sum())
        losses = torch.stack(ref_model.losses(x, y))
        if initial is None:
            initial = losses.detach()
        g = torch.stack([
            torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(w[i] * losses[i], list(ref_model.shared.parameters()), retain_graph=True, create_graph=True)]).norm()
            for i in range(T)
        ])  # fmt: skip
        ratio = losses.detach() / initial
        target = (g.mean() * (ratio / ratio.mean()) ** 1.5).detach()
        (w_grad,) = torch.autograd.grad((g - target).abs().sum(), w)
        torch.testing.assert_close(mine.loss_weights.grad, w_grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.weights, w.detach())
        assert math.isclose(float(mine.weights.sum()), T, rel_tol=1e-6)  # renormalised to T
        (w.detach() * losses).sum().backward()
        w.grad = w_grad
        loss.backward()
        opt.step()
        ref_opt.step()
    assert not torch.allclose(w.detach(), torch.ones(T))


# ---------------------------------------------------------------------- plumbing


def _all() -> list[tuple[str, object]]:
    return [
        ("uncertainty", lambda: wt.UncertaintyWeighting(T)),
        ("imtl-l", lambda: wt.IMTLL(T)),
        ("dwa", lambda: wt.DWA(T)),
        ("rlw", lambda: wt.RLW(T, seed=3)),
        ("famo", lambda: wt.FAMO(T)),
    ]


def _drive(weighting: wt.LossWeighting, sequence: list[Tensor]) -> list[Tensor]:
    """Run a weighting over losses (epoch ends and FAMO updates included); its weights per call."""
    opt = torch.optim.SGD(weighting.parameters(), lr=0.1) if list(weighting.parameters()) else None
    seen = []
    for k, values in enumerate(sequence):
        if opt is not None:
            opt.zero_grad()
        loss = weighting(values.clone().requires_grad_(True))
        seen.append(weighting.weights)
        loss.backward()
        if opt is not None:
            opt.step()
        if isinstance(weighting, wt.FAMO):
            weighting.update(values * 0.9)
        if isinstance(weighting, wt.DWA) and k % 2 == 1:
            weighting.end_epoch()
    return seen


@pytest.mark.parametrize(("name", "make"), _all(), ids=[n for n, _ in _all()])
def test_state_dict_resumes_the_same_sequence(name: str, make) -> None:  # type: ignore[no-untyped-def]
    sequence = loss_sequence(10, seed=4)
    whole = make()
    expected = _drive(whole, sequence)
    first = make()
    _drive(first, sequence[:6])
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(_drive(resumed, sequence[6:]), expected[6:], strict=True):
        torch.testing.assert_close(a, b)


def test_with_multitask_sum_equals_the_weighted_loss_backward() -> None:
    """opt.backward(weighting.task_losses(losses)) with Sum == weighting(losses).backward()."""
    x, y = torch.randn(8, 4), torch.randn(8)
    grads = []
    for via_wrapper in (False, True):
        model = TwoLayer()
        weighting = wt.UncertaintyWeighting(T, init_log_variance=0.3)
        params = [*model.parameters(), *weighting.parameters()]
        opt = gradtools.MultiTask(torch.optim.SGD(params, lr=0.1), agg.Sum())
        opt.zero_grad()
        if via_wrapper:
            opt.backward(weighting.task_losses(model.losses(x, y)))
        else:
            weighting(model.losses(x, y)).backward()
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="num_tasks must be a positive int"):
        wt.DWA(0)
    weighting = wt.UncertaintyWeighting(T)
    with pytest.raises(ValueError, match="got 2 losses for a weighting of 3 tasks"):
        weighting([torch.tensor(1.0), torch.tensor(2.0)])
    with pytest.raises(ValueError, match=r"losses\[1\] must be a scalar"):
        weighting([torch.tensor(1.0), torch.ones(2), torch.tensor(2.0)])
    with pytest.raises(ValueError, match="inf or NaN"):
        weighting(torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(RuntimeError, match="no losses were weighted"):
        wt.DWA(T).end_epoch()
    with pytest.raises(RuntimeError, match="needs a call"):
        wt.FAMO(T).update(torch.ones(T))
    with pytest.raises(ValueError, match="above min_losses"):
        wt.FAMO(T)(torch.tensor([1.0, -1.0, 2.0]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        wt.DWA(T, temperature=0.0)


def test_imtl_l_drives_every_scaled_loss_to_one() -> None:
    """IMTL-L's optimum in s_t: exp(s_t) * L_t = 1 for every task (the module docstring)."""
    weighting = wt.IMTLL(T).double()
    opt = torch.optim.SGD(weighting.parameters(), lr=0.05)
    losses = torch.tensor([0.5, 2.0, 8.0], dtype=torch.float64)
    for _ in range(2000):
        opt.zero_grad()
        weighting(losses).backward()
        opt.step()
    torch.testing.assert_close(
        weighting.weights.double() * losses,
        torch.ones(T, dtype=torch.float64),
        rtol=1e-4,
        atol=1e-4,
    )
