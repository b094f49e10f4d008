"""A multi-task optimizer wrapper, generic over the aggregation method.

``MultiTask`` wraps any ``torch.optim.Optimizer``. Its ``backward(losses)``
runs one backward pass per task, keeps each task's gradient, builds the T x T
Gram matrix of the task gradients over the parameters two or more tasks share,
asks an aggregator (:mod:`gradtools.aggregation`: PCGrad, Mean, ...) for the
task weights, and writes ``sum_t w_t g_t`` into ``.grad``; a parameter only one
task reaches (a head) gets that task's plain gradient times the aggregator's
``head_weight``. The wrapper only orchestrates; each job lives in its own module:

- :mod:`gradtools._graph_reach`: which parameters each loss reaches, which graphs to keep;
- :mod:`gradtools._task_gradients`: per-task storage, Gram blocks, weighted sums;
- :mod:`gradtools._collectives`: DDP averaging and the broadcast of random draws;
- :mod:`gradtools.multitask_stats`: what a step saw and did.

When does the combination run? At the end of ``backward()`` (unless
``combine=False``), so that ``.grad`` already holds the combined gradient when a
``torch.amp.GradScaler`` unscales and inf-checks it or when you clip it. Each
further ``backward()`` of the same step adds to the per-task gradients and runs
the aggregation again on the sums (a stateful aggregator's state advances once
per step, from the final sums); ``step()`` runs it if a ``combine=False`` call
left it pending.
"""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.profiler import record_function
from torch.optim import Optimizer

from gradtools import aggregation as agg
from gradtools._collectives import (
    average_task_gradients,
    broadcast_from_first_rank,
    reached_on_any_rank,
)
from gradtools._feature_gradients import FeatureStep
from gradtools._graph_reach import analyse_graphs, nonzero_gradients
from gradtools._multitask_checks import (
    check_settings,
    checked_aggregator,
    checked_losses,
    checked_shared_params,
)
from gradtools._shared_batch import backward_with_features, combine_features
from gradtools._task_gradients import (
    Bucket,
    GramItem,
    gradient_precision,
    gram_blocks,
    weighted_sum,
    weighted_sum_float64,
    weights_are_safe,
)
from gradtools.multitask_stats import MultiTaskStats, nonfinite_stats, step_stats
from gradtools.tensor_groups import group_by_device_dtype

__all__ = ["Granularity", "MultiTask", "PlainBackward"]

Granularity = Literal["all", "group", "tensor"]
PlainBackward = Literal["warn", "error", "ignore"]


@dataclass
class _StepState:
    """Everything one optimizer step accumulates between ``zero_grad()`` and ``step()``."""

    num_tasks: int
    task_grads: list[dict[Tensor, Tensor]]  # task -> param -> running gradient sum
    base_grads: dict[Tensor, Tensor]  # .grad found at the start of the step
    draw: Tensor | None  # the aggregator's random draw for this step
    buckets: dict[Tensor, Bucket]  # bucketed shared parameter -> its bucket
    pending_combine: bool = False
    nonfinite_tasks: tuple[int, ...] = ()
    synced: bool = False  # per-task gradients already averaged across ranks
    # The aggregator's state before this step's first aggregation, restored
    # before each later one so that accumulation advances it once per step.
    aggregator_state: dict[str, Any] | None = None
    unique_buckets: list[Bucket] = field(default_factory=list)
    # Set when the step's backward() calls pass features= (representation level).
    features: FeatureStep | None = None
    # Relative accuracy of the shared gradients (their coarsest dtype's epsilon).
    precision: float = 2.0**-52


class MultiTask(Optimizer):
    """Multi-task gradient aggregation around an inner optimizer.

    Args:
        optimizer: the inner optimizer that applies the combined gradient. Its
            ``param_groups`` and ``state`` are this wrapper's, so LR schedulers,
            ``GradScaler`` and checkpoints work on the wrapper.
        aggregator: how the task gradients are combined: an instance from
            :mod:`gradtools.aggregation` (``agg.PCGrad()``, ``agg.Mean()``, ...) or
            its registry name (``"pcgrad"``, see ``gradtools.aggregation.available()``).
            Its state (if any) is part of ``state_dict()``.
        granularity: ``"all"`` aggregates over the whole shared vector (one Gram
            matrix); ``"group"`` over each param group's shared parameters
            separately; ``"tensor"`` over each shared parameter tensor separately.
        generator: the source of the aggregator's per-step random draw (PCGrad's
            visiting orders, Random's weights); seed it for reproducible runs.
            ``None`` creates a private CPU generator seeded from torch's global RNG
            (so ``torch.manual_seed`` before construction also fixes it). Its
            state is part of ``state_dict()``.
        shared_params: parameters to aggregate over. ``None`` (default) detects
            them: a parameter is shared when the graphs of two or more tasks reach
            it (for a graph with a custom or ``torch.compile``'d autograd Function,
            whose backward may write zeros into parameters the loss does not use,
            a task whose gradient of a parameter is exactly zero does not count as
            reaching it; pass ``shared_params`` to say it explicitly). Given
            explicitly, the others get the plain sum of whatever tasks reached them
            (times ``head_weight``).
        process_group: for data-parallel training. When given, the per-task gradients
            are averaged over the group's ranks before the aggregation, so it runs on
            the global task gradients (not an average of per-rank aggregations), and
            the random draw is broadcast from the group's first rank; every rank
            then runs the same deterministic aggregation, so a stateful aggregator
            stays identical everywhere. All tasks' gradients travel in one
            all-reduce per step (plus two or three tiny messages), whatever the
            number of tasks. Do not let DistributedDataParallel reduce gradients
            too: run the forward passes and ``backward()`` under
            ``ddp_model.no_sync()``, or do not wrap the model (outside ``no_sync``
            DDP's hooks fire in every task's backward pass and it raises "marked as
            ready twice", or with ``find_unused_parameters`` silently reduces only
            the first task's gradient).
        gradient_buckets: keep the per-task gradients of the shared parameters side
            by side in one tensor per device and dtype (like DDP's buckets), so the
            Gram matrix and the combination take a handful of kernel launches
            instead of several per parameter. ``None`` (default): on when the
            parameters live on a CUDA device. Only with ``granularity="all"``.
        plain_backward: what ``step()`` does when ``.grad`` holds gradients but
            ``backward(losses)`` was not called this step (e.g. after
            ``sum(losses).backward()``, as Lightning's automatic optimization does):
            such a step is a plain step with no aggregation. ``"warn"`` (default)
            warns once per wrapper, ``"error"`` raises ``RuntimeError``, ``"ignore"``
            takes the plain step silently.

    Closures: ``step(closure)`` hands the closure to the inner optimizer (LBFGS
    needs one and calls it several times). The closure must compute the task
    losses, call ``opt.zero_grad()`` and ``opt.backward(losses)`` (not
    ``loss.backward()``), and return a scalar loss for the inner optimizer, e.g.
    ``sum(losses).detach()``.
    """

    _step_state: _StepState | None  # None between steps

    def __init__(
        self,
        optimizer: Optimizer,
        aggregator: agg.Aggregator | str,
        *,
        granularity: Granularity = "all",
        generator: torch.Generator | None = None,
        shared_params: Iterable[Tensor] | None = None,
        process_group: dist.ProcessGroup | None = None,
        gradient_buckets: bool | None = None,
        plain_backward: PlainBackward = "warn",
    ) -> None:
        if isinstance(optimizer, MultiTask):
            raise TypeError(
                f"optimizer is already a {type(optimizer).__name__}; wrap the inner optimizer once"
            )
        check_settings(
            optimizer, granularity, generator, process_group, gradient_buckets, plain_backward
        )
        self.aggregator = checked_aggregator(aggregator)
        # Deliberately not Optimizer.__init__: it would build param_groups of its
        # own, while ours must be the inner optimizer's (see the properties below).
        # These are the attributes Optimizer's hook and profiling machinery uses.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

        self.optimizer = optimizer
        self.granularity: Granularity = granularity
        self.process_group = process_group
        self.gradient_buckets = gradient_buckets
        self.plain_backward: PlainBackward = plain_backward
        self._warned_plain_backward = False
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.randint(0, 2**62, ()).item()))
        self.generator = generator
        self._explicit_shared = checked_shared_params(shared_params, self._params())
        self._stats: MultiTaskStats | None = None
        # The statistics are built on first access, from small CPU tensors kept
        # here: most steps nobody reads them, and on a GPU every host-side
        # millisecond after the step's one sync leaves the device idle.
        self._stats_source: Callable[[], MultiTaskStats] | None = None
        self._step_state = None

    # ------------------------------------------------------------------ optimizer face

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizer's param groups (the same list, so schedulers act on it)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        """The inner optimizer's per-parameter state."""
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        """The inner optimizer's defaults."""
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def stats(self) -> MultiTaskStats | None:
        """Statistics of the last aggregation, or ``None`` before the first one."""
        if self._stats is None and self._stats_source is not None:
            self._stats = self._stats_source()
        return self._stats

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"{type(self).__name__}({self._describe()}, granularity={self.granularity!r},\n"
            f"{inner}\n)"
        )

    def _describe(self) -> str:
        return f"aggregator={self.aggregator!r}"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer (and so to this wrapper)."""
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget this step's per-task gradients and reset ``.grad`` like the inner optimizer."""
        self._step_state = None
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # The key of this wrapper's own entry in state_dict(); PCGrad keeps "pcgrad".
    _STATE_KEY = "multitask"

    def _wrapper_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "generator_state": self.generator.get_state(),
            "aggregator": self.aggregator.name,
            "granularity": self.granularity,
        }
        aggregator_state = self.aggregator.state_dict()
        if aggregator_state:
            state["aggregator_state"] = aggregator_state
        return state

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus this wrapper's entry (generator and
        aggregator state) under ``"multitask"`` (``"pcgrad"`` for :class:`PCGrad`)."""
        state = dict(self.optimizer.state_dict())
        state[self._STATE_KEY] = self._wrapper_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain one of the inner optimizer).

        Raises:
            ValueError: if the saved aggregator is not this wrapper's (nothing is loaded).
        """
        state = dict(state_dict)
        ours = None
        for key in ("multitask", "pcgrad"):
            entry = state.pop(key, None)
            if entry is not None:
                ours = entry
        if ours is not None:
            saved = ours.get("aggregator", "pcgrad")  # PCGrad's entry predates the name
            if saved != self.aggregator.name:
                raise ValueError(
                    f"state_dict was saved with aggregator {saved!r} but this wrapper uses "
                    f"{self.aggregator.name!r}"
                )
        self.optimizer.load_state_dict(state)
        if ours is not None:
            self.generator.set_state(ours["generator_state"])
            self.aggregator.load_state_dict(ours.get("aggregator_state", {}))

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply the combined gradient with the inner optimizer.

        Runs the aggregation first if a ``backward(..., combine=False)`` left it
        pending. With a ``closure`` (see the class docstring), the inner optimizer
        calls it, and each call's ``backward(losses)`` is combined before the inner
        optimizer reads ``.grad``.

        Raises:
            FloatingPointError: if a task gradient of this step is not finite (with a
                ``GradScaler``, ``scaler.step`` skips this call instead).
            TypeError: on a closure that is not callable, or none for an optimizer
                that needs one (LBFGS).
            RuntimeError: with ``plain_backward="error"``, if ``backward(losses)``
                was not called this step but ``.grad`` holds gradients.
        """
        if closure is None:
            if isinstance(self.optimizer, torch.optim.LBFGS):
                raise TypeError(
                    "closure: LBFGS re-evaluates the losses during its step; pass "
                    "step(closure) with a closure that calls opt.zero_grad() and "
                    "opt.backward(losses) and returns the loss"
                )
            # The caller, Optimizer's step-hook wrapper, step(), this call, the check.
            self._finish_gradients(warn_stacklevel=5)
            return self.optimizer.step()
        if not callable(closure):
            raise TypeError(f"closure must be callable or None, got {type(closure).__name__}")

        def evaluate() -> Any:
            with torch.enable_grad():
                loss = closure()
            self._finish_gradients()
            return loss

        return self.optimizer.step(evaluate)

    def _finish_gradients(self, warn_stacklevel: int = 3) -> None:
        """Make ``.grad`` final before the inner optimizer reads it, and free the per-task sums."""
        state = self._step_state
        if state is None:
            self._check_plain_backward(warn_stacklevel)
            return
        if state.pending_combine:
            self._combine(state)
        if state.nonfinite_tasks:
            raise FloatingPointError(
                f"{type(self).__name__}: the gradient of "
                + ", ".join(f"task {t} (losses[{t}])" for t in state.nonfinite_tasks)
                + " holds inf or NaN; the step was not taken. Use torch.amp.GradScaler "
                "to skip such steps automatically, or call zero_grad() and continue."
            )
        # The step's per-task gradients are no longer needed once .grad is final;
        # freeing them first keeps the inner step's peak memory that of a plain step.
        self._step_state = None

    def _check_plain_backward(self, stacklevel: int) -> None:
        if self.plain_backward == "ignore":
            return
        if not any(p.grad is not None for p in self._params()):
            return
        message = (
            f"{type(self).__name__}.step(): .grad holds gradients but backward(losses) was not "
            "called since the last step or zero_grad(), so this is a plain step with no "
            "aggregation (did you call loss.backward() on a summed loss?). Call "
            "opt.backward([loss_a, loss_b, ...]) instead, or pass plain_backward='ignore' "
            "if this is intended."
        )
        if self.plain_backward == "error":
            raise RuntimeError(message)
        if not self._warned_plain_backward:
            self._warned_plain_backward = True
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)

    # ------------------------------------------------------------------ backward

    def backward(
        self,
        losses: Sequence[Tensor] | Tensor,
        *,
        features: Tensor | Sequence[Tensor] | None = None,
        retain_graph: bool | None = None,
        combine: bool = True,
    ) -> None:
        """Backpropagate one scalar loss per task and (by default) combine them into ``.grad``.

        Call it several times before :meth:`step` to accumulate: the per-task
        gradients add up and the aggregation runs on the sums (``.grad`` is rewritten
        from them by each call, so edit ``.grad``, e.g. clip it, only after the last).

        Args:
            losses: one scalar loss per task, the same number on every call of a step:
                a sequence of scalars, or a 1-D tensor of T losses (as torchjd takes;
                ``torch.stack(losses)``). A tensor's elements share the graph of the
                stack, so each task's backward pass also sends exact zeros through the
                other tasks' heads; a parameter whose gradient from a task is exactly
                zero does not count as reached by that task.
            features: the tensor (or tensors) of shared features that every task's
                loss is computed from, e.g. ``h = encoder(x)`` on one batch. The
                aggregation then runs at the representation level: one backward pass
                per task through its head only (its gradient ``d_t`` w.r.t. ``h``), the
                T x T Gram of the ``d_t`` (summed over the feature tensors, the calls of
                an accumulated step and, with ``process_group``, the ranks: only that
                T x T matrix travels), the aggregator's weights ``w``, and ONE backward
                pass of ``sum_t w_t d_t`` through the encoder, which writes
                ``sum_t w_t g_t`` (``g_t`` task t's exact encoder gradient) into
                ``.grad``; heads get ``head_weight`` times their own task's gradient.
                About one plain step's cost whatever T is. Guaranteed: for UPGrad,
                DualProj and MGDA, ``<sum_t w_t d_t, d_s> >= 0`` for every task s
                (non-conflict w.r.t. the features); with MGDA (then MGDA-UB, Sener &
                Koltun 2018) ``w`` is the min-norm point of the ``d_t``'s hull and
                ``||sum_t w_t g_t|| <= ||dh/dtheta||_2 ||sum_t w_t d_t||``; for Gram-free
                weights (Sum, Mean) the result equals the exact path. Not guaranteed:
                non-conflict of the encoder's parameter gradients (``J^T`` does not
                preserve angles), nor the weights the exact path would choose. Each
                ``backward()`` of the step keeps its encoder graph until ``step()`` or
                ``zero_grad()`` (the combination reruns every call's encoder pass with
                the step's final weights): accumulate with ``combine=False`` on all but
                the last call. Needs ``granularity="all"`` and no ``shared_params``;
                ``stats.num_shared`` counts the feature tensors.
            retain_graph: ``None`` (default) frees every graph as soon as no later
                loss needs it (graphs shared between tasks are kept until the last
                task that uses them). ``True`` keeps all graphs; ``False`` frees each
                loss's graph right after its own backward pass, which is only valid
                when the losses share no part of their graphs.
            combine: ``False`` only accumulates the per-task gradients (``.grad`` is
                left untouched until a later ``backward()`` or ``step()``); useful for
                all but the last of several accumulated micro-batches.

        Raises:
            ValueError / TypeError: on an empty list, a non-tensor or non-scalar
                loss, a loss that does not require grad or reaches no parameter of
                the optimizer, losses on different devices, or a number of losses
                that differs from the previous ``backward()`` of this step; with
                ``features``: a feature that does not require grad or that no loss
                uses, a loss that does not depend on the features, a parameter two
                tasks use after the features, or a step that mixes calls with and
                without ``features``. Nothing has been backpropagated when these are
                raised.
        """
        from_tensor = isinstance(losses, Tensor)
        losses = checked_losses(losses)
        state = self._step_state
        if state is not None and len(losses) != state.num_tasks:
            raise ValueError(
                f"got {len(losses)} losses but the previous backward() of this step had "
                f"{state.num_tasks}; call zero_grad() to start a new step"
            )
        if state is not None and state.synced:
            raise RuntimeError(
                f"{type(self).__name__}.backward(): this step's task gradients were already "
                "averaged across ranks; with a process_group, pass combine=False for all but "
                "the last micro-batch, or call step()/zero_grad() first"
            )
        if features is not None or (state is not None and state.features is not None):
            backward_with_features(self, losses, features, retain_graph, combine, from_tensor)
            return
        name = type(self).__name__
        params = self._params()
        with record_function(f"{name}.graph_analysis"):
            graphs = analyse_graphs(losses)
        in_optimizer = set(params)
        for task, leaves in enumerate(graphs.leaves):
            if not leaves & in_optimizer:
                raise ValueError(
                    f"losses[{task}] reaches no parameter of the optimizer (task {task}); "
                    "check that its graph uses the model's parameters"
                )
        retain = graphs.needed_later if retain_graph is None else [retain_graph] * len(losses)
        # Where a graph is opaque (custom or compiled autograd Function), "reached"
        # may include parameters that get zeros only: check the gradients instead.
        # A 1-D tensor of losses sends exact zeros through every other task's graph.
        check_zeros = [(o or from_tensor) and self._explicit_shared is None for o in graphs.opaque]

        if state is None:
            state = self._start_step(losses, params, graphs.leaves, any(check_zeros))
        else:
            # .grad holds the combination of the previous call; recomputed below.
            for p in params:
                p.grad = None
        try:
            for task, loss in enumerate(losses):
                with record_function(f"{name}.backward_task{task}"):
                    self._backward_one(
                        state, task, loss, params, graphs.leaves[task], retain[task],
                        check_zeros[task],
                    )  # fmt: skip
        except BaseException:
            # The per-task sums are now partial: drop them rather than step on them.
            for p in params:
                p.grad = state.base_grads.get(p)
            self._step_state = None
            raise
        state.pending_combine = True
        if combine:
            with record_function(f"{name}.aggregate"):
                self._combine(state)

    def _start_step(
        self,
        losses: list[Tensor],
        params: list[Tensor],
        reached: list[set[Tensor]],
        opaque: bool,
    ) -> _StepState:
        """Set up the per-task storage for a new step."""
        num_tasks = len(losses)
        # Gradients already in .grad (none after zero_grad()) are kept aside and
        # added to the combined gradient unchanged.
        base_grads: dict[Tensor, Tensor] = {}
        for p in params:
            if p.grad is not None:
                base_grads[p] = p.grad
                p.grad = None
        buckets: dict[Tensor, Bucket] = {}
        # Buckets are planned from graph reach, which an opaque graph overstates.
        if self._bucket_mode(params) and num_tasks > 1 and not opaque:
            if self.process_group is not None:
                # Every rank must lay out its buckets alike (the Gram matrix is summed
                # in bucket order), so plan them from what any rank's tasks reach.
                reached = reached_on_any_rank(params, reached, self.process_group)
            buckets = Bucket.for_shared(params, reached, self._explicit_shared)
        state = _StepState(
            num_tasks=num_tasks,
            task_grads=[{} for _ in losses],
            base_grads=base_grads,
            draw=self._draw(num_tasks),
            buckets=buckets,
            unique_buckets=list({id(b): b for b in buckets.values()}.values()),
        )
        self._step_state = state
        return state

    def _draw(self, num_tasks: int) -> Tensor | None:
        draw = self.aggregator.draw(num_tasks, self.generator)
        if draw is not None and self.process_group is not None:
            # Every rank must aggregate alike: take the first rank's draw.
            draw = broadcast_from_first_rank(draw, self.process_group)
        return draw

    def _bucket_mode(self, params: list[Tensor]) -> bool:
        if self.granularity != "all":
            return False  # per-tensor/per-group Gram matrices need per-tensor storage
        if self.gradient_buckets is not None:
            return self.gradient_buckets
        return any(p.device.type == "cuda" for p in params)

    def _backward_one(
        self,
        state: _StepState,
        task: int,
        loss: Tensor,
        params: list[Tensor],
        reached: set[Tensor],
        retain: bool,
        check_zeros: bool,
    ) -> None:
        grads = state.task_grads[task]
        # Hand autograd this task's running sums (or, for bucketed parameters, its
        # row of the bucket) so that it accumulates in place. Elsewhere, on the
        # first call, autograd's fresh gradient tensor is taken as is (no copy).
        for p, bucket in state.buckets.items():
            if p in reached and p not in grads:
                grads[p] = bucket.view(task, p)
        for p, accumulator in grads.items():
            p.grad = accumulator
        loss.backward(retain_graph=retain)
        fresh: list[tuple[Tensor, Tensor]] = []
        for p in params:
            g = p.grad
            if g is None:
                continue
            p.grad = None
            if g.is_sparse:
                raise TypeError(
                    f"losses[{task}] produced a sparse gradient; {type(self).__name__} needs "
                    "dense gradients (use nn.Embedding(sparse=False))"
                )
            running = grads.get(p)
            if running is not None and g is not running:
                # Autograd replaced the tensor instead of adding in place (it does so
                # only in unusual cases); keep our storage the one that holds the sum.
                running.copy_(g)
            elif running is None:
                fresh.append((p, g))
        if check_zeros:
            fresh = nonzero_gradients(fresh)
        for p, g in fresh:
            grads[p] = g

    # ------------------------------------------------------------------ aggregation

    def _combine(self, state: _StepState) -> None:
        """Aggregate the accumulated per-task gradients and write ``.grad``."""
        if state.features is not None:
            combine_features(self, state)
            return
        num_tasks = state.num_tasks
        name = type(self).__name__
        params = self._params()
        if self.process_group is not None:
            average_task_gradients(state.task_grads, params, state.buckets, self.process_group)
        shared, specific = self._split_shared(state, params)
        buckets = state.unique_buckets
        loose_shared = [p for p in shared if p not in state.buckets]
        # Gram blocks: one per bucket, then one per remaining tensor.
        items = [b.gram_item() for b in buckets] + [
            _gram_item(state, p) for p in loose_shared + specific
        ]
        with record_function(f"{name}.gram"):
            gram = gram_blocks(items, num_tasks)
        blocks = gram.blocks
        num_shared_items = len(buckets) + len(loose_shared)
        shared_blocks = blocks[:num_shared_items]
        # The blocks are exact products of the stored gradients (float64), but the
        # gradients are only as exact as their dtype: the aggregators' rank and
        # stationarity decisions follow this.
        state.precision = gradient_precision(items[:num_shared_items])

        diag = blocks.diagonal(dim1=-2, dim2=-1)
        nonfinite = tuple(t for t in range(num_tasks) if not bool(torch.isfinite(diag[:, t]).all()))
        state.nonfinite_tasks = nonfinite
        head_weight = self.aggregator.head_weight(num_tasks)
        self._stats = None
        if nonfinite:
            # No aggregation on inf/NaN: write the plain combination, which keeps the
            # non-finite values where a GradScaler's inf check will find them.
            weights = torch.full((1, num_tasks), head_weight, dtype=torch.float64)
            block_of: dict[Tensor, int] = dict.fromkeys(shared, 0)
            self._stats_source = partial(
                nonfinite_stats,
                num_tasks,
                state.draw,
                len(shared),
                nonfinite,
                self.aggregator.name,
                projects=isinstance(self.aggregator, agg.PCGrad),
            )
        else:
            with record_function(f"{name}.weights"):
                grouped, block_of = self._group_blocks(loose_shared, shared_blocks)
                aggregation = self._aggregate(state, grouped, self._block_keys(block_of))
                weights = aggregation.weights
                self._stats_source = partial(
                    step_stats,
                    shared_blocks,
                    gram.log2_unit,
                    aggregation.projected,
                    weights,
                    state.draw,
                    len(shared),
                    self.aggregator.name,
                    squeeze=self.granularity == "all",
                    undefined=aggregation.undefined,
                )

        weights_host: list[list[float]] = weights.tolist()
        with record_function(f"{name}.weighted_sum"):
            combined: list[tuple[Tensor, Tensor, bool]] = []
            for bucket in buckets:
                combined += bucket.combine(weights_host[0])
            combined += _combined_grads(
                state, loose_shared, block_of, weights_host, head_weight, specific
            )
            for p, g, fresh in combined:
                base = state.base_grads.get(p)
                if base is not None:
                    # Never add into a task's own running sum: it may accumulate again.
                    g = g.add_(base) if fresh else g + base
                p.grad = g
            for p, base in state.base_grads.items():
                if p.grad is None:
                    p.grad = base
        state.pending_combine = False
        if self.process_group is not None:
            state.synced = True

    def _aggregate(
        self, state: _StepState, grouped: Tensor, block_keys: list[tuple[object, ...]]
    ) -> agg.Aggregation:
        """The aggregator's weights, its state advanced once per step however often this runs."""
        if state.aggregator_state is None:
            state.aggregator_state = copy.deepcopy(self.aggregator.state_dict())
        elif state.aggregator_state:
            self.aggregator.load_state_dict(copy.deepcopy(state.aggregator_state))
        # An aggregator written before a keyword existed simply does not get it.
        return agg.aggregate_with(self.aggregator, grouped, state.draw,
                                  precision=state.precision, block_keys=block_keys)

    def _block_keys(self, block_of: dict[Tensor, int]) -> list[tuple[object, ...]]:
        """What each aggregated block is, for stateful aggregators: ``("tensor", i)`` (i the
        parameter's position in ``param_groups``, as torch optimizers key their
        ``state_dict``), ``("group", k)`` or ``("all",)``; stable when a tensor is
        reached on some steps only."""
        if self.granularity == "all" or not block_of:
            return [("all",)]
        if self.granularity == "tensor":
            position = {p: i for i, p in enumerate(self._params())}
            keys: dict[int, tuple[object, ...]] = {
                b: ("tensor", position[p]) for p, b in block_of.items()
            }
        else:
            group_of = {p: k for k, g in enumerate(self.param_groups) for p in g["params"]}
            keys = {b: ("group", group_of[p]) for p, b in block_of.items()}
        return [keys[b] for b in range(len(keys))]

    def _split_shared(
        self, state: _StepState, params: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Shared parameters (aggregated over) and the others that some task reached."""
        reached_by: dict[Tensor, int] = {}
        for grads in state.task_grads:
            for p in grads:
                reached_by[p] = reached_by.get(p, 0) + 1
        shared: list[Tensor] = []
        specific: list[Tensor] = []
        for p in params:
            count = reached_by.get(p, 0)
            if count == 0:
                continue
            if self._explicit_shared is not None:
                is_shared = id(p) in self._explicit_shared
            else:
                is_shared = count >= 2 or p in state.buckets
            (shared if is_shared else specific).append(p)
        return shared, specific

    def _group_blocks(
        self, loose_shared: list[Tensor], blocks: Tensor
    ) -> tuple[Tensor, dict[Tensor, int]]:
        """Sum the shared Gram blocks into the blocks the aggregator runs on.

        ``blocks`` holds one block per bucket followed by one per tensor of
        ``loose_shared`` (buckets only exist with granularity ``"all"``). Returns
        the ``[B, T, T]`` Gram matrices and the block index of each loose tensor.
        """
        num_tasks = blocks.shape[-1]
        if self.granularity == "tensor" and loose_shared:
            return blocks, {p: k for k, p in enumerate(loose_shared)}
        if self.granularity == "group" and loose_shared:
            group_of = {}
            for index, group in enumerate(self.param_groups):
                for p in group["params"]:
                    group_of[p] = index
            used = sorted({group_of[p] for p in loose_shared})
            position = {g: i for i, g in enumerate(used)}
            block_of = {p: position[group_of[p]] for p in loose_shared}
            grouped = torch.zeros(len(used), num_tasks, num_tasks, dtype=torch.float64)
            rows = torch.tensor([block_of[p] for p in loose_shared], dtype=torch.int64)
            grouped.index_add_(0, rows, blocks)
            return grouped, block_of
        return blocks.sum(0, keepdim=True), dict.fromkeys(loose_shared, 0)

    # ------------------------------------------------------------------ helpers

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]


def _gram_item(state: _StepState, p: Tensor) -> GramItem:
    vectors = [(t, grads[p].reshape(-1)) for t, grads in enumerate(state.task_grads) if p in grads]
    return GramItem(vectors, p.numel())


def _combined_grads(
    state: _StepState,
    shared: list[Tensor],
    block_of: dict[Tensor, int],
    weights: list[list[float]],
    head_weight: float,
    specific: list[Tensor],
) -> list[tuple[Tensor, Tensor, bool]]:
    """``(param, combined gradient, is_fresh_tensor)`` for the tensors stored one by one."""
    task_grads = state.task_grads
    out: list[tuple[Tensor, Tensor, bool]] = []
    # Shared: one weighted sum per parameter, batched with _foreach over the
    # parameters that have the same tasks, block, device and dtype.
    batches: dict[tuple[tuple[int, ...], int], list[Tensor]] = {}
    for p in shared:
        block = block_of[p]
        tasks = tuple(t for t, grads in enumerate(task_grads) if p in grads)
        w = [weights[block][t] for t in tasks]
        if not weights_are_safe(w):
            grads = [task_grads[t][p] for t in tasks]
            out.append((p, weighted_sum_float64(grads, w, p.dtype), True))
            continue
        batches.setdefault((tasks, block), []).append(p)
    for (tasks, block), same_tasks in batches.items():
        w = [weights[block][t] for t in tasks]
        for (_, dtype), ps in group_by_device_dtype(same_tasks).items():
            lists = [[task_grads[t][p] for p in ps] for t in tasks]
            for p, g in zip(ps, weighted_sum(lists, w, dtype), strict=True):
                out.append((p, g, True))

    # Task-specific: the plain sum of the tasks that reached it, times head_weight.
    for p in specific:
        grads = [g[p] for g in task_grads if p in g]
        if len(grads) == 1 and head_weight == 1.0:
            out.append((p, grads[0], False))  # the task's own gradient, no copy
        else:
            summed = weighted_sum([[g] for g in grads], [head_weight] * len(grads), p.dtype)[0]
            out.append((p, summed, True))
    return out
