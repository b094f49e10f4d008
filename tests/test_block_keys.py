"""Stateful aggregators keep their state per Gram block key (issue 20, item 4).

Under ``granularity="tensor"`` or ``"group"`` a task may reach a tensor on some
steps only, so the blocks of one step are not those of the next. GradVac's EMA
targets and NashMTL's last weights used to be kept by the block's position among
this step's blocks: training failed when the count changed, and when it did not,
one tensor's state was silently used for another. The oracle here is one
aggregator instance per parameter (or group), fed that parameter's blocks only.
"""

from __future__ import annotations

import io

import pytest
import torch

import gradtools
from gradtools import aggregation as agg

# Per task, the constant gradient of each parameter (the losses are linear). Task 2's
# gradient of B is almost aligned with task 1's (a running cosine target near 0.49
# with beta = 0.5), C's nearly orthogonal: carrying B's target into C's step changes
# C's update, a fresh target does not.
VECTORS = {
    "A": ([1.0, 0.0, 0.5], [-0.5, 1.0, 0.0]),
    "B": ([1.0, 0.0, 0.0], [1.0, 0.2, 0.0]),
    "C": ([1.0, 0.0, 0.0], [0.2, 1.0, 0.0]),
}


def _params() -> dict[str, torch.nn.Parameter]:
    return {name: torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)) for name in VECTORS}


def _losses(params: dict[str, torch.Tensor], reached: list[str]) -> list[torch.Tensor]:
    return [
        sum(
            (params[name] * torch.tensor(VECTORS[name][task], dtype=torch.float64)).sum()
            for name in ["A", *reached]
        )
        for task in range(2)
    ]


def _wrapper(
    params: dict[str, torch.nn.Parameter], granularity: str, aggregator: agg.Aggregator
) -> gradtools.MultiTask:
    if granularity == "group":
        groups = [{"params": [p]} for p in params.values()]
        inner = torch.optim.SGD(groups, lr=0.1)
    else:
        inner = torch.optim.SGD(list(params.values()), lr=0.1)
    return gradtools.MultiTask(inner, aggregator, granularity=granularity)  # type: ignore[arg-type]


def _run(
    opt: gradtools.MultiTask, params, schedule: list[list[str]]
) -> list[dict[str, torch.Tensor]]:
    grads = []
    for reached in schedule:
        opt.zero_grad()
        opt.backward(_losses(params, reached))
        grads.append({n: p.grad.clone() for n, p in params.items() if p.grad is not None})
        opt.step()
    return grads


def _oracle(schedule: list[list[str]], factory) -> list[dict[str, torch.Tensor]]:
    """One aggregator per parameter, each fed only the steps that reach its parameter."""
    per_param = {name: factory() for name in VECTORS}
    orders = agg.draw_orders(2, None)  # T = 2: the only order is [[1], [0]]
    grads = []
    for reached in schedule:
        step = {}
        for name in ["A", *reached]:
            jac = torch.tensor(VECTORS[name], dtype=torch.float64)
            weights = per_param[name].aggregate((jac @ jac.T).unsqueeze(0), orders).weights[0]
            step[name] = jac.T @ weights
        grads.append(step)
    return grads


SCHEDULES = {
    # The count of shared tensors changes: "GradVac holds targets for [3, 2, 2] Gram
    # blocks but got [2, 2, 2]" mid-run before.
    "count-changes": [["B", "C"], ["B"], ["B", "C"]],
    # The count stays, the tensor changes: C used to get B's running targets.
    "same-count": [["B"], ["C"], ["B"]],
}


@pytest.mark.parametrize("granularity", ["tensor", "group"])
@pytest.mark.parametrize("schedule", list(SCHEDULES), ids=str)
@pytest.mark.parametrize(
    "factory",
    [lambda: agg.GradVac(beta=0.5), lambda: agg.NashMTL(max_norm=None, update_every=2)],
    ids=["gradvac", "nashmtl"],
)
def test_state_follows_the_parameter_when_tasks_reach_tensors_on_some_steps(
    granularity: str, schedule: str, factory
) -> None:
    params = _params()
    actual = _run(_wrapper(params, granularity, factory()), params, SCHEDULES[schedule])
    expected = _oracle(SCHEDULES[schedule], factory)
    for got, want in zip(actual, expected, strict=True):
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("granularity", ["tensor", "group"])
def test_state_dict_keys_blocks_by_position_and_round_trips(granularity: str) -> None:
    """The aggregator state in MultiTask.state_dict() is keyed by the parameter's position in
    param_groups (the group's index with granularity="group"); a fresh wrapper loaded from it
    (through torch.save, weights_only) continues exactly."""
    schedule = SCHEDULES["same-count"]
    params = _params()
    opt = _wrapper(params, granularity, agg.GradVac(beta=0.5))
    _run(opt, params, schedule[:2])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    targets = opt.aggregator.state_dict()["targets"]
    assert set(targets) == {(granularity, 0), (granularity, 1), (granularity, 2)}

    buffer.seek(0)
    copies = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    resumed = _wrapper(copies, granularity, agg.GradVac(beta=0.5))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    after = _run(opt, params, schedule[2:])
    again = _run(resumed, copies, schedule[2:])
    for name in after[0]:
        assert torch.equal(after[0][name], again[0][name])
    # The state matters: a fresh GradVac (target 0, not negative) gives A another update.
    fresh_params = {n: torch.nn.Parameter(p.detach().clone()) for n, p in copies.items()}
    fresh = _run(
        _wrapper(fresh_params, granularity, agg.GradVac(beta=0.5)), fresh_params, schedule[2:]
    )
    assert not torch.equal(fresh[0]["A"], after[0]["A"])


def test_block_keys_must_match_the_blocks() -> None:
    gram = torch.eye(2, dtype=torch.float64).repeat(2, 1, 1)
    orders = agg.draw_orders(2, None)
    with pytest.raises(ValueError, match="block_keys"):
        agg.GradVac().aggregate(gram, orders, block_keys=["only one"])
    with pytest.raises(ValueError, match="distinct"):
        agg.NashMTL().aggregate(gram, None, block_keys=["same", "same"])


def test_old_positional_gradvac_state_still_loads() -> None:
    """A checkpoint from before per-key state ([B, T, T] targets) loads as block indices."""
    old = {"targets": torch.full((2, 3, 3), 0.25, dtype=torch.float64)}
    aggregator = agg.GradVac()
    aggregator.load_state_dict(old)
    assert set(aggregator.state_dict()["targets"]) == {0, 1}


def test_old_positional_nashmtl_state_still_loads() -> None:
    """A checkpoint from before per-key state ([B, T] last weights) loads as block indices."""
    aggregator = agg.NashMTL()
    aggregator.load_state_dict({"step": 4, "last_weights": torch.ones(2, 3, dtype=torch.float64)})
    state = aggregator.state_dict()
    assert state["step"] == 4 and set(state["last_weights"]) == {0, 1}


@pytest.mark.parametrize(
    ("aggregator", "entry", "bad"),
    [(agg.NashMTL(), "last_weights", {"x": torch.ones(2, 3)}),
     (agg.GradVac(), "targets", {"x": torch.ones(3)}),
     (agg.GradVac(), "targets", {"x": torch.ones(2, 3)}),
     (agg.NashMTL(), "last_weights", [1.0, 2.0])],
)
def test_bad_per_key_state_is_refused_naming_it_and_changes_nothing(
    aggregator: agg.Aggregator, entry: str, bad: object
) -> None:
    before = aggregator.state_dict()
    with pytest.raises(ValueError, match=entry):
        aggregator.load_state_dict({entry: bad})
    assert aggregator.state_dict() == before
