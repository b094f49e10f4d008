"""``MultiTask.backward(losses, features=h)``: aggregation at the representation level.

The setting: one batch through a shared encoder, ``h = encoder(x)``, and one
head per task, ``L_t = loss_t(head_t(h))``. A step then runs

1. for each task, one backward pass through its head only, giving its feature
   gradient ``d_t = dL_t/dh`` and its head's gradient;
2. the T x T Gram matrix ``G[i, j] = <d_i, d_j>`` (summed over the feature
   tensors, the accumulated micro-batches and, under DDP, the ranks);
3. the aggregator's weights ``w = aggregate(G)`` (any Gram-based aggregator);
4. ONE backward pass of ``sum_t w_t d_t`` through the encoder, which by the
   chain rule writes ``J^T sum_t w_t d_t = sum_t w_t g_t`` into the encoder's
   ``.grad`` (``J = dh/dtheta``, ``g_t`` task t's exact encoder gradient);
5. each head gets its own task's gradient times ``aggregator.head_weight(T)``,
   as on the exact path.

What it guarantees (each asserted in ``tests/test_shared_batch.py``):

- The encoder's gradient is exactly ``sum_t w_t g_t`` with ``w`` the
  aggregator's weights for the feature Gram: for methods whose weights do not
  depend on the Gram (``Sum``, ``Mean``, ``Random``) it equals the exact path.
- Non-conflict with respect to the features: for ``UPGrad``, ``DualProj`` and
  ``MGDA`` the combined feature gradient ``d = sum_t w_t d_t`` satisfies
  ``<d, d_t> >= 0`` for every task, so a small step along ``-d`` in feature
  space does not increase any task's loss to first order.
- MGDA-UB's bound (Sener & Koltun 2018, Theorem 1): with ``MGDA`` the weights
  are the min-norm point of the feature gradients' convex hull, and the
  encoder gradient satisfies ``||sum_t w_t g_t|| <= ||J||_2 ||sum_t w_t d_t||``.
- Under DDP, the weights are those of the union batch (see ``reduce_gram``) and
  every parameter's gradient is the union batch's.

What it does not guarantee: non-conflict of the encoder's parameter gradients
(``<sum_t w_t g_t, g_s>`` can be negative: ``J^T`` does not preserve angles), and
the weights are in general not those the exact path would choose. The cost is
about one plain step whatever T is (T head passes, a ``[T, |h|]`` Gram product
and the T x T solve on top).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.profiler import record_function

from gradtools._feature_gradients import (
    FeatureBatch,
    FeatureStep,
    average_grads,
    checked_features,
    feature_gradients,
    feature_gram,
    feature_reach,
    reduce_gram,
)
from gradtools.multitask_stats import nonfinite_stats, step_stats

if TYPE_CHECKING:
    from gradtools.multitask import MultiTask, _StepState

__all__ = ["backward_with_features", "combine_features"]


def backward_with_features(
    opt: MultiTask,
    losses: list[Tensor],
    features: Tensor | Sequence[Tensor] | None,
    retain_graph: bool | None,
    combine: bool,
    from_tensor: bool,
) -> None:
    """One ``backward(losses, features=...)`` call (see the module docstring)."""
    name = type(opt).__name__
    state = opt._step_state
    if features is None:
        raise ValueError(
            f"{name}.backward(): an earlier backward() of this step passed features=; "
            "pass features= on every call of the step (or call zero_grad() first)"
        )
    feats = checked_features(features)
    if state is not None and state.features is None:
        raise ValueError(
            f"{name}.backward(features=...): an earlier backward() of this step ran without "
            "features=; use one kind per step (or call zero_grad() first)"
        )
    if opt.granularity != "all":
        raise ValueError(
            f"features= aggregates one Gram matrix of feature gradients; it needs "
            f"granularity='all', got {opt.granularity!r}"
        )
    if opt._explicit_shared is not None:
        raise ValueError(
            "features= decides what is shared by the graph (everything behind features is "
            "the encoder); do not combine it with shared_params"
        )
    params = opt._params()
    in_optimizer = set(params)
    with record_function(f"{name}.graph_analysis"):
        reach = feature_reach(losses, feats)
    for task, used in enumerate(reach.features):
        if not used:
            raise ValueError(
                f"losses[{task}] does not depend on features: every task's loss must be "
                "computed from the features passed (e.g. head(h) with h = encoder(x))"
            )
    unused = set(range(len(feats))) - {k for used in reach.features for k in used}
    if unused:
        k = min(unused)
        label = "features" if isinstance(features, Tensor) else f"features[{k}]"
        raise ValueError(f"{label} is not used by any loss")
    reach.direct = [leaves & in_optimizer for leaves in reach.direct]
    if not from_tensor:
        _check_heads_not_shared(reach.direct, params)

    if state is None:
        state = _start_feature_step(opt, len(losses), params)
    else:
        for p in params:
            p.grad = None  # the previous call's combination; rewritten below
    try:
        with record_function(f"{name}.feature_gradients"):
            grads, heads = feature_gradients(losses, feats, reach, retain_graph)
        if from_tensor:
            heads = [_nonzero(h) for h in heads]
            _check_heads_not_shared([set(h) for h in heads], params)
        _accumulate_heads(state, heads)
        with record_function(f"{name}.gram"):
            local = feature_gram(grads)
        # The aggregator decides rank and stationarity at the feature gradients' precision
        # (float32 or coarser: feature_gram's products are float32 unless they are float64).
        state.precision = max(state.precision, *(torch.finfo(g.dtype).eps for g in grads))
        assert state.features is not None
        step = state.features
        step.gram = local if step.gram is None else step.gram + local
        step.batches.append(FeatureBatch(feats, grads))
        step.free_graphs = retain_graph is False
    except BaseException:
        for p in params:
            p.grad = state.base_grads.get(p)
        opt._step_state = None
        raise
    state.pending_combine = True
    if combine:
        with record_function(f"{name}.aggregate"):
            combine_features(opt, state)


def _start_feature_step(opt: MultiTask, num_tasks: int, params: list[Tensor]) -> _StepState:
    from gradtools.multitask import _StepState

    base_grads: dict[Tensor, Tensor] = {}
    for p in params:
        if p.grad is not None:
            base_grads[p] = p.grad
            p.grad = None
    state = _StepState(
        num_tasks=num_tasks,
        task_grads=[{} for _ in range(num_tasks)],
        base_grads=base_grads,
        draw=opt._draw(num_tasks),
        buckets={},
        features=FeatureStep(),
    )
    opt._step_state = state
    return state


def _check_heads_not_shared(direct: list[set[Tensor]], params: list[Tensor]) -> None:
    owner: dict[Tensor, int] = {}
    index = {p: k for k, p in enumerate(params)}
    for task, leaves in enumerate(direct):
        for p in leaves:
            first = owner.setdefault(p, task)
            if first != task:
                raise ValueError(
                    f"parameter {index[p]} of the optimizer is used by losses[{first}] and "
                    f"losses[{task}] after the features (not through them): a parameter two "
                    "tasks share must be in the encoder that computes features"
                )


def _nonzero(grads: dict[Tensor, Tensor]) -> dict[Tensor, Tensor]:
    """The head gradients that are not exactly zero (a stacked loss tensor reaches every head)."""
    return {p: g for p, g in grads.items() if bool(g.count_nonzero())}


def _accumulate_heads(state: _StepState, heads: list[dict[Tensor, Tensor]]) -> None:
    for task, grads in enumerate(heads):
        running = state.task_grads[task]
        for p, g in grads.items():
            if p in running:
                running[p].add_(g)
            else:
                running[p] = g


def combine_features(opt: MultiTask, state: _StepState) -> None:
    """Weights from the step's feature Gram, one encoder pass per batch, heads, DDP, base grads."""
    step = state.features
    assert step is not None and step.gram is not None
    num_tasks = state.num_tasks
    params = opt._params()
    gram = step.gram
    if opt.process_group is not None:
        gram = reduce_gram(gram, opt.process_group)
    diag = gram.diagonal()
    nonfinite = tuple(t for t in range(num_tasks) if not bool(torch.isfinite(diag[t])))
    state.nonfinite_tasks = nonfinite
    head_weight = opt.aggregator.head_weight(num_tasks)
    num_features = len(step.batches[0].features)
    opt._stats = None
    if nonfinite:
        # No aggregation on inf/NaN: the plain combination keeps the non-finite values
        # where a GradScaler's inf check finds them.
        weights = torch.full((1, num_tasks), head_weight, dtype=torch.float64)
        opt._stats_source = lambda: nonfinite_stats(
            num_tasks, state.draw, num_features, nonfinite, opt.aggregator.name,
            projects=opt.aggregator.name == "pcgrad",
        )  # fmt: skip
    else:
        aggregation = opt._aggregate(state, gram.unsqueeze(0), [("all",)])
        weights = aggregation.weights
        blocks = gram.unsqueeze(0)
        opt._stats_source = lambda: step_stats(
            blocks, 0, aggregation.projected, weights, state.draw, num_features,
            opt.aggregator.name, squeeze=True,
        )  # fmt: skip
    for p in params:
        p.grad = None
    for batch in step.batches:
        combined = [_weighted_rows(weights[0], g) for g in batch.grads]
        torch.autograd.backward(batch.features, combined, retain_graph=not step.free_graphs)
    for grads in state.task_grads:
        for p, g in grads.items():
            if p.grad is None:
                p.grad = g if head_weight == 1.0 else g * head_weight
            else:  # also reached through the features (tied weights): add the head's part
                p.grad = p.grad + g * head_weight
    if opt.process_group is not None:
        average_grads(params, opt.process_group)
    for p, base in state.base_grads.items():
        p.grad = base if p.grad is None else p.grad + base
    state.pending_combine = False
    if opt.process_group is not None:
        state.synced = True


def _weighted_rows(weights: Tensor, grads: Tensor) -> Tensor:
    """``sum_t weights[t] * grads[t]`` in float32 or better, as ``grads.dtype``."""
    dtype = torch.float64 if grads.dtype == torch.float64 else torch.float32
    w = weights.to(device=grads.device, dtype=dtype)
    return torch.tensordot(w, grads.to(dtype), dims=1).to(grads.dtype)
