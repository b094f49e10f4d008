"""Tests of the PCGrad optimizer wrapper (gradtools.pcgrad).

The reference is written out here the slow, obvious way: per-task gradients from
torch.autograd.grad, the shared parameters flattened into one float64 vector,
and the paper's sequential projection in a Python loop, with the visiting order
the wrapper reports in its stats.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn

import gradtools
from gradtools import PCGrad

try:  # the "bench" extra; the torch_optimizer cases are skipped without it
    import torch_optimizer
except ImportError:  # pragma: no cover - depends on the environment
    torch_optimizer = None

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# ---------------------------------------------------------------------- fixtures


class MultiTaskNet(nn.Module):
    """A shared trunk, one head per task, and a parameter no task uses."""

    def __init__(self, num_tasks: int = 3, width: int = 8) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, width))
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(num_tasks))
        self.unused = nn.Parameter(torch.ones(3))

    def task_loss(self, task: int, x: Tensor, y: Tensor, sign: float = 1.0) -> Tensor:
        out = self.heads[task](torch.tanh(self.trunk(x))).squeeze(-1)
        return sign * ((out - y) ** 2).sum()


def make_net(seed: int = 0, num_tasks: int = 3, dtype: torch.dtype = torch.float64) -> MultiTaskNet:
    torch.manual_seed(seed)
    return MultiTaskNet(num_tasks).to(dtype)


def make_batches(num_tasks: int = 3, n: int = 6, seed: int = 1, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 5, generator=gen, dtype=dtype), torch.randn(n, generator=gen, dtype=dtype))
        for _ in range(num_tasks)
    ]


# Signs that make task gradients on the trunk conflict (a loss and its negation
# pull the trunk in opposite directions), so projections really happen.
SIGNS = (1.0, -0.7, 1.3)


def task_losses(net: MultiTaskNet, batches, signs: Sequence[float] = SIGNS) -> list[Tensor]:
    return [net.task_loss(t, x, y, signs[t]) for t, (x, y) in enumerate(batches)]


def walk(grads: list[Tensor], i: int, order: list[int]) -> Tensor:
    current = grads[i].clone()
    for j in order:
        dot = current @ grads[j]
        norm_sq = grads[j] @ grads[j]
        if dot < 0 and norm_sq > 0:
            current = current - dot / norm_sq * grads[j]
    return current


def reference_grads(
    params: list[Tensor],
    losses: list[Tensor],
    orders: Tensor,
    reduction: str = "sum",
    blocks: list[list[int]] | None = None,
    shared_ids: set[int] | None = None,
) -> list[Tensor | None]:
    """PCGrad the slow way. ``blocks``: lists of indices into the shared params,
    each projected separately (default: one block of all shared params)."""
    per_task = [
        torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True) for loss in losses
    ]
    num_tasks = len(losses)
    reached = [sum(g[k] is not None for g in per_task) for k in range(len(params))]
    if shared_ids is None:
        shared = [k for k in range(len(params)) if reached[k] >= 2]
    else:
        shared = [k for k in range(len(params)) if id(params[k]) in shared_ids and reached[k]]
    scale = 1.0 / num_tasks if reduction == "mean" else 1.0
    out: list[Tensor | None] = [None] * len(params)
    for k in range(len(params)):
        if reached[k] and k not in shared:
            out[k] = sum(g[k] for g in per_task if g[k] is not None) * scale  # type: ignore[misc]
    for block in blocks if blocks is not None else [list(range(len(shared)))]:
        ks = [shared[b] for b in block]

        def flat(task: int, ks: list[int] = ks) -> Tensor:
            return torch.cat(
                [
                    (
                        per_task[task][k]
                        if per_task[task][k] is not None
                        else torch.zeros_like(params[k])
                    )
                    .reshape(-1)
                    .double()
                    for k in ks
                ]
            )

        flats = [flat(t) for t in range(num_tasks)]
        total = sum(walk(flats, i, orders[i].tolist()) for i in range(num_tasks)) * scale
        offset = 0
        for k in ks:
            n = params[k].numel()
            out[k] = total[offset : offset + n].view_as(params[k]).to(params[k].dtype)  # type: ignore[index]
            offset += n
    return out


def assert_grads_close(params: list[Tensor], expected: list[Tensor | None], **tol: float) -> None:
    for k, (p, e) in enumerate(zip(params, expected, strict=True)):
        if e is None:
            assert p.grad is None, f"param {k} should have no gradient"
        else:
            assert p.grad is not None, f"param {k} has no gradient"
            torch.testing.assert_close(p.grad, e, **tol)


@pytest.fixture(params=[False, True], ids=["per-tensor", "buckets"])
def buckets(request: pytest.FixtureRequest) -> bool:
    """Both storage layouts: autograd's own tensors, or one bucket per device and dtype."""
    return bool(request.param)


def sgd_pcgrad(net: nn.Module, **kwargs) -> PCGrad:
    return PCGrad(torch.optim.SGD(net.parameters(), lr=0.1), **kwargs)


# ---------------------------------------------------------------------- surgery


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_flat_reference(reduction: str, seed: int, buckets: bool) -> None:
    net = make_net(seed)
    params = list(net.parameters())
    batches = make_batches(seed=seed + 10)
    opt = sgd_pcgrad(
        net,
        gradient_buckets=buckets,
        reduction=reduction,
        generator=torch.Generator().manual_seed(seed),
    )
    opt.zero_grad()
    opt.backward(task_losses(net, batches))
    assert opt.stats is not None
    expected = reference_grads(params, task_losses(net, batches), opt.stats.orders, reduction)
    assert_grads_close(params, expected, rtol=1e-12, atol=1e-12)
    assert opt.stats.projected.any(), "the fixture should produce conflicts"


def test_heads_get_their_own_plain_gradient(buckets: bool) -> None:
    net = make_net(3)
    batches = make_batches()
    heads = [list(net.heads[t].parameters()) for t in range(3)]
    plain = []
    for t in range(3):
        plain.append(torch.autograd.grad(task_losses(net, batches)[t], heads[t]))
    opt = sgd_pcgrad(net, gradient_buckets=buckets)
    opt.backward(task_losses(net, batches))
    assert opt.stats is not None and opt.stats.projected.any()
    for t in range(3):
        for p, g in zip(heads[t], plain[t], strict=True):
            assert p.grad is not None
            assert torch.equal(p.grad, g), "a projection leaked into a task head"


def test_untouched_parameter_keeps_none_and_does_not_move(buckets: bool) -> None:
    net = make_net()
    before = net.unused.detach().clone()
    opt = PCGrad(
        torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.5), gradient_buckets=buckets
    )
    for _ in range(2):
        opt.zero_grad()
        opt.backward(task_losses(net, make_batches()))
        assert net.unused.grad is None
        opt.step()
    assert torch.equal(net.unused.detach(), before), (
        "weight decay or momentum moved an unused parameter"
    )
    assert net.unused not in opt.state or not opt.state[net.unused]


def test_single_task_is_exactly_a_plain_step(buckets: bool) -> None:
    net_a, net_b = make_net(5, num_tasks=1), make_net(5, num_tasks=1)
    batch = make_batches(1)
    opt_a = PCGrad(torch.optim.Adam(net_a.parameters(), lr=0.01), gradient_buckets=buckets)
    opt_b = torch.optim.Adam(net_b.parameters(), lr=0.01)
    for _ in range(3):
        opt_a.zero_grad()
        opt_a.backward(task_losses(net_a, batch))
        opt_b.zero_grad()
        task_losses(net_b, batch)[0].backward()
        for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
            assert (pa.grad is None) == (pb.grad is None)
            if pa.grad is not None:
                assert torch.equal(pa.grad, pb.grad)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_without_conflict_it_is_the_plain_sum(buckets: bool) -> None:
    net = make_net(2)
    batches = make_batches()
    # The same loss three times: identical gradients never conflict.
    same = [(batches[0][0], batches[0][1])] * 3
    opt = sgd_pcgrad(net, gradient_buckets=buckets)
    opt.backward([net.task_loss(0, x, y) for x, y in same])
    assert opt.stats is not None
    assert not opt.stats.projected.any()
    assert opt.stats.weights.tolist() == [1.0, 1.0, 1.0]
    expected = torch.autograd.grad(3 * net.task_loss(0, *same[0]), list(net.trunk.parameters()))
    for p, g in zip(net.trunk.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("granularity", ["tensor", "group"])
def test_granularity_projects_per_block(granularity: str) -> None:
    net = make_net(4)
    trunk = list(net.trunk.parameters())
    others = [p for n, p in net.named_parameters() if not n.startswith("trunk")]
    inner = torch.optim.SGD([{"params": trunk[:2]}, {"params": trunk[2:] + others}], lr=0.1)
    params = [p for g in inner.param_groups for p in g["params"]]
    opt = PCGrad(inner, granularity=granularity)  # type: ignore[arg-type]
    batches = make_batches()
    opt.backward(task_losses(net, batches))
    assert opt.stats is not None
    # Shared params in optimizer order are trunk[0..3]; the groups split them 2 + 2.
    blocks = [[0], [1], [2], [3]] if granularity == "tensor" else [[0, 1], [2, 3]]
    expected = reference_grads(params, task_losses(net, batches), opt.stats.orders, blocks=blocks)
    assert_grads_close(params, expected, rtol=1e-12, atol=1e-12)
    assert opt.stats.weights.shape == (len(blocks), 3)


def test_explicit_shared_params(buckets: bool) -> None:
    net = make_net(6)
    params = list(net.parameters())
    first_layer = list(net.trunk[0].parameters())
    opt = sgd_pcgrad(net, gradient_buckets=buckets, shared_params=first_layer)
    batches = make_batches()
    opt.backward(task_losses(net, batches))
    assert opt.stats is not None and opt.stats.num_shared == 2
    expected = reference_grads(
        params, task_losses(net, batches), opt.stats.orders, shared_ids={id(p) for p in first_layer}
    )
    assert_grads_close(params, expected, rtol=1e-12, atol=1e-12)


def test_explicit_shared_params_must_belong_to_the_optimizer() -> None:
    net = make_net()
    with pytest.raises(ValueError, match="shared_params"):
        sgd_pcgrad(net, shared_params=[torch.zeros(2, requires_grad=True)])


# ---------------------------------------------------------------------- graphs


def test_one_shared_batch_with_three_heads(buckets: bool) -> None:
    net = make_net(7)
    params = list(net.parameters())
    x, y = make_batches(1)[0]

    def losses() -> list[Tensor]:
        features = torch.tanh(net.trunk(x))
        return [SIGNS[t] * ((net.heads[t](features).squeeze(-1) - y) ** 2).sum() for t in range(3)]

    opt = sgd_pcgrad(net, gradient_buckets=buckets)
    current = losses()
    opt.backward(current)
    assert opt.stats is not None
    expected = reference_grads(params, losses(), opt.stats.orders)
    assert_grads_close(params, expected, rtol=1e-12, atol=1e-12)
    # The shared graph was freed by the last backward pass.
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        current[2].backward()


def test_separate_graphs_are_freed_as_they_go(buckets: bool) -> None:
    net = make_net()
    opt = sgd_pcgrad(net, gradient_buckets=buckets)
    current = task_losses(net, make_batches())
    opt.backward(current)
    for loss in current:
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            loss.backward()


def test_retain_graph_true_keeps_graphs() -> None:
    net = make_net()
    opt = sgd_pcgrad(net, generator=torch.Generator().manual_seed(0))
    current = task_losses(net, make_batches())
    opt.backward(current, retain_graph=True)
    first = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    opt.zero_grad()
    opt.generator.manual_seed(0)  # the same visiting orders
    opt.backward(current)  # the same graphs again
    again = [p.grad for p in net.parameters() if p.grad is not None]
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------- accumulation


def test_accumulation_equals_one_big_batch(buckets: bool) -> None:
    big = make_batches(n=8, seed=4)
    halves = [[(x[:4], y[:4]) for x, y in big], [(x[4:], y[4:]) for x, y in big]]
    net_a, net_b = make_net(8), make_net(8)
    opt_a = sgd_pcgrad(net_a, gradient_buckets=buckets, generator=torch.Generator().manual_seed(3))
    opt_b = sgd_pcgrad(net_b, gradient_buckets=buckets, generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        opt_a.zero_grad()
        opt_a.backward(task_losses(net_a, big))
        opt_b.zero_grad()
        opt_b.backward(task_losses(net_b, halves[0]))
        opt_b.backward(task_losses(net_b, halves[1]))
        assert opt_a.stats is not None and opt_b.stats is not None
        assert torch.equal(opt_a.stats.orders, opt_b.stats.orders)
        assert opt_a.stats.projected.any()
        for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
            assert (pa.grad is None) == (pb.grad is None)
            if pa.grad is not None:
                torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-10, atol=1e-12)
        opt_a.step()
        opt_b.step()


def test_combine_false_defers_the_surgery_to_step(buckets: bool) -> None:
    big = make_batches(n=8, seed=4)
    halves = [[(x[:4], y[:4]) for x, y in big], [(x[4:], y[4:]) for x, y in big]]
    net_a, net_b = make_net(8), make_net(8)
    opt_a = sgd_pcgrad(net_a, gradient_buckets=buckets, generator=torch.Generator().manual_seed(3))
    opt_b = sgd_pcgrad(net_b, gradient_buckets=buckets, generator=torch.Generator().manual_seed(3))
    opt_a.backward(task_losses(net_a, halves[0]))
    opt_a.backward(task_losses(net_a, halves[1]))
    opt_b.backward(task_losses(net_b, halves[0]), combine=False)
    assert all(p.grad is None for p in net_b.parameters())
    opt_b.backward(task_losses(net_b, halves[1]), combine=False)
    opt_a.step()
    opt_b.step()
    for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)


def test_gradients_already_in_grad_are_added_unprojected(buckets: bool) -> None:
    net = make_net(9)
    params = list(net.parameters())
    batches = make_batches()
    extra = (net.trunk[0].weight ** 2).sum() + net.unused.sum()
    extra.backward()
    before = {id(p): p.grad.clone() for p in params if p.grad is not None}
    opt = sgd_pcgrad(net, gradient_buckets=buckets)
    opt.backward(task_losses(net, batches))
    assert opt.stats is not None
    expected = reference_grads(params, task_losses(net, batches), opt.stats.orders)
    for k, p in enumerate(params):
        want = expected[k]
        if id(p) in before:
            want = before[id(p)] if want is None else want + before[id(p)]
        if want is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-12)


def test_existing_gradients_are_added_once_under_accumulation(buckets: bool) -> None:
    net = make_net(9)
    head = net.heads[0].weight
    batches = make_batches()
    (head**2).sum().backward()
    base = head.grad.clone()  # type: ignore[union-attr]
    opt = sgd_pcgrad(net, gradient_buckets=buckets)
    opt.backward(task_losses(net, batches))
    opt.backward(task_losses(net, batches))
    (plain,) = torch.autograd.grad(task_losses(net, batches)[0], [head])
    torch.testing.assert_close(head.grad, base + 2 * plain, rtol=1e-12, atol=1e-12)


def test_zero_grad_keep_tensors(buckets: bool) -> None:
    net = make_net()
    opt = sgd_pcgrad(net, gradient_buckets=buckets, generator=torch.Generator().manual_seed(0))
    batches = make_batches()
    opt.backward(task_losses(net, batches))
    first = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is None or not p.grad.any() for p in net.parameters())
    opt.generator.manual_seed(0)
    opt.backward(task_losses(net, batches))
    for n, p in net.named_parameters():
        if n in first:
            torch.testing.assert_close(p.grad, first[n])


# ---------------------------------------------------------------------- optimizer face


def run_steps(
    seed: int, steps: int = 3, generator_seed: int = 0
) -> tuple[list[Tensor], list[Tensor]]:
    net = make_net(seed)
    opt = PCGrad(
        torch.optim.AdamW(net.parameters(), lr=0.05),
        generator=torch.Generator().manual_seed(generator_seed),
    )
    orders = []
    for step in range(steps):
        opt.zero_grad()
        opt.backward(task_losses(net, make_batches(seed=step)))
        assert opt.stats is not None
        orders.append(opt.stats.orders)
        opt.step()
    return [p.detach().clone() for p in net.parameters()], orders


def test_seeded_runs_are_identical() -> None:
    params_a, orders_a = run_steps(0)
    params_b, orders_b = run_steps(0)
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(orders_a, orders_b, strict=True):
        assert torch.equal(a, b)
    _, other = run_steps(0, steps=6, generator_seed=1)
    _, base = run_steps(0, steps=6, generator_seed=0)
    assert any(not torch.equal(a, b) for a, b in zip(other, base, strict=True))


def test_default_generator_follows_torch_manual_seed() -> None:
    torch.manual_seed(123)
    a = PCGrad(torch.optim.SGD(make_net().parameters(), lr=0.1))
    torch.manual_seed(123)
    b = PCGrad(torch.optim.SGD(make_net().parameters(), lr=0.1))
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_lr_scheduler_drives_the_inner_optimizer() -> None:
    net = make_net()
    inner = torch.optim.SGD(net.parameters(), lr=1.0)
    opt = PCGrad(inner)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=4)
    assert opt.param_groups is inner.param_groups
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for step in range(4):
            assert inner.param_groups[0]["lr"] == pytest.approx(1.0 - step / 4)
            opt.zero_grad()
            opt.backward(task_losses(net, make_batches()))
            opt.step()
            sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.0)


def test_add_param_group_reaches_the_inner_optimizer() -> None:
    net = make_net()
    trunk = list(net.trunk.parameters())
    rest = [p for n, p in net.named_parameters() if not n.startswith("trunk")]
    inner = torch.optim.SGD(trunk, lr=0.1)
    opt = PCGrad(inner)
    opt.add_param_group({"params": rest, "lr": 0.5})
    assert len(inner.param_groups) == 2
    before = net.heads[0].weight.detach().clone()
    opt.backward(task_losses(net, make_batches()))
    opt.step()
    assert not torch.equal(before, net.heads[0].weight)


def test_step_hooks_and_isinstance() -> None:
    net = make_net()
    opt = sgd_pcgrad(net)
    assert isinstance(opt, torch.optim.Optimizer)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    opt.backward(task_losses(net, make_batches()))
    opt.step()
    assert calls == ["pre", "post"]
    assert "PCGrad" in repr(opt) and "SGD" in repr(opt)


def test_state_dict_round_trip_resumes_identically() -> None:
    def fresh() -> tuple[MultiTaskNet, PCGrad]:
        net = make_net(11)
        return net, PCGrad(
            torch.optim.Adam(net.parameters(), lr=0.05), generator=torch.Generator().manual_seed(2)
        )

    def train(net: MultiTaskNet, opt: PCGrad, steps: range) -> None:
        for step in steps:
            opt.zero_grad()
            opt.backward(task_losses(net, make_batches(seed=step)))
            opt.step()

    net, opt = fresh()
    train(net, opt, range(2))
    saved_model = copy.deepcopy(net.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert "pcgrad" in saved_opt and "state" in saved_opt
    train(net, opt, range(2, 5))

    net2, opt2 = fresh()
    net2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    train(net2, opt2, range(2, 5))
    for a, b in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(a, b)
    # A plain optimizer's state dict loads too (generator left as it is).
    opt2.load_state_dict(opt2.optimizer.state_dict())


OPTIMIZERS: dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]] = {
    "torch.SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    "torch.Adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "torch.AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "gradtools.AdamW": lambda ps: gradtools.AdamW(ps, lr=0.01, weight_decay=0.1),
    "torch_optimizer.Lamb": lambda ps: torch_optimizer.Lamb(ps, lr=0.01),
    "torch_optimizer.RAdam": lambda ps: torch_optimizer.RAdam(ps, lr=0.01),
    "torch_optimizer.Yogi": lambda ps: torch_optimizer.Yogi(ps, lr=0.01),
    "torch_optimizer.Lookahead": lambda ps: torch_optimizer.Lookahead(
        torch.optim.SGD(ps, lr=0.1), k=2, alpha=0.5
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_wraps_optimizer(name: str, buckets: bool) -> None:
    """Each step equals the bare optimizer stepping on the reference gradient."""
    if name.startswith("torch_optimizer") and torch_optimizer is None:
        pytest.skip("torch_optimizer is not installed")
    make = OPTIMIZERS[name]
    net, twin = make_net(12), make_net(12)
    opt = PCGrad(
        make(list(net.parameters())),
        generator=torch.Generator().manual_seed(0),
        gradient_buckets=buckets,
    )
    bare = make(list(twin.parameters()))
    for step in range(3):
        batches = make_batches(seed=step)
        opt.zero_grad()
        opt.backward(task_losses(net, batches))
        opt.step()
        assert opt.stats is not None
        twin_params = list(twin.parameters())
        bare.zero_grad()
        for p, g in zip(
            twin_params,
            reference_grads(twin_params, task_losses(twin, batches), opt.stats.orders),
            strict=True,
        ):
            p.grad = g
        bare.step()
        for a, b in zip(net.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.equal(net.trunk[0].weight, make_net(12).trunk[0].weight)


# ---------------------------------------------------------------------- precision


def test_extreme_scales_stay_finite_and_correct(buckets: bool) -> None:
    net = make_net(13, dtype=torch.float32)
    params = list(net.parameters())
    batches = make_batches(dtype=torch.float32)
    # float32 gradients near 1e30 and 1e-30: their squares leave float32's range.
    signs = (1e30, -1e-30, 1.0)
    opt = sgd_pcgrad(net, gradient_buckets=buckets)
    opt.backward(task_losses(net, batches, signs))
    assert opt.stats is not None and not opt.stats.nonfinite_tasks
    expected = reference_grads(params, task_losses(net, batches, signs), opt.stats.orders)
    for p, e in zip(params, expected, strict=True):
        if e is None:
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all()
        scale = e.abs().max().item() + 1e-30
        assert (p.grad - e).abs().max().item() <= 1e-5 * scale
    assert torch.isfinite(opt.stats.cosine).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gradients(dtype: torch.dtype, buckets: bool) -> None:
    net = make_net(14, dtype=torch.float32)
    half = copy.deepcopy(net).to(dtype)
    batches = make_batches(dtype=torch.float32)
    half_batches = [(x.to(dtype), y.to(dtype)) for x, y in batches]
    opt = sgd_pcgrad(half, gradient_buckets=buckets, generator=torch.Generator().manual_seed(0))
    opt.backward(task_losses(half, half_batches))
    assert opt.stats is not None
    params = list(half.parameters())
    expected = reference_grads(list(net.parameters()), task_losses(net, batches), opt.stats.orders)
    for p, e in zip(params, expected, strict=True):
        if e is None:
            assert p.grad is None
            continue
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all()
        # Half-precision forward/backward: compare loosely, relative to the size.
        assert (p.grad.float() - e).norm() <= 0.05 * e.norm() + 1e-3


def test_zero_task_gradient_is_finite(buckets: bool) -> None:
    net = make_net()
    batches = make_batches()
    opt = sgd_pcgrad(net, gradient_buckets=buckets)
    losses = task_losses(net, batches)
    losses[1] = losses[1] * 0.0
    opt.backward(losses)
    assert opt.stats is not None
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert torch.isfinite(opt.stats.weights).all()
    assert not opt.stats.projected[:, 1].any()


# ---------------------------------------------------------------------- non-finite


def test_nonfinite_gradient_without_scaler_raises_and_leaves_params(buckets: bool) -> None:
    net = make_net()
    opt = sgd_pcgrad(net, gradient_buckets=buckets)
    before = [p.detach().clone() for p in net.parameters()]
    losses = task_losses(net, make_batches())
    losses[2] = losses[2] * float("nan")
    opt.backward(losses)
    assert opt.stats is not None and opt.stats.nonfinite_tasks == (2,)
    with pytest.raises(FloatingPointError, match=r"task 2 \(losses\[2\]\)"):
        opt.step()
    for a, b in zip(before, net.parameters(), strict=True):
        assert torch.equal(a, b)


def _bf16_scaled_step(
    net: MultiTaskNet, opt: PCGrad, scaler: torch.amp.GradScaler, batches, signs
) -> None:
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = task_losses(net, batches, signs)
    opt.backward([scaler.scale(loss.float()) for loss in losses])
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=1e6)
    scaler.step(opt)
    scaler.update()


def test_grad_scaler_with_bf16_autocast(buckets: bool) -> None:
    net = make_net(15, dtype=torch.float32)
    twin = copy.deepcopy(net)
    batches = make_batches(dtype=torch.float32)
    opt = PCGrad(
        torch.optim.SGD(net.parameters(), lr=0.01),
        generator=torch.Generator().manual_seed(0),
        gradient_buckets=buckets,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _bf16_scaled_step(net, opt, scaler, batches, SIGNS)
    assert scaler.get_scale() == 2.0**10  # finite: no back-off
    # The same step without scaling, applied to the twin: the surgery is scale-invariant.
    twin_opt = PCGrad(
        torch.optim.SGD(twin.parameters(), lr=0.01),
        generator=torch.Generator().manual_seed(0),
        gradient_buckets=buckets,
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = task_losses(twin, batches, SIGNS)
    twin_opt.backward([loss.float() for loss in losses])
    twin_opt.step()
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_scaler_skips_nonfinite_step(buckets: bool) -> None:
    net = make_net(16, dtype=torch.float32)
    opt = PCGrad(torch.optim.SGD(net.parameters(), lr=0.01), gradient_buckets=buckets)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in net.parameters()]
    _bf16_scaled_step(net, opt, scaler, make_batches(dtype=torch.float32), (1.0, float("inf"), 1.0))
    assert scaler.get_scale() == 2.0**9  # backed off
    for a, b in zip(before, net.parameters(), strict=True):
        assert torch.equal(a, b)
    # And training goes on.
    _bf16_scaled_step(net, opt, scaler, make_batches(dtype=torch.float32), SIGNS)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


# ---------------------------------------------------------------------- bad input


def test_bad_losses_name_the_task() -> None:
    net = make_net()
    opt = sgd_pcgrad(net)
    x, y = make_batches(1)[0]
    good = net.task_loss(0, x, y)
    with pytest.raises(ValueError, match="empty"):
        opt.backward([])
    with pytest.raises(ValueError, match="1-D tensor of T losses"):
        opt.backward(good)
    with pytest.raises(TypeError, match=r"losses\[1\] must be a Tensor"):
        opt.backward([good, 3.0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"losses\[1\] must be a scalar"):
        opt.backward([good, (net.trunk(x) ** 2).sum(0)])
    with pytest.raises(ValueError, match=r"losses\[0\] does not require grad"):
        opt.backward([good.detach(), good])
    with pytest.raises(TypeError, match=r"losses\[1\] must be a real floating"):
        opt.backward([good, torch.tensor(1)])
    meta = torch.zeros((), device="meta", requires_grad=True) * 2
    with pytest.raises(ValueError, match=r"losses\[1\] is on meta"):
        opt.backward([good, meta])
    # Nothing was backpropagated by the rejected calls.
    assert all(p.grad is None for p in net.parameters())


def test_loss_reaching_no_parameter_is_rejected(buckets: bool) -> None:
    net = make_net()
    opt = sgd_pcgrad(net, gradient_buckets=buckets)
    stray = torch.ones(3, requires_grad=True)
    x, y = make_batches(1)[0]
    with pytest.raises(ValueError, match=r"losses\[1\] reaches no parameter"):
        opt.backward([net.task_loss(0, x, y), (stray**2).sum()])
    # The failed step left no half-made gradient behind.
    assert all(p.grad is None for p in net.parameters())


def test_task_count_must_not_change_within_a_step() -> None:
    net = make_net()
    opt = sgd_pcgrad(net)
    opt.backward(task_losses(net, make_batches()))
    with pytest.raises(ValueError, match="previous backward"):
        opt.backward(task_losses(net, make_batches(2))[:2])


def test_sparse_gradients_are_rejected() -> None:
    emb = nn.Embedding(10, 3, sparse=True)
    opt = PCGrad(torch.optim.SGD(emb.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"losses\[0\] produced a sparse gradient"):
        opt.backward([emb(torch.tensor([1, 2])).sum(), emb(torch.tensor([3])).sum()])


def test_constructor_arguments_are_checked() -> None:
    net = make_net()
    inner = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="reduction"):
        PCGrad(inner, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="granularity"):
        PCGrad(inner, granularity="layer")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizer"):
        PCGrad(net)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="generator"):
        PCGrad(inner, generator=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="already a PCGrad"):
        PCGrad(PCGrad(inner))


# ---------------------------------------------------------------------- stats


def test_stats_describe_the_task_gradients(buckets: bool) -> None:
    net = make_net(17)
    batches = make_batches()
    shared = list(net.trunk.parameters())
    grads = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared)])
        for loss in task_losses(net, batches)
    ]
    opt = sgd_pcgrad(net, gradient_buckets=buckets)
    opt.backward(task_losses(net, batches))
    stats = opt.stats
    assert stats is not None and stats.num_shared == len(shared)
    for i in range(3):
        assert stats.grad_norms[i].item() == pytest.approx(grads[i].norm().item(), rel=1e-12)
        for j in range(3):
            cos = (grads[i] @ grads[j] / (grads[i].norm() * grads[j].norm())).item()
            assert stats.cosine[i, j].item() == pytest.approx(cos, abs=1e-12)
            ni, nj = grads[i].norm().item(), grads[j].norm().item()
            assert stats.magnitude_similarity[i, j].item() == pytest.approx(
                2 * ni * nj / (ni**2 + nj**2), rel=1e-12
            )
            assert bool(stats.conflicts[i, j]) == (i != j and cos < 0)
    # The weights are what was applied: sum_j w_j g_j is the trunk's gradient.
    combined = torch.cat([p.grad.reshape(-1) for p in shared])  # type: ignore[union-attr]
    torch.testing.assert_close(
        combined, sum(w * g for w, g in zip(stats.weights.tolist(), grads, strict=True))
    )
    assert math.isclose(stats.cosine[0, 0].item(), 1.0)


# ---------------------------------------------------------------------- data parallel


def _ddp_losses(net: MultiTaskNet, batches, rank: int) -> list[Tensor]:
    """Rank ``rank``'s task losses: a mean over its half of each batch. Only rank 1's
    tasks 0 and 1 also use ``net.unused``: the ranks disagree on what the tasks
    reach and on whether ``unused`` is shared."""
    losses = [loss / 4 for loss in task_losses(net, batches)]
    if rank == 1:
        losses[0] = losses[0] + 0.5 * net.unused.sum()
        losses[1] = losses[1] - 0.3 * (net.unused**2).sum()
    return losses


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        big = make_batches(n=8, seed=5)
        half = [(x[rank * 4 : rank * 4 + 4], y[rank * 4 : rank * 4 + 4]) for x, y in big]
        results = {}
        for buckets in (False, True):
            net = make_net(21)
            # Each rank draws its own orders; the wrapper must use rank 0's.
            opt = PCGrad(
                torch.optim.SGD(net.parameters(), lr=0.1),
                generator=torch.Generator().manual_seed(100 + rank),
                process_group=dist.group.WORLD,
                gradient_buckets=buckets,
            )
            opt.backward(_ddp_losses(net, half, rank))
            assert opt.stats is not None
            grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
            opt.step()
            results[buckets] = {"grads": grads, "orders": opt.stats.orders}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # leave together: gloo aborts a rank whose peer closes first
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each importing torch: 10-30 s on 2 cores
def test_data_parallel_surgery_runs_on_global_task_gradients(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    net = make_net(21)
    params = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    big = make_batches(n=8, seed=5)
    halves = [[(x[r * 4 : r * 4 + 4], y[r * 4 : r * 4 + 4]) for x, y in big] for r in range(2)]

    def global_losses() -> list[Tensor]:
        # The average over ranks of each rank's task loss.
        per_rank = [_ddp_losses(net, halves[r], r) for r in range(2)]
        return [(a + b) / 2 for a, b in zip(*per_rank, strict=True)]

    for buckets in (False, True):
        ranks = [saved[r][buckets] for r in range(2)]
        orders = ranks[0]["orders"]
        assert torch.equal(orders, ranks[1]["orders"])
        assert torch.equal(
            orders, gradtools.aggregation.draw_orders(3, torch.Generator().manual_seed(100))
        )
        expected = reference_grads(params, global_losses(), orders)
        assert expected[names.index("unused")] is not None
        for name, want in zip(names, expected, strict=True):
            for r in range(2):
                if want is None:
                    assert name not in ranks[r]["grads"]
                else:
                    torch.testing.assert_close(
                        ranks[r]["grads"][name], want, rtol=1e-12, atol=1e-12
                    )
            if want is not None:  # replicas must stay bit-for-bit identical
                assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name])
    # Surgery on each rank's own gradients, then averaged, would differ here.
    local = [reference_grads(params, _ddp_losses(net, halves[r], r), orders) for r in range(2)]
    trunk = names.index("trunk.0.weight")
    averaged = (local[0][trunk] + local[1][trunk]) / 2  # type: ignore[operator]
    assert not torch.allclose(averaged, expected[trunk])  # type: ignore[arg-type]


# ---------------------------------------------------------------------- CUDA


def check_float32_against_reference(device: str, buckets: bool) -> None:
    """A float32 model on ``device`` against the float64 reference on the CPU."""
    net = make_net(22, dtype=torch.float32).to(device)
    batches32 = make_batches(dtype=torch.float32)
    opt = sgd_pcgrad(net, gradient_buckets=buckets)
    opt.backward(task_losses(net, [(x.to(device), y.to(device)) for x, y in batches32]))
    assert opt.stats is not None and opt.stats.projected.any()
    reference_net = make_net(22)  # float64, same initial values
    params = list(reference_net.parameters())
    batches64 = [(x.double(), y.double()) for x, y in batches32]  # the same numbers
    expected = reference_grads(params, task_losses(reference_net, batches64), opt.stats.orders)
    for p, e in zip(net.parameters(), expected, strict=True):
        if e is None:
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.device.type == torch.device(device).type
            torch.testing.assert_close(p.grad.double().cpu(), e, rtol=1e-4, atol=1e-5)


def test_float32_matches_the_reference(buckets: bool) -> None:
    check_float32_against_reference("cpu", buckets)


@CUDA
def test_cuda_matches_the_reference(buckets: bool) -> None:
    check_float32_against_reference("cuda", buckets)


@CUDA
def test_cuda_grad_scaler_fp16(buckets: bool) -> None:
    net = make_net(23, dtype=torch.float32).cuda()
    before = [p.detach().clone() for p in net.parameters()]
    opt = PCGrad(torch.optim.AdamW(net.parameters(), lr=0.01), gradient_buckets=buckets)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**8)
    batches = [(x.cuda(), y.cuda()) for x, y in make_batches(dtype=torch.float32)]
    for signs in (SIGNS, (1.0, float("inf"), 1.0)):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            losses = task_losses(net, batches, signs)
        opt.backward([scaler.scale(loss.float()) for loss in losses])
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == 2.0**7  # the second step was skipped
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
