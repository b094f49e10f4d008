"""Bad input to the multi-task wrapper: the exception type, and a message that names the argument.

Constructor arguments, ``step()``/closure misuse, checkpoint mismatches and bad
losses. Each case also checks that nothing was changed: no gradient written,
no parameter moved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_pcgrad import make_batches, make_net, task_losses
from torch import nn

import gradtools
from gradtools import aggregation as agg

pytestmark = pytest.mark.usefixtures("one_thread")

NET = make_net()


def sgd() -> torch.optim.Optimizer:
    return torch.optim.SGD(NET.parameters(), lr=0.1)


MT = gradtools.MultiTask
PC = gradtools.PCGrad

# (id, constructor call, exception type, regex the message must match: it names the argument)
CONSTRUCTOR_CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("optimizer is a module", lambda: MT(NET, "pcgrad"), TypeError, "optimizer must be a torch.optim.Optimizer"),  # type: ignore[arg-type]
    ("optimizer already wrapped", lambda: MT(PC(sgd()), "pcgrad"), TypeError, "optimizer is already a PCGrad"),
    ("PCGrad of PCGrad", lambda: PC(PC(sgd())), TypeError, "already a PCGrad"),
    ("aggregator unknown name", lambda: MT(sgd(), "pcgard"), ValueError, r"aggregator.*unknown aggregator 'pcgard'.*pcgrad"),
    ("aggregator wrong type", lambda: MT(sgd(), 3), TypeError, "aggregator must be"),  # type: ignore[arg-type]
    ("aggregator is a class", lambda: MT(sgd(), agg.PCGrad), TypeError, r"aggregator must be an instance.*PCGrad\(\)"),  # type: ignore[arg-type]
    ("granularity", lambda: MT(sgd(), "pcgrad", granularity="layer"), ValueError, "granularity must be"),  # type: ignore[arg-type]
    ("generator wrong type", lambda: MT(sgd(), "pcgrad", generator=0), TypeError, "generator must be a torch.Generator"),  # type: ignore[arg-type]
    ("shared_params single tensor", lambda: MT(sgd(), "pcgrad", shared_params=NET.trunk[0].weight), TypeError, "shared_params must be an iterable.*single Tensor"),
    ("shared_params not iterable", lambda: MT(sgd(), "pcgrad", shared_params=5), TypeError, "shared_params must be an iterable"),  # type: ignore[arg-type]
    ("shared_params holds a non-tensor", lambda: MT(sgd(), "pcgrad", shared_params=[NET.trunk[0].weight, "bias"]), TypeError, r"shared_params\[1\] must be a Tensor"),  # type: ignore[list-item]
    ("shared_params foreign tensor", lambda: MT(sgd(), "pcgrad", shared_params=[torch.zeros(2, requires_grad=True)]), ValueError, "shared_params holds tensors that are not in the optimizer"),
    ("process_group wrong type", lambda: MT(sgd(), "pcgrad", process_group="world"), TypeError, "process_group must be a torch.distributed.ProcessGroup"),  # type: ignore[arg-type]
    ("gradient_buckets wrong type", lambda: MT(sgd(), "pcgrad", gradient_buckets="yes"), TypeError, "gradient_buckets must be"),  # type: ignore[arg-type]
    ("gradient_buckets with per-tensor granularity", lambda: MT(sgd(), "pcgrad", gradient_buckets=True, granularity="tensor"), ValueError, "gradient_buckets=True needs granularity='all'"),
    ("plain_backward", lambda: MT(sgd(), "pcgrad", plain_backward="loud"), ValueError, "plain_backward must be"),  # type: ignore[arg-type]
    ("PCGrad reduction", lambda: PC(sgd(), reduction="avg"), ValueError, "reduction must be 'sum' or 'mean'"),  # type: ignore[arg-type]
    ("PCGrad granularity", lambda: PC(sgd(), granularity="row"), ValueError, "granularity must be"),  # type: ignore[arg-type]
    ("PCGrad generator", lambda: PC(sgd(), generator="seed"), TypeError, "generator must be"),  # type: ignore[arg-type]
]  # fmt: skip


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [case[1:] for case in CONSTRUCTOR_CASES],
    ids=[case[0] for case in CONSTRUCTOR_CASES],
)
def test_constructor_rejects(
    build: Callable[[], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        build()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the generator")
def test_generator_must_be_on_the_cpu() -> None:
    with pytest.raises(ValueError, match=r"generator must be a CPU torch\.Generator"):
        MT(sgd(), "pcgrad", generator=torch.Generator(device="cuda"))


# ---------------------------------------------------------------------- step / closure misuse


def _unchanged(net: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_lbfgs_without_closure_names_closure() -> None:
    net = make_net()
    opt = PC(torch.optim.LBFGS(net.parameters()))
    opt.backward(task_losses(net, make_batches()))
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(TypeError, match="closure: LBFGS re-evaluates"):
        opt.step()
    assert _unchanged(net, before)


def test_closure_must_be_callable() -> None:
    net = make_net()
    opt = PC(torch.optim.SGD(net.parameters(), lr=0.1))
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(TypeError, match="closure must be callable"):
        opt.step(closure=3)  # type: ignore[arg-type]
    assert _unchanged(net, before)


def test_plain_backward_error_mode_raises_and_does_not_step() -> None:
    net = make_net()
    opt = PC(torch.optim.SGD(net.parameters(), lr=0.1), plain_backward="error")
    sum(task_losses(net, make_batches())).backward()  # type: ignore[union-attr]
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match=r"backward\(losses\) was not called"):
        opt.step()
    assert _unchanged(net, before)


def test_closure_with_plain_backward_is_reported() -> None:
    net = make_net()
    opt = PC(torch.optim.SGD(net.parameters(), lr=0.1), plain_backward="error")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = sum(task_losses(net, make_batches()))
        loss.backward()  # type: ignore[union-attr]
        return loss  # type: ignore[return-value]

    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match=r"backward\(losses\) was not called"):
        opt.step(closure)
    assert _unchanged(net, before)


def test_loading_another_aggregators_checkpoint_names_the_aggregator() -> None:
    class Other(agg.Aggregator):
        name = "test-other"

        def aggregate(self, gram: torch.Tensor, draw: torch.Tensor | None) -> agg.Aggregation:
            return agg.Aggregation(torch.ones(gram.shape[0], gram.shape[-1], dtype=torch.float64))

    net = make_net()
    saved = MT(torch.optim.SGD(net.parameters(), lr=0.1), Other()).state_dict()
    target = PC(torch.optim.SGD(net.parameters(), lr=0.7))
    with pytest.raises(ValueError, match=r"saved with aggregator 'test-other'.*'pcgrad'"):
        target.load_state_dict(saved)
    assert target.param_groups[0]["lr"] == 0.7  # nothing was loaded


# ---------------------------------------------------------------------- losses


def _losses_cases() -> list[tuple[str, Callable[[nn.Module], Any], type[Exception], str]]:
    def good(net: Any) -> torch.Tensor:
        x, y = make_batches(1)[0]
        return net.task_loss(0, x, y)

    stray = torch.ones(3, requires_grad=True)
    return [
        ("empty", lambda net: [], ValueError, "losses is empty"),
        ("0-d tensor", lambda net: good(net), ValueError, r"1-D tensor of T losses, got a tensor of shape \[\]"),
        ("2-D tensor", lambda net: torch.stack([good(net), good(net)]).reshape(2, 1), ValueError, r"1-D tensor of T losses, got a tensor of shape \[2, 1\]"),
        ("not a tensor", lambda net: [good(net), 3.0], TypeError, r"losses\[1\] must be a Tensor"),
        ("not scalar", lambda net: [good(net), net.trunk(make_batches(1)[0][0]).sum(0)], ValueError, r"losses\[1\] must be a scalar"),
        ("detached", lambda net: [good(net).detach(), good(net)], ValueError, r"losses\[0\] does not require grad"),
        ("integer", lambda net: [good(net), torch.tensor(1)], TypeError, r"losses\[1\] must be a real floating"),
        ("other device", lambda net: [good(net), torch.zeros((), device="meta", requires_grad=True) * 2], ValueError, r"losses\[1\] is on meta"),
        ("reaches no parameter", lambda net: [good(net), (stray**2).sum()], ValueError, r"losses\[1\] reaches no parameter"),
    ]  # fmt: skip


LOSSES_CASES = _losses_cases()


@pytest.mark.parametrize(
    ("make_losses", "error", "message"),
    [case[1:] for case in LOSSES_CASES],
    ids=[case[0] for case in LOSSES_CASES],
)
@pytest.mark.parametrize("name", ["pcgrad", "test-sum"])
def test_bad_losses_are_rejected_before_any_backward(
    make_losses: Callable[[nn.Module], Any], error: type[Exception], message: str, name: str
) -> None:
    class Sum(agg.Aggregator):
        name = "test-sum"

        def aggregate(self, gram: torch.Tensor, draw: torch.Tensor | None) -> agg.Aggregation:
            return agg.Aggregation(torch.ones(gram.shape[0], gram.shape[-1], dtype=torch.float64))

    net = make_net()
    aggregator = agg.PCGrad() if name == "pcgrad" else Sum()
    opt = MT(torch.optim.SGD(net.parameters(), lr=0.1), aggregator)
    with pytest.raises(error, match=message):
        opt.backward(make_losses(net))
    assert all(p.grad is None for p in net.parameters())


def test_nonfinite_loss_names_the_task_and_leaves_parameters() -> None:
    net = make_net()
    opt = PC(torch.optim.SGD(net.parameters(), lr=0.1))
    losses = task_losses(net, make_batches())
    losses[1] = losses[1] * float("inf")
    opt.backward(losses)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(FloatingPointError, match=r"task 1 \(losses\[1\]\)"):
        opt.step()
    assert _unchanged(net, before)
