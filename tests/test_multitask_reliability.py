"""Regression tests for defects found by trying to break the multi-task wrapper (issue 11).

Each of these failed on the code before the fix:
- item 2: a torch.compile'd (or custom autograd Function) model's backward writes
  zeros into the other tasks' heads, which then counted as shared and were projected;
- item 5: ``PCGrad(LBFGS).step(closure)`` raised TypeError (closure not passed on);
- item 6: ``(l1 + l2).backward(); opt.step()`` took a plain step without a word;
- item 10: finite float64 gradients around 1e160 were reported as "inf or NaN".
"""

from __future__ import annotations

import warnings

import pytest
import torch
from test_multitask_optimizer import NAMES, wrap
from test_pcgrad import SIGNS, MultiTaskNet, make_batches, make_net, reference_grads, task_losses
from torch import Tensor, nn

import gradtools
from gradtools import aggregation as agg

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- item 2: opaque graphs


class _AllHeads(torch.autograd.Function):
    """Every head on the features, as one opaque autograd node (like a compiled graph):
    its backward returns a gradient, zeros included, for every head's weights."""

    @staticmethod
    def forward(ctx, features: Tensor, *weights: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(features, *weights)
        return torch.stack([features @ w.reshape(-1) for w in weights])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        features, *weights = ctx.saved_tensors
        d_features = sum(
            g.unsqueeze(-1) * w.reshape(-1) for g, w in zip(grad, weights, strict=True)
        )
        d_weights = [(g @ features).reshape(w.shape) for g, w in zip(grad, weights, strict=True)]
        return (d_features, *d_weights)


class OpaqueHeads(nn.Module):
    """A trunk and bias-free heads; ``opaque=True`` runs the heads through one custom Function."""

    def __init__(self, opaque: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(5, 8).double()
        self.heads = nn.ParameterList(
            nn.Parameter(torch.randn(1, 8, dtype=torch.float64)) for _ in range(3)
        )
        self.opaque = opaque

    def losses(self, batches: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        out = []
        for t, (x, y) in enumerate(batches):
            features = torch.tanh(self.trunk(x))
            if self.opaque:
                pred = _AllHeads.apply(features, *self.heads)[t]
            else:
                pred = features @ self.heads[t].reshape(-1)
            out.append(SIGNS[t] * ((pred - y) ** 2).sum())
        return out


@pytest.mark.parametrize("name", NAMES)
def test_opaque_graph_does_not_make_heads_shared(name: str) -> None:
    batches = make_batches()
    results = []
    for opaque in (False, True):
        net = OpaqueHeads(opaque)
        opt = gradtools.MultiTask(
            torch.optim.SGD(net.parameters(), lr=0.1),
            wrap(make_net(), name).aggregator,
            generator=torch.Generator().manual_seed(0),
        )
        opt.backward(net.losses(batches))
        assert opt.stats is not None
        results.append((opt.stats.num_shared, [p.grad.clone() for p in net.parameters()]))
    (eager_shared, eager_grads), (opaque_shared, opaque_grads) = results
    assert eager_shared == opaque_shared == 2  # the trunk's weight and bias only
    for a, b in zip(eager_grads, opaque_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_explicit_shared_params_with_an_opaque_graph() -> None:
    batches = make_batches()
    grads = []
    for opaque in (False, True):
        net = OpaqueHeads(opaque)
        opt = gradtools.PCGrad(
            torch.optim.SGD(net.parameters(), lr=0.1),
            generator=torch.Generator().manual_seed(0),
            shared_params=net.trunk.parameters(),
        )
        opt.backward(net.losses(batches))
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class CompiledHeads(MultiTaskNet):
    def forward_all(self, x: Tensor) -> list[Tensor]:
        features = torch.tanh(self.trunk(x))
        return [head(features).squeeze(-1) for head in self.heads]


@pytest.mark.slow  # torch.compile's first call takes 15-60 s on a loaded 2-core machine
def test_compiled_model_matches_eager() -> None:
    torch._dynamo.reset()
    x, y = make_batches(1, dtype=torch.float32)[0]
    finals = []
    for compiled in (False, True):
        torch.manual_seed(0)
        net = CompiledHeads(3)
        forward = (
            torch.compile(net.forward_all, backend="aot_eager") if compiled else net.forward_all
        )
        opt = gradtools.PCGrad(
            torch.optim.SGD(net.parameters(), lr=0.05), generator=torch.Generator().manual_seed(0)
        )
        for _ in range(3):
            opt.zero_grad()
            outs = forward(x)
            opt.backward([SIGNS[t] * ((outs[t] - y) ** 2).mean() for t in range(3)])
            assert opt.stats is not None and opt.stats.num_shared == 4  # trunk only
            opt.step()
        finals.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*finals, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- item 5: closures


class SumAll(agg.Aggregator):
    """Weights 1 for every task: the combined gradient is that of the summed loss."""

    name = "test-sum-all"

    def aggregate(self, gram: Tensor, draw: Tensor | None) -> agg.Aggregation:
        return agg.Aggregation(torch.ones(gram.shape[0], gram.shape[-1], dtype=torch.float64))


def test_lbfgs_closure_equals_plain_lbfgs_on_the_summed_loss() -> None:
    batches = make_batches()
    net_a, net_b = make_net(3), make_net(3)
    opt_a = gradtools.MultiTask(torch.optim.LBFGS(net_a.parameters(), lr=0.5, max_iter=4), SumAll())
    opt_b = torch.optim.LBFGS(net_b.parameters(), lr=0.5, max_iter=4)
    calls = 0

    def closure_a() -> Tensor:
        nonlocal calls
        calls += 1
        opt_a.zero_grad()
        losses = task_losses(net_a, batches)
        opt_a.backward(losses)
        return sum(losses).detach()  # type: ignore[return-value]

    def closure_b() -> Tensor:
        opt_b.zero_grad()
        loss = sum(task_losses(net_b, batches))
        loss.backward()  # type: ignore[union-attr]
        return loss.detach()  # type: ignore[union-attr]

    for _ in range(2):
        loss_a, loss_b = opt_a.step(closure_a), opt_b.step(closure_b)
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12)
    assert calls > 2, "LBFGS should have re-evaluated the closure"
    for a, b in zip(net_a.parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_pcgrad_with_lbfgs_closure_lowers_the_loss() -> None:
    net = make_net(4)
    batches = make_batches()
    opt = gradtools.PCGrad(torch.optim.LBFGS(net.parameters(), lr=0.2, max_iter=5))

    def closure() -> Tensor:
        opt.zero_grad()
        losses = [loss.abs() for loss in task_losses(net, batches)]
        opt.backward(losses)
        return sum(losses).detach()  # type: ignore[return-value]

    first = opt.step(closure)
    for _ in range(3):
        last = opt.step(closure)
    assert torch.isfinite(last) and last < first
    assert opt.stats is not None and opt.stats.orders is not None


def test_closure_for_a_first_order_optimizer_is_called_once() -> None:
    nets = [make_net(5), make_net(5)]
    opts = [
        gradtools.PCGrad(
            torch.optim.SGD(n.parameters(), lr=0.1), generator=torch.Generator().manual_seed(0)
        )
        for n in nets
    ]
    batches = make_batches()

    def closure() -> Tensor:
        opts[0].zero_grad()
        losses = task_losses(nets[0], batches)
        opts[0].backward(losses)
        return sum(losses).detach()  # type: ignore[return-value]

    opts[0].step(closure)
    opts[1].backward(task_losses(nets[1], batches))
    opts[1].step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------- item 6: plain backward


def test_plain_backward_then_step_warns_once() -> None:
    net = make_net()
    opt = gradtools.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1))
    for _ in range(2):
        opt.zero_grad()
        sum(task_losses(net, make_batches())).backward()  # type: ignore[union-attr]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        if _ == 0:
            assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
            assert "backward(losses) was not called" in str(caught[0].message)
            assert caught[0].filename == __file__, "the warning should point at the caller"
        else:
            assert not caught, "the warning is given once per wrapper"


def test_plain_backward_warning_can_be_silenced_and_proper_use_does_not_warn() -> None:
    net = make_net()
    quiet = gradtools.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1), plain_backward="ignore")
    loud = gradtools.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sum(task_losses(net, make_batches())).backward()  # type: ignore[union-attr]
        quiet.step()
        loud.zero_grad()
        loud.backward(task_losses(net, make_batches()))
        loud.step()
        loud.zero_grad()
        loud.step()  # no gradients at all: nothing to warn about


# ---------------------------------------------------------------------- item 10: huge float64


def test_huge_finite_float64_gradients_are_aggregated() -> None:
    """Gradients around 1e160: their dot products overflow float64, the result must not."""
    net = make_net(13)
    params = list(net.parameters())
    batches = make_batches()
    big = tuple(1e160 * s for s in SIGNS)
    opt = gradtools.PCGrad(torch.optim.SGD(params, lr=0.1))
    opt.backward(task_losses(net, batches, big))
    assert opt.stats is not None and opt.stats.nonfinite_tasks == ()
    # PCGrad is positively homogeneous: scaling every loss by c scales the result by c.
    expected = reference_grads(params, task_losses(net, batches), opt.stats.orders)
    for p, e in zip(params, expected, strict=True):
        if e is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, 1e160 * e, rtol=1e-10, atol=0.0)
    plain = reference_grads(params, task_losses(net, batches), opt.stats.orders)
    shared = torch.cat(
        [
            g.reshape(-1)
            for g in torch.autograd.grad(task_losses(net, batches)[0], list(net.trunk.parameters()))
        ]
    )
    assert opt.stats.grad_norms[0].item() == pytest.approx(1e160 * shared.norm().item(), rel=1e-10)
    assert torch.isfinite(opt.stats.cosine).all()
    assert plain is not None
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("name", NAMES)
def test_huge_finite_float64_gradients_work_for_every_aggregator(name: str) -> None:
    net = make_net(13)
    opt = wrap(net, name)
    opt.backward(task_losses(net, make_batches(), (1e160, -1e159, 1.0)))
    assert opt.stats is not None and opt.stats.nonfinite_tasks == ()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert torch.isfinite(opt.stats.weights).all()
    opt.step()


def test_real_inf_beside_huge_gradients_is_still_caught() -> None:
    net = make_net(13)
    before = [p.detach().clone() for p in net.parameters()]
    opt = gradtools.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1))
    opt.backward(task_losses(net, make_batches(), (1e160, float("inf"), 1.0)))
    assert opt.stats is not None and 1 in opt.stats.nonfinite_tasks
    with pytest.raises(FloatingPointError, match=r"losses\[1\]"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
