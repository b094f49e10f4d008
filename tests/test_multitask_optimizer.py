"""The MultiTask wrapper's plumbing, for every registered aggregator.

What must hold whatever the method (gradtools.aggregation's registry, plus two
test aggregators below that exercise a random draw and a per-step state): the
shared parameters get sum_t w_t g_t with the weights the aggregator returns for
the Gram matrix of the task gradients, heads get their plain gradient times
``head_weight``, untouched parameters keep grad=None, accumulation equals one
big batch, seeded runs repeat, checkpoints resume exactly, GradScaler skips
non-finite steps, and data parallelism aggregates the global task gradients.

The reference computes per-task gradients with torch.autograd.grad, flattens the
shared ones in float64 and asks a copy of the aggregator (same state, same draw)
for the weights: it checks the wrapper, not the aggregators' math (that is
tests/test_aggregation*.py's job).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_pcgrad import SIGNS, MultiTaskNet, make_batches, make_net, task_losses
from torch import Tensor

import gradtools
from gradtools import aggregation as agg

pytestmark = pytest.mark.usefixtures("one_thread")


class RandomWeights(agg.Aggregator):
    """A test aggregator whose weights are its per-step draw (a random positive vector)."""

    name = "test-random-weights"

    def draw(self, num_tasks: int, generator: torch.Generator | None) -> Tensor:
        return torch.rand(num_tasks, generator=generator, dtype=torch.float64) + 0.5

    def aggregate(self, gram: Tensor, draw: Tensor | None) -> agg.Aggregation:
        assert draw is not None
        return agg.Aggregation(draw.expand(gram.shape[0], -1).clone())


class NormEMA(agg.Aggregator):
    """A stateful test aggregator: weights 1 / (EMA of each task's gradient norm)."""

    name = "test-norm-ema"

    def __init__(self) -> None:
        self.ema: Tensor | None = None
        self.updates = 0

    def aggregate(self, gram: Tensor, draw: Tensor | None) -> agg.Aggregation:
        norms = gram.diagonal(dim1=-2, dim2=-1).sum(0).clamp(min=0).sqrt()
        self.ema = norms if self.ema is None else 0.7 * self.ema + 0.3 * norms
        self.updates += 1
        weights = 1.0 / (self.ema + 1e-3)
        return agg.Aggregation(weights.expand(gram.shape[0], -1).clone())

    def head_weight(self, num_tasks: int) -> float:
        return 0.5

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = None if state["ema"] is None else state["ema"].clone()
        self.updates = state["updates"]


def _registered() -> dict[str, Callable[[], agg.Aggregator]]:
    makers: dict[str, Callable[[], agg.Aggregator]] = {}
    for name in agg.available():
        makers[name] = lambda name=name: agg.from_name(name)
    makers[RandomWeights.name] = RandomWeights
    makers[NormEMA.name] = NormEMA
    return makers


AGGREGATORS = _registered()
NAMES = sorted(AGGREGATORS)


def wrap(net: MultiTaskNet, name: str, seed: int = 0, **kwargs: Any) -> gradtools.MultiTask:
    inner = kwargs.pop("inner", None) or torch.optim.SGD(net.parameters(), lr=0.1)
    return gradtools.MultiTask(
        inner, AGGREGATORS[name](), generator=torch.Generator().manual_seed(seed), **kwargs
    )


def reference_grads(
    net: MultiTaskNet,
    batches: list[tuple[Tensor, Tensor]],
    aggregator: agg.Aggregator,
    draw: Tensor | None,
    gram: Tensor | None = None,
) -> tuple[list[Tensor | None], Tensor, Tensor]:
    """Each parameter's expected gradient, the shared weights and the Gram matrix, the slow way.

    The weights are ``aggregator``'s for ``gram`` ([1, T, T]; default: the Gram
    matrix computed here from the flattened float64 gradients, which is also
    returned). Iterative solvers (Nash-MTL, ...) amplify the last-bit
    differences between two ways of summing the same Gram matrix up to their
    tolerance, so the tests pass the Gram matrix the wrapper used (checked
    separately against the one computed here) to compare weights exactly.
    ``aggregator`` is consumed (its state advances): pass a copy.
    """
    params = list(net.parameters())
    losses = task_losses(net, batches)
    per_task = [
        torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True) for loss in losses
    ]
    num_tasks = len(losses)
    reached = [sum(g[k] is not None for g in per_task) for k in range(len(params))]
    shared = [k for k in range(len(params)) if reached[k] >= 2]
    flats = torch.stack(
        [torch.cat([per_task[t][k].reshape(-1).double() for k in shared]) for t in range(num_tasks)]
    )
    own_gram = flats @ flats.T
    used = own_gram.unsqueeze(0) if gram is None else gram
    weights = aggregator.aggregate(used, draw).weights[0]
    head = aggregator.head_weight(num_tasks)
    out: list[Tensor | None] = [None] * len(params)
    for k in range(len(params)):
        grads = [g[k] for g in per_task if g[k] is not None]
        if k in shared:
            out[k] = sum(w * g[k] for w, g in zip(weights.tolist(), per_task, strict=True))  # type: ignore[misc]
        elif grads:
            out[k] = head * sum(grads)  # type: ignore[assignment]
    return out, weights, own_gram


def spy_on_gram(aggregator: agg.Aggregator) -> list[Tensor]:
    """Record every Gram batch the wrapper hands to ``aggregator.aggregate``."""
    seen: list[Tensor] = []
    original = aggregator.aggregate

    def aggregate(gram: Tensor, draw: Tensor | None) -> agg.Aggregation:
        seen.append(gram.clone())
        return original(gram, draw)

    aggregator.aggregate = aggregate  # type: ignore[method-assign]
    return seen


def assert_grads(net: MultiTaskNet, expected: list[Tensor | None], **tol: float) -> None:
    for (name, p), e in zip(net.named_parameters(), expected, strict=True):
        if e is None:
            assert p.grad is None, f"{name} should have no gradient"
        else:
            assert p.grad is not None, f"{name} has no gradient"
            torch.testing.assert_close(p.grad, e, **tol, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------------- the combination


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("buckets", [False, True], ids=["per-tensor", "buckets"])
def test_shared_get_weighted_sum_heads_their_own_gradient(name: str, buckets: bool) -> None:
    net = make_net(3)
    batches = make_batches()
    opt = wrap(net, name, gradient_buckets=buckets)
    before = copy.deepcopy(opt.aggregator)
    seen = spy_on_gram(opt.aggregator)
    opt.backward(task_losses(net, batches))
    stats = opt.stats
    assert stats is not None and stats.aggregator == opt.aggregator.name
    (gram,) = seen
    expected, weights, own_gram = reference_grads(net, batches, before, stats.draw, gram)
    torch.testing.assert_close(gram[0], own_gram, rtol=1e-12, atol=1e-12)
    assert torch.equal(stats.weights, weights)
    assert_grads(net, expected, rtol=1e-10, atol=1e-12)
    assert net.unused.grad is None
    assert stats.num_shared == 4
    assert (stats.projected is not None) == isinstance(opt.aggregator, agg.PCGrad)


@pytest.mark.parametrize("name", NAMES)
def test_stats_geometry_is_the_same_for_every_aggregator(name: str) -> None:
    net = make_net(17)
    batches = make_batches()
    shared = list(net.trunk.parameters())
    grads = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared)])
        for loss in task_losses(net, batches)
    ]
    opt = wrap(net, name)
    opt.backward(task_losses(net, batches))
    stats = opt.stats
    assert stats is not None
    for i in range(3):
        assert stats.grad_norms[i].item() == pytest.approx(grads[i].norm().item(), rel=1e-12)
        for j in range(3):
            cos = (grads[i] @ grads[j] / (grads[i].norm() * grads[j].norm())).item()
            assert stats.cosine[i, j].item() == pytest.approx(cos, abs=1e-12)
            assert bool(stats.conflicts[i, j]) == (i != j and cos < 0)
    assert stats.conflicts.any(), "the fixture should produce conflicts"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("granularity", ["tensor", "group"])
def test_granularity_gives_one_weight_row_per_block(name: str, granularity: str) -> None:
    net = make_net(4)
    trunk = list(net.trunk.parameters())
    others = [p for n, p in net.named_parameters() if not n.startswith("trunk")]
    inner = torch.optim.SGD([{"params": trunk[:2]}, {"params": trunk[2:] + others}], lr=0.1)
    opt = wrap(net, name, inner=inner, granularity=granularity)
    opt.backward(task_losses(net, make_batches()))
    assert opt.stats is not None
    assert opt.stats.weights.shape == (4 if granularity == "tensor" else 2, 3)
    assert torch.isfinite(opt.stats.weights).all()


@pytest.mark.parametrize("name", NAMES)
def test_untouched_parameter_keeps_none_and_does_not_move(name: str) -> None:
    net = make_net()
    before = net.unused.detach().clone()
    opt = wrap(net, name, inner=torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.5))
    for step in range(2):
        opt.zero_grad()
        opt.backward(task_losses(net, make_batches(seed=step)))
        assert net.unused.grad is None
        opt.step()
    assert torch.equal(net.unused.detach(), before)


# ---------------------------------------------------------------------- accumulation, state


def fresh_copy(name: str, aggregator: agg.Aggregator) -> agg.Aggregator:
    """A new aggregator of kind ``name`` holding ``aggregator``'s current state."""
    twin = AGGREGATORS[name]()
    state = copy.deepcopy(aggregator.state_dict())
    if state:
        twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("name", NAMES)
def test_accumulation_equals_one_big_batch(name: str) -> None:
    """Two half batches: the aggregation runs on the summed per-task gradients.

    Checked against the big batch's per-task gradients: the Gram matrix the
    wrapper hands over (to 1e-12), the weights (exactly the aggregator's, from its
    state before the step, for that Gram matrix: a state advanced twice would
    show), and the gradients built from those weights.
    """
    big = make_batches(n=8, seed=4)
    halves = [[(x[:4], y[:4]) for x, y in big], [(x[4:], y[4:]) for x, y in big]]
    net = make_net(8)
    opt = wrap(net, name, seed=3)
    seen = spy_on_gram(opt.aggregator)
    for _ in range(3):
        before = fresh_copy(name, opt.aggregator)
        opt.zero_grad()
        opt.backward(task_losses(net, halves[0]))
        opt.backward(task_losses(net, halves[1]))
        assert opt.stats is not None
        expected, weights, own_gram = reference_grads(net, big, before, opt.stats.draw, seen[-1])
        torch.testing.assert_close(seen[-1][0], own_gram, rtol=1e-12, atol=1e-12)
        assert torch.equal(opt.stats.weights, weights)
        assert_grads(net, expected, rtol=1e-10, atol=1e-12)
        opt.step()


def test_stateful_aggregator_advances_once_per_step() -> None:
    net = make_net()
    opt = wrap(net, NormEMA.name)
    for step in range(2):
        opt.zero_grad()
        for half in range(3):
            opt.backward(task_losses(net, make_batches(seed=10 * step + half)))
        opt.step()
    assert isinstance(opt.aggregator, NormEMA) and opt.aggregator.updates == 2


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-9)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9) or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


def _train(net: MultiTaskNet, opt: gradtools.MultiTask, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        opt.backward(task_losses(net, make_batches(seed=step)))
        opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_seeded_runs_are_identical(name: str) -> None:
    nets = [make_net(0), make_net(0)]
    for net in nets:
        _train(
            net,
            wrap(net, name, seed=5, inner=torch.optim.Adam(net.parameters(), lr=0.05)),
            range(3),
        )
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_identically(name: str) -> None:
    def fresh() -> tuple[MultiTaskNet, gradtools.MultiTask]:
        net = make_net(11)
        return net, wrap(net, name, seed=2, inner=torch.optim.Adam(net.parameters(), lr=0.05))

    net, opt = fresh()
    _train(net, opt, range(2))
    saved_model = copy.deepcopy(net.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert saved_opt["multitask"]["aggregator"] == opt.aggregator.name
    _train(net, opt, range(2, 5))

    net2, opt2 = fresh()
    net2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    _train(net2, opt2, range(2, 5))
    for a, b in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert _same(opt.aggregator.state_dict(), opt2.aggregator.state_dict())


def test_state_dict_keeps_the_aggregator_state() -> None:
    net = make_net()
    opt = wrap(net, NormEMA.name)
    _train(net, opt, range(2))
    entry = opt.state_dict()["multitask"]
    assert entry["aggregator_state"]["updates"] == 2
    assert set(entry) == {"generator_state", "aggregator", "granularity", "aggregator_state"}


def test_pcgrad_state_dict_format_is_unchanged() -> None:
    net = make_net()
    opt = gradtools.PCGrad(torch.optim.SGD(net.parameters(), lr=0.1), reduction="mean")
    _train(net, opt, range(1))
    state = opt.state_dict()
    assert "multitask" not in state
    assert set(state["pcgrad"]) == {"generator_state", "reduction", "granularity"}
    assert state["pcgrad"]["reduction"] == "mean"


def test_pcgrad_is_multitask_with_the_pcgrad_aggregator() -> None:
    nets = [make_net(2), make_net(2)]
    opts = [
        gradtools.PCGrad(torch.optim.SGD(nets[0].parameters(), lr=0.1), "mean",
                         torch.Generator().manual_seed(1)),
        gradtools.MultiTask(torch.optim.SGD(nets[1].parameters(), lr=0.1),
                            agg.PCGrad("mean"), generator=torch.Generator().manual_seed(1)),
    ]  # fmt: skip
    for net, opt in zip(nets, opts, strict=True):
        _train(net, opt, range(3))
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(a, b)
    assert (
        gradtools.MultiTask(torch.optim.SGD(nets[0].parameters()), "pcgrad").aggregator.name
        == "pcgrad"
    )


# ---------------------------------------------------------------------- AMP, non-finite


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_skips_nonfinite_step_then_trains(name: str) -> None:
    net = make_net(16, dtype=torch.float32)
    opt = wrap(net, name)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for p in net.parameters()]
    for signs in ((1.0, float("inf"), 1.0), SIGNS):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = task_losses(net, make_batches(dtype=torch.float32), signs)
        opt.backward([scaler.scale(loss.float()) for loss in losses])
        if signs is not SIGNS:
            assert opt.stats is not None and opt.stats.nonfinite_tasks == (1,)
        scaler.step(opt)
        scaler.update()
        if signs is not SIGNS:
            assert scaler.get_scale() == 2.0**9
            assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_gradient_names_the_loss(name: str) -> None:
    net = make_net()
    opt = wrap(net, name)
    losses = task_losses(net, make_batches())
    losses[2] = losses[2] * float("nan")
    opt.backward(losses)
    with pytest.raises(FloatingPointError, match=r"task 2 \(losses\[2\]\)"):
        opt.step()


# ---------------------------------------------------------------------- data parallel


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, names: list[str]) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        results = {}
        for name in names:
            net = make_net(21)
            # Each rank seeds its own generator: draws must come from rank 0.
            opt = wrap(net, name, seed=100 + rank, process_group=dist.group.WORLD)
            seen = spy_on_gram(opt.aggregator)
            steps = []
            for step in range(2):
                big = make_batches(n=8, seed=5 + step)
                half = [(x[rank * 4 : rank * 4 + 4], y[rank * 4 : rank * 4 + 4]) for x, y in big]
                opt.zero_grad()
                before = copy.deepcopy(opt.aggregator.state_dict())
                opt.backward([loss / 8 for loss in task_losses(net, half)])
                assert opt.stats is not None
                steps.append({
                    "grads": {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None},
                    "draw": opt.stats.draw,
                    "weights": opt.stats.weights,
                    "gram": seen[-1],
                    "state_before": before,
                    "params_before": {n: p.detach().clone() for n, p in net.named_parameters()},
                })  # fmt: skip
                opt.step()
            results[name] = {"steps": steps, "state": opt.aggregator.state_dict()}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # leave together: gloo aborts a rank whose peer closes first
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each importing torch: 10-30 s on 2 cores
def test_data_parallel_aggregates_global_task_gradients(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every aggregator (a random-draw one and a stateful one among them) under DDP."""
    import torch.multiprocessing as mp

    names = NAMES
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), names), nprocs=2)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name in names:
        ranks = [saved[r][name] for r in range(2)]
        assert _same(ranks[0]["state"], ranks[1]["state"]), f"{name}: state differs across ranks"
        for step in range(2):
            got = [ranks[r]["steps"][step] for r in range(2)]
            if got[0]["draw"] is not None:
                assert torch.equal(got[0]["draw"], got[1]["draw"])
            for key in got[0]["grads"]:  # replicas stay bit-for-bit identical
                assert torch.equal(got[0]["grads"][key], got[1]["grads"][key]), f"{name}: {key}"
            # The reference: the aggregator on the global (all-rank mean) task gradients.
            net = make_net(21)
            net.load_state_dict(got[0]["params_before"])
            aggregator = AGGREGATORS[name]()
            if got[0]["state_before"]:
                aggregator.load_state_dict(got[0]["state_before"])
            big = make_batches(n=8, seed=5 + step)
            # The mean over ranks of (sum over 4 rows / 8) is the sum over 8 rows / 16.
            global_batches = [(x, y) for x, y in big]
            expected, weights, own_gram = reference_grads(
                _Scaled(net, 1 / 16), global_batches, aggregator, got[0]["draw"], got[0]["gram"]
            )
            assert torch.equal(got[0]["gram"], got[1]["gram"]), f"{name}: Gram differs across ranks"
            torch.testing.assert_close(got[0]["gram"][0], own_gram, rtol=1e-12, atol=1e-14)
            assert torch.equal(got[0]["weights"], weights), f"{name} step {step}: weights"
            for (pname, _), want in zip(net.named_parameters(), expected, strict=True):
                if want is None:
                    assert pname not in got[0]["grads"]
                else:
                    torch.testing.assert_close(
                        got[0]["grads"][pname], want, rtol=1e-9, atol=1e-12,
                        msg=lambda m, where=f"{name} step {step} {pname}": f"{where}: {m}",
                    )  # fmt: skip


class _Scaled(MultiTaskNet):
    """``net`` with every task loss multiplied by ``factor`` (shares its parameters)."""

    def __init__(self, net: MultiTaskNet, factor: float) -> None:
        torch.nn.Module.__init__(self)
        self.inner = net
        self.factor = factor

    def parameters(self, recurse: bool = True):  # type: ignore[no-untyped-def, override]
        return self.inner.parameters(recurse)

    def named_parameters(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        return self.inner.named_parameters(*args, **kwargs)

    def task_loss(self, task: int, x: Tensor, y: Tensor, sign: float = 1.0) -> Tensor:
        return self.factor * self.inner.task_loss(task, x, y, sign)
