"""PCGrad as a wrapper around any ``torch.optim.Optimizer``.

This module is the autograd plumbing: it walks the losses' graphs (to free each
one as early as possible and to know which parameters each task reaches), runs
one backward pass per task, keeps each task's gradient (taking the fresh
``.grad`` tensors autograd produces, or, on a GPU, slices of one flat row per
task: never a copy of the model), builds the T x T Gram matrix of the task
gradients from small per-parameter or per-row blocks with one transfer to the
host, asks :mod:`gradtools.aggregation` for the task weights, and writes
``sum_j w_j g_j`` into ``.grad``. It knows nothing about projection formulas.

Usage::

    opt = PCGrad(torch.optim.AdamW(model.parameters(), lr=2e-5))
    opt.zero_grad()
    opt.backward([loss_a, loss_b, loss_c])   # call again to accumulate
    opt.step()
    opt.stats                                # cosines, conflicts, weights, ...

When does the surgery run? At the end of ``backward()`` (unless
``combine=False``), so that ``.grad`` already holds the combined gradient when a
``torch.amp.GradScaler`` unscales and inf-checks it or when you clip it. Each
further ``backward()`` of the same step adds to the per-task gradients and runs
the surgery again on the sums; ``step()`` runs it if a ``combine=False`` call
left it pending.
"""

from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _unflatten_dense_tensors
from torch.autograd.profiler import record_function
from torch.optim import Optimizer

from gradtools.aggregation import (
    Reduction,
    cosine_similarity,
    draw_orders,
    magnitude_similarity,
    pcgrad,
)

__all__ = ["Granularity", "PCGrad", "PCGradStats"]

Granularity = Literal["all", "group", "tensor"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
# Task weights outside this range could overflow or underflow when multiplied
# into a float32 gradient; those (rare) parameters are combined in float64.
_SAFE_WEIGHT = 2.0**60


@dataclass(frozen=True)
class PCGradStats:
    """What the last surgery saw and did, for logging or plotting (CPU tensors).

    The geometry is measured on the shared parameters (those the surgery runs on).

    Attributes:
        cosine: ``[T, T]`` pairwise cosine similarity of the original task gradients.
        magnitude_similarity: ``[T, T]`` Phi(g_i, g_j) = 2|g_i||g_j| / (|g_i|^2 + |g_j|^2).
        conflicts: ``[T, T]`` bool, True where two different tasks' gradients conflict
            (negative dot product).
        projected: ``[..., T, T]`` bool, True where task i was projected onto task j
            (one ``[T, T]`` per block: the whole shared vector, a group, or a tensor).
        weights: ``[..., T]`` per-task weights applied to the shared parameters, one
            row per block; the reduction (``"mean"`` divides by T) is included.
        grad_norms: ``[T]`` norm of each task's gradient on the shared parameters.
        orders: ``[T, T-1]`` the order in which each task visited the others.
        num_shared: number of shared parameter tensors.
        nonfinite_tasks: indices of tasks whose gradient holds inf or NaN; when not
            empty, no surgery ran (``.grad`` holds the plain combination so that a
            GradScaler skips the step) and the other fields are NaN.
    """

    cosine: Tensor
    magnitude_similarity: Tensor
    conflicts: Tensor
    projected: Tensor
    weights: Tensor
    grad_norms: Tensor
    orders: Tensor
    num_shared: int
    nonfinite_tasks: tuple[int, ...]


class PCGrad(Optimizer):
    """Projecting Conflicting Gradients (Yu et al. 2020) around an inner optimizer.

    For each task i, the other tasks j != i are visited in a fresh random order;
    whenever the current g_i^PC has a negative dot product with the *original*
    g_j, its component along g_j is removed. The update is the sum (or mean) of the
    g_i^PC on the parameters that two or more tasks share; a parameter only one task
    reaches (a task head) gets that task's plain gradient, under the same reduction.

    Args:
        optimizer: the inner optimizer that applies the combined gradient. Its
            ``param_groups`` and ``state`` are this wrapper's, so LR schedulers,
            ``GradScaler`` and checkpoints work on the wrapper.
        reduction: ``"sum"`` (the paper) or ``"mean"`` of the task gradients, for
            shared and task-specific parameters alike.
        generator: draws the per-task visiting orders; seed it for reproducible
            runs. ``None`` creates a private generator seeded from torch's global RNG
            (so ``torch.manual_seed`` before construction also fixes it). Its state
            is part of ``state_dict()``.
        shared_params: parameters to project over. ``None`` (default) detects them:
            a parameter is shared when the graphs of two or more tasks reach it.
            Given explicitly, the others get the plain (reduced) sum of whatever
            tasks reached them.
        granularity: ``"all"`` projects over the whole shared vector (the paper);
            ``"group"`` over each param group's shared parameters separately;
            ``"tensor"`` over each shared parameter tensor separately.
        process_group: for data-parallel training. When given, the per-task gradients
            are averaged over the group's ranks before the surgery, so it runs on the
            global task gradients (not an average of per-rank surgeries), and the
            visiting orders are broadcast from the group's first rank. All tasks'
            gradients travel in one all-reduce per step (plus two or three tiny
            integer messages), whatever the number of tasks. Do not let
            DistributedDataParallel reduce gradients too: run the forward passes and
            ``backward()`` under ``ddp_model.no_sync()``, or do not wrap the model
            (outside ``no_sync`` DDP's hooks fire in every task's backward pass and
            it raises "marked as ready twice", or with ``find_unused_parameters``
            silently reduces only the first task's gradient).
        gradient_buckets: keep the per-task gradients of the shared parameters side
            by side in one tensor per device and dtype (like DDP's buckets), so the
            Gram matrix and the combination take a handful of kernel launches
            instead of several per parameter. ``None`` (default): on when the
            parameters live on a CUDA device. Only with ``granularity="all"``.
    """

    # Per-step accumulation state (reset by zero_grad() and step()).
    _task_grads: list[dict[Tensor, Tensor]]  # task -> param -> running gradient sum
    _base_grads: dict[Tensor, Tensor]  # .grad found at the start of the step
    _num_tasks: int | None  # None between steps
    _orders: Tensor  # [T, T-1] visiting orders drawn for this step
    _pending_combine: bool
    _nonfinite_tasks: tuple[int, ...]
    _synced: bool  # per-task gradients already averaged across ranks
    _buckets: dict[Tensor, _Bucket]  # bucketed shared parameter -> its bucket

    def __init__(
        self,
        optimizer: Optimizer,
        reduction: Reduction = "sum",
        generator: torch.Generator | None = None,
        *,
        shared_params: Iterable[Tensor] | None = None,
        granularity: Granularity = "all",
        process_group: dist.ProcessGroup | None = None,
        gradient_buckets: bool | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, PCGrad):
            raise TypeError("optimizer is already a PCGrad; wrap the inner optimizer once")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        if granularity not in ("all", "group", "tensor"):
            raise ValueError(f"granularity must be 'all', 'group' or 'tensor', got {granularity!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
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
        self.reduction: Reduction = reduction
        self.granularity: Granularity = granularity
        self.process_group = process_group
        self.gradient_buckets = gradient_buckets
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.randint(0, 2**62, ()).item()))
        self.generator = generator
        self._explicit_shared: set[int] | None = None
        if shared_params is not None:
            self._explicit_shared = {id(p) for p in shared_params}
            known = {id(p) for p in self._params()}
            if not self._explicit_shared <= known:
                raise ValueError("shared_params holds tensors that are not in the optimizer")
        self._stats: PCGradStats | None = None
        # The statistics are built on first access, from small CPU tensors kept
        # here: most steps nobody reads them, and on a GPU every host-side
        # millisecond after the step's one sync leaves the device idle.
        self._stats_source: Callable[[], PCGradStats] | None = None
        self._reset_accumulation()

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
    def stats(self) -> PCGradStats | None:
        """Statistics of the last surgery, or ``None`` before the first one."""
        if self._stats is None and self._stats_source is not None:
            self._stats = self._stats_source()
        return self._stats

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return f"PCGrad(reduction={self.reduction!r}, granularity={self.granularity!r},\n{inner}\n)"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the inner optimizer (and so to this wrapper)."""
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget this step's per-task gradients and reset ``.grad`` like the inner optimizer."""
        self._reset_accumulation()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict plus a ``"pcgrad"`` entry (generator state)."""
        state = dict(self.optimizer.state_dict())
        state["pcgrad"] = {
            "generator_state": self.generator.get_state(),
            "reduction": self.reduction,
            "granularity": self.granularity,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain one of the inner optimizer)."""
        state = dict(state_dict)
        ours = state.pop("pcgrad", None)
        self.optimizer.load_state_dict(state)
        if ours is not None:
            self.generator.set_state(ours["generator_state"])

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply the combined gradient with the inner optimizer.

        Runs the surgery first if a ``backward(..., combine=False)`` left it pending.

        Raises:
            FloatingPointError: if a task gradient of this step is not finite (with a
                ``GradScaler``, ``scaler.step`` skips this call instead).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._pending_combine:
            self._combine()
        if self._nonfinite_tasks:
            raise FloatingPointError(
                "PCGrad: the gradient of "
                + ", ".join(f"task {t} (losses[{t}])" for t in self._nonfinite_tasks)
                + " holds inf or NaN; the step was not taken. Use torch.amp.GradScaler "
                "to skip such steps automatically, or call zero_grad() and continue."
            )
        # The step's per-task gradients are no longer needed once .grad is final;
        # freeing them first keeps the inner step's peak memory that of a plain step.
        self._reset_accumulation()
        self.optimizer.step()
        return loss

    # ------------------------------------------------------------------ backward

    def backward(
        self,
        losses: Sequence[Tensor],
        *,
        retain_graph: bool | None = None,
        combine: bool = True,
    ) -> None:
        """Backpropagate one scalar loss per task and (by default) combine them into ``.grad``.

        Call it several times before :meth:`step` to accumulate: the per-task
        gradients add up and the surgery runs on the sums (``.grad`` is rewritten
        from them by each call, so edit ``.grad``, e.g. clip it, only after the last).

        Args:
            losses: one scalar loss per task, the same number on every call of a step.
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
                that differs from the previous ``backward()`` of this step. Nothing
                has been backpropagated when these are raised.
        """
        losses = self._check_losses(losses)
        if self._num_tasks is not None and len(losses) != self._num_tasks:
            raise ValueError(
                f"got {len(losses)} losses but the previous backward() of this step had "
                f"{self._num_tasks}; call zero_grad() to start a new step"
            )
        if self._synced:
            raise RuntimeError(
                "PCGrad.backward(): this step's task gradients were already averaged across "
                "ranks; with a process_group, pass combine=False for all but the last "
                "micro-batch, or call step()/zero_grad() first"
            )
        params = self._params()
        with record_function("PCGrad.graph_analysis"):
            needed_later, reached = _analyse_graphs(losses)
        in_optimizer = set(params)
        for task, leaves in enumerate(reached):
            if not leaves & in_optimizer:
                raise ValueError(
                    f"losses[{task}] reaches no parameter of the optimizer (task {task}); "
                    "check that its graph uses the model's parameters"
                )
        retain = needed_later if retain_graph is None else [retain_graph] * len(losses)

        if self._num_tasks is None:
            self._start_step(losses, params, reached)
        else:
            # .grad holds the combination of the previous call; recomputed below.
            for p in params:
                p.grad = None
        try:
            for task, loss in enumerate(losses):
                with record_function(f"PCGrad.backward_task{task}"):
                    self._backward_one(task, loss, params, reached[task], retain[task])
        except BaseException:
            # The per-task sums are now partial: drop them rather than step on them.
            for p in params:
                p.grad = self._base_grads.get(p)
            self._reset_accumulation()
            raise
        self._pending_combine = True
        if combine:
            with record_function("PCGrad.surgery"):
                self._combine()

    def _start_step(
        self, losses: list[Tensor], params: list[Tensor], reached: list[set[Tensor]]
    ) -> None:
        """Set up the per-task storage for a new step."""
        num_tasks = len(losses)
        self._num_tasks = num_tasks
        self._task_grads = [{} for _ in losses]
        # Gradients already in .grad (none after zero_grad()) are kept aside and
        # added to the combined gradient unchanged.
        self._base_grads = {}
        for p in params:
            if p.grad is not None:
                self._base_grads[p] = p.grad
                p.grad = None
        self._orders = self._draw_orders(num_tasks)
        self._buckets = {}
        if self._bucket_mode(params) and num_tasks > 1:
            if self.process_group is not None:
                # Every rank must lay out its buckets alike (the Gram matrix is summed
                # in bucket order), so plan them from what any rank's tasks reach.
                reached = self._reached_on_any_rank(params, reached)
            self._buckets = _Bucket.for_shared(params, reached, self._explicit_shared)

    def _bucket_mode(self, params: list[Tensor]) -> bool:
        if self.granularity != "all":
            return False  # per-tensor/per-group Gram matrices need per-tensor storage
        if self.gradient_buckets is not None:
            return self.gradient_buckets
        return any(p.device.type == "cuda" for p in params)

    def _backward_one(
        self, task: int, loss: Tensor, params: list[Tensor], reached: set[Tensor], retain: bool
    ) -> None:
        grads = self._task_grads[task]
        # Hand autograd this task's running sums (or, for bucketed parameters, its
        # row of the bucket) so that it accumulates in place. Elsewhere, on the
        # first call, autograd's fresh gradient tensor is taken as is (no copy).
        for p, bucket in self._buckets.items():
            if p in reached and p not in grads:
                grads[p] = bucket.view(task, p)
        for p, accumulator in grads.items():
            p.grad = accumulator
        loss.backward(retain_graph=retain)
        for p in params:
            g = p.grad
            if g is None:
                continue
            p.grad = None
            if g.is_sparse:
                raise TypeError(
                    f"losses[{task}] produced a sparse gradient; PCGrad needs dense gradients "
                    "(use nn.Embedding(sparse=False))"
                )
            running = grads.get(p)
            if running is not None and g is not running:
                # Autograd replaced the tensor instead of adding in place (it does so
                # only in unusual cases); keep our storage the one that holds the sum.
                running.copy_(g)
            elif running is None:
                grads[p] = g

    # ------------------------------------------------------------------ surgery

    def _combine(self) -> None:
        """Run the surgery on the accumulated per-task gradients and write ``.grad``."""
        num_tasks = self._num_tasks
        if num_tasks is None:
            return
        params = self._params()
        if self.process_group is not None:
            self._average_across_ranks(params)
        shared, specific = self._split_shared(params)
        buckets = list({id(b): b for b in self._buckets.values()}.values())
        loose_shared = [p for p in shared if p not in self._buckets]
        # Gram blocks: one per bucket, then one per remaining tensor.
        items = [b.gram_item() for b in buckets] + [
            self._gram_item(p) for p in loose_shared + specific
        ]
        with record_function("PCGrad.gram"):
            blocks = _gram_blocks(items, num_tasks)
        num_shared_items = len(buckets) + len(loose_shared)
        shared_blocks = blocks[:num_shared_items]

        diag = blocks.diagonal(dim1=-2, dim2=-1)
        nonfinite = tuple(t for t in range(num_tasks) if not bool(torch.isfinite(diag[:, t]).all()))
        self._nonfinite_tasks = nonfinite
        scale = 1.0 / num_tasks if self.reduction == "mean" else 1.0
        if nonfinite:
            # No surgery on inf/NaN: write the plain combination, which keeps the
            # non-finite values where a GradScaler's inf check will find them.
            weights = torch.full((1, num_tasks), scale, dtype=torch.float64)
            block_of: dict[Tensor, int] = dict.fromkeys(shared, 0)
            self._stats = None
            self._stats_source = partial(_nonfinite_stats, self._orders, len(shared), nonfinite)
        else:
            with record_function("PCGrad.weights"):
                grouped, block_of = self._group_blocks(loose_shared, shared_blocks)
                result = pcgrad(grouped, self._orders)
                weights = result.coefficients.sum(-2) * scale
                self._stats = None
                self._stats_source = partial(
                    _stats,
                    shared_blocks,
                    result.projected,
                    weights,
                    self._orders,
                    len(shared),
                    squeeze=self.granularity == "all",
                )

        weights_host: list[list[float]] = weights.tolist()
        with record_function("PCGrad.weighted_sum"):
            combined: list[tuple[Tensor, Tensor, bool]] = []
            for bucket in buckets:
                combined += bucket.combine(weights_host[0])
            combined += self._combined_grads(loose_shared, block_of, weights_host, scale, specific)
            for p, g, fresh in combined:
                base = self._base_grads.get(p)
                if base is not None:
                    # Never add into a task's own running sum: it may accumulate again.
                    g = g.add_(base) if fresh else g + base
                p.grad = g
            for p, base in self._base_grads.items():
                if p.grad is None:
                    p.grad = base
        self._pending_combine = False
        if self.process_group is not None:
            self._synced = True

    def _gram_item(self, p: Tensor) -> _GramItem:
        vectors = [
            (t, grads[p].reshape(-1)) for t, grads in enumerate(self._task_grads) if p in grads
        ]
        return _GramItem(vectors, p.numel())

    def _split_shared(self, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Shared parameters (projected over) and the others that some task reached."""
        reached_by: dict[Tensor, int] = defaultdict(int)
        for grads in self._task_grads:
            for p in grads:
                reached_by[p] += 1
        shared: list[Tensor] = []
        specific: list[Tensor] = []
        for p in params:
            count = reached_by.get(p, 0)
            if count == 0:
                continue
            if self._explicit_shared is not None:
                is_shared = id(p) in self._explicit_shared
            else:
                is_shared = count >= 2 or p in self._buckets
            (shared if is_shared else specific).append(p)
        return shared, specific

    def _group_blocks(
        self, loose_shared: list[Tensor], blocks: Tensor
    ) -> tuple[Tensor, dict[Tensor, int]]:
        """Sum the shared Gram blocks into the blocks the surgery runs on.

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

    def _combined_grads(
        self,
        shared: list[Tensor],
        block_of: dict[Tensor, int],
        weights: list[list[float]],
        scale: float,
        specific: list[Tensor],
    ) -> list[tuple[Tensor, Tensor, bool]]:
        """``(param, combined gradient, is_fresh_tensor)`` for the tensors stored one by one."""
        task_grads = self._task_grads
        out: list[tuple[Tensor, Tensor, bool]] = []
        # Shared: one weighted sum per parameter, batched with _foreach over the
        # parameters that have the same tasks, block, device and dtype.
        batches: dict[tuple[Any, ...], list[Tensor]] = defaultdict(list)
        for p in shared:
            block = block_of[p]
            tasks = tuple(t for t, grads in enumerate(task_grads) if p in grads)
            w = [weights[block][t] for t in tasks]
            if not _weights_are_safe(w):
                grads = [task_grads[t][p] for t in tasks]
                out.append((p, _weighted_sum_float64(grads, w, p.dtype), True))
                continue
            batches[(tasks, block, p.device, p.dtype)].append(p)
        for (tasks, block, _, dtype), ps in batches.items():
            w = [weights[block][t] for t in tasks]
            lists = [[task_grads[t][p] for p in ps] for t in tasks]
            for p, g in zip(ps, _weighted_sum(lists, w, dtype), strict=True):
                out.append((p, g, True))

        # Task-specific: the plain (reduced) sum of the tasks that reached it.
        for p in specific:
            grads = [g[p] for g in task_grads if p in g]
            if len(grads) == 1 and scale == 1.0:
                out.append((p, grads[0], False))  # the task's own gradient, no copy
            else:
                summed = _weighted_sum([[g] for g in grads], [scale] * len(grads), p.dtype)[0]
                out.append((p, summed, True))
        return out

    # ------------------------------------------------------------------ helpers

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _reset_accumulation(self) -> None:
        self._task_grads = []
        self._base_grads = {}
        self._buckets = {}
        self._num_tasks = None
        self._orders = torch.empty(0, 0, dtype=torch.int64)
        self._pending_combine = False
        self._nonfinite_tasks = ()
        self._synced = False

    def _draw_orders(self, num_tasks: int) -> Tensor:
        orders = draw_orders(num_tasks, self.generator)
        if self.process_group is not None and num_tasks > 1:
            # Every rank must run the same surgery: take the first rank's draw.
            device = _collective_device(self.process_group)
            shipped = orders.to(device)
            src = dist.get_global_rank(self.process_group, 0)
            dist.broadcast(shipped, src=src, group=self.process_group)
            orders = shipped.cpu()
        return orders

    def _reached_on_any_rank(
        self, params: list[Tensor], reached: list[set[Tensor]]
    ) -> list[set[Tensor]]:
        group = self.process_group
        assert group is not None
        flags = torch.tensor(
            [[p in leaves for p in params] for leaves in reached],
            dtype=torch.uint8,
            device=_collective_device(group),
        ).reshape(len(reached), len(params))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        rows = flags.cpu().tolist()
        return [{p for p, flag in zip(params, row, strict=True) if flag} for row in rows]

    def _average_across_ranks(self, params: list[Tensor]) -> None:
        """Average every task's gradients over the process group, in place."""
        group = self.process_group
        assert group is not None
        num_tasks = len(self._task_grads)
        # Ranks may differ in which task reached which parameter (a batch without
        # some token, say): agree on the union first, with zeros where missing.
        device = _collective_device(group)
        reached = torch.tensor(
            [[p in grads for p in params] for grads in self._task_grads],
            dtype=torch.uint8,
            device=device,
        ).reshape(num_tasks, len(params))
        dist.all_reduce(reached, op=dist.ReduceOp.MAX, group=group)
        reached_host = reached.cpu().tolist()
        world = dist.get_world_size(group)
        # Every rank lists the same tensors in the same order (task, then parameter).
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        for task, grads in enumerate(self._task_grads):
            for k, p in enumerate(params):
                if not reached_host[task][k]:
                    continue
                if p not in grads:
                    bucket = self._buckets.get(p)
                    if bucket is not None:
                        grads[p] = bucket.view(task, p)
                    else:
                        grads[p] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                by_kind[(grads[p].device, grads[p].dtype)].append(grads[p])
        # One all-reduce of all tasks' gradients packed side by side (one per device
        # and dtype, so usually exactly one): a single round of communication per
        # step, instead of one per task or per tensor. The price is a flat copy of
        # the per-task gradients for the duration of the call.
        for tensors in by_kind.values():
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.all_reduce(flat, group=group)
            flat.div_(world)
            torch._foreach_copy_(tensors, _unflatten_dense_tensors(flat, tensors))

    @staticmethod
    def _check_losses(losses: Sequence[Tensor]) -> list[Tensor]:
        if isinstance(losses, Tensor):
            raise TypeError(
                "losses must be a sequence with one scalar loss per task, got a single tensor; "
                "wrap it in a list"
            )
        losses = list(losses)
        if not losses:
            raise ValueError("losses is empty: pass one scalar loss per task")
        device = None
        for task, loss in enumerate(losses):
            if not isinstance(loss, Tensor):
                raise TypeError(f"losses[{task}] must be a Tensor, got {type(loss).__name__}")
            if loss.numel() != 1:
                raise ValueError(
                    f"losses[{task}] must be a scalar, got shape {list(loss.shape)}; "
                    "reduce it (e.g. .mean()) first"
                )
            if not loss.is_floating_point():
                raise TypeError(
                    f"losses[{task}] must be a real floating-point tensor, got {loss.dtype}"
                )
            if not loss.requires_grad:
                raise ValueError(
                    f"losses[{task}] does not require grad: it was computed without autograd "
                    "(torch.no_grad(), detach()) or from no trainable parameter"
                )
            if device is None:
                device = loss.device
            elif loss.device != device:
                raise ValueError(
                    f"losses[{task}] is on {loss.device} but losses[0] is on {device}; "
                    "put all task losses on one device"
                )
        return losses


# ---------------------------------------------------------------------- graphs


def _analyse_graphs(losses: list[Tensor]) -> tuple[list[bool], list[set[Tensor]]]:
    """Walk each loss's autograd graph.

    Returns, for each loss, whether a later loss's backward pass goes through part
    of its graph (so the graph must survive its own backward pass), and the set of
    leaf tensors (parameters) it reaches. Graphs that only meet at the leaves
    (separate batches) can be freed as soon as they are used.
    """
    needed_later = [False] * len(losses)
    reached: list[set[Tensor]] = [set() for _ in losses]
    # last_visitor[node]: the latest task whose graph contains the node. Every
    # earlier task that contains it must keep it alive for that later pass. Each
    # task walks its whole graph: stopping at a node seen before would miss a
    # third task that reaches the nodes below it by another path.
    last_visitor: dict[Any, int] = {}
    for task, loss in enumerate(losses):
        leaves = reached[task]
        if loss.grad_fn is None:
            leaves.add(loss)  # the loss is itself a leaf
            continue
        stack = [loss.grad_fn]
        while stack:
            node = stack.pop()
            previous = last_visitor.get(node)
            if previous == task:
                continue
            if previous is not None:
                needed_later[previous] = True
            last_visitor[node] = task
            for child, _ in node.next_functions:
                if child is None:
                    continue
                if type(child) is _ACCUMULATE_GRAD:
                    # A leaf's accumulator holds no saved tensors: meeting there is fine.
                    leaves.add(child.variable)  # type: ignore[attr-defined]
                else:
                    stack.append(child)
    return needed_later, reached


def _accumulate_grad_type() -> type:
    leaf = torch.zeros(1, requires_grad=True)
    node = leaf.expand(2).grad_fn
    assert node is not None
    return type(node.next_functions[0][0])


_ACCUMULATE_GRAD = _accumulate_grad_type()


# ---------------------------------------------------------------------- storage


class _Bucket:
    """The per-task gradients of some shared parameters, each task's in one flat tensor.

    ``rows[t]`` holds task t's gradient of all the bucket's parameters, one after
    the other; each parameter's ``.grad`` is pointed at its slice before task t's
    backward pass, so autograd accumulates there. The Gram block is then a few
    dot products over whole rows and the combination a few whole-row operations:
    a handful of kernel launches instead of several per parameter, which is
    what matters on a GPU. (On a CPU, taking autograd's fresh tensors is cheaper
    than zero-filling and adding into a bucket, so buckets are off there by default.)
    A row is allocated only when its task's backward pass starts, so the rows
    do not all sit beside the activations of the first task.
    """

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.rows: dict[int, Tensor] = {}
        self.views: dict[int, dict[Tensor, Tensor]] = {}

    @staticmethod
    def for_shared(
        params: list[Tensor], reached: list[set[Tensor]], explicit_shared: set[int] | None
    ) -> dict[Tensor, _Bucket]:
        """Buckets (one per device and dtype) for the parameters shared in this call's graphs."""
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        for p in params:
            count = sum(p in leaves for leaves in reached)
            shared = id(p) in explicit_shared if explicit_shared is not None else count >= 2
            if shared and count and p.is_floating_point() and not p.is_sparse:
                by_kind[(p.device, p.dtype)].append(p)
        buckets: dict[Tensor, _Bucket] = {}
        for group in by_kind.values():
            bucket = _Bucket(group)
            buckets.update(dict.fromkeys(group, bucket))
        return buckets

    def view(self, task: int, p: Tensor) -> Tensor:
        """Task ``task``'s slice for ``p`` (allocating the task's row on first use)."""
        views = self.views.get(task)
        if views is None:
            row = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
            self.rows[task] = row
            # All the row's views in one C++ call (a Python slice per parameter,
            # per task and step, adds up to milliseconds on a GPU's critical path).
            views = dict(zip(self.params, _unflatten_dense_tensors(row, self.params), strict=True))
            self.views[task] = views
        return views[p]

    def gram_item(self) -> _GramItem:
        return _GramItem([(t, self.rows[t]) for t in sorted(self.rows)], self.numel)

    def combine(self, weights: list[float]) -> list[tuple[Tensor, Tensor, bool]]:
        """Each parameter's slice of ``sum_t weights[t] * rows[t]``."""
        tasks = sorted(self.rows)
        w = [weights[t] for t in tasks]
        rows = [self.rows[t] for t in tasks]
        if not _weights_are_safe(w):
            total = _weighted_sum_float64(rows, w, self.dtype)
        else:
            total = _weighted_sum([[row] for row in rows], w, self.dtype)[0]
        pieces = _unflatten_dense_tensors(total, self.params)
        return [(p, piece, True) for p, piece in zip(self.params, pieces, strict=True)]


class _GramItem:
    """Some tasks' gradients over one stretch of parameters, as flat vectors."""

    def __init__(self, vectors: list[tuple[int, Tensor]], numel: int) -> None:
        self.vectors = vectors
        self.numel = numel


def _gram_blocks(items: list[_GramItem], num_tasks: int) -> Tensor:
    """One Gram matrix per item, ``[I, T, T]`` (float64, on the CPU).

    Each dot product runs where the gradients live, in float32 (float64 for
    float64 gradients); all of them come to the host in one transfer per device.
    Blocks whose float32 result may be inaccurate (an overflow to inf, or squared
    norms so small that products fell into float32's subnormal range) are
    recomputed in float64; genuine inf/NaN gradients stay non-finite. The
    bookkeeping is plain Python: hundreds of tiny tensor writes would cost more
    than the dot products themselves on a GPU.
    """
    blocks = [[[0.0] * num_tasks for _ in range(num_tasks)] for _ in items]
    per_device: dict[torch.device, tuple[list[Tensor], list[tuple[int, int, int]]]] = defaultdict(
        lambda: ([], [])
    )
    for k, item in enumerate(items):
        item.vectors = [(t, _in_dot_dtype(v)) for t, v in item.vectors]
        if not item.vectors:
            continue
        dots, where = per_device[item.vectors[0][1].device]
        for a, (i, vi) in enumerate(item.vectors):
            for j, vj in item.vectors[a:]:
                dots.append(torch.dot(vi, vj))
                where.append((k, i, j))
    for dots, where in per_device.values():
        values = torch.stack(dots).to(device="cpu", dtype=torch.float64).tolist()  # the host sync
        for (k, i, j), value in zip(where, values, strict=True):
            blocks[k][i][j] = value
            blocks[k][j][i] = value

    for k, item in enumerate(items):
        if not item.vectors or item.vectors[0][1].dtype == torch.float64:
            continue
        block = blocks[k]
        floor = item.numel * torch.finfo(torch.float32).tiny * 2.0**26
        inaccurate = any(not math.isfinite(x) for row in block for x in row) or any(
            block[t][t] < floor for t, _ in item.vectors
        )
        if inaccurate:
            wide = [(t, v.to(torch.float64)) for t, v in item.vectors]
            for a, (i, vi) in enumerate(wide):
                for j, vj in wide[a:]:
                    value = float(torch.dot(vi, vj))
                    block[i][j] = value
                    block[j][i] = value
    return torch.tensor(blocks, dtype=torch.float64).reshape(len(items), num_tasks, num_tasks)


def _in_dot_dtype(vector: Tensor) -> Tensor:
    """Half-precision gradients are multiplied in float32 (float64 stays float64)."""
    if vector.dtype in (torch.float32, torch.float64):
        return vector
    return vector.to(torch.float32)


def _weights_are_safe(weights: list[float]) -> bool:
    """Whether every weight can multiply a float32 gradient without leaving its range."""
    return all(w == 0.0 or 1 / _SAFE_WEIGHT <= abs(w) <= _SAFE_WEIGHT for w in weights)


def _weighted_sum(
    lists: list[list[Tensor]], weights: list[float], dtype: torch.dtype
) -> list[Tensor]:
    """``sum_t weights[t] * lists[t][k]`` for every k, in float32 or better, as ``dtype``."""
    if dtype in _HALF_DTYPES:
        lists = [[g.float() for g in grads] for grads in lists]
    first, *rest = range(len(lists))
    if weights[first] == 1.0 and rest:
        second = rest.pop(0)
        out = torch._foreach_add(lists[first], lists[second], alpha=weights[second])
    else:
        out = torch._foreach_mul(lists[first], weights[first])
    for t in rest:
        torch._foreach_add_(out, lists[t], alpha=weights[t])
    if dtype in _HALF_DTYPES:
        return [g.to(dtype) for g in out]
    return list(out)


def _weighted_sum_float64(grads: list[Tensor], weights: list[float], dtype: torch.dtype) -> Tensor:
    total = torch.zeros_like(grads[0], dtype=torch.float64)
    for g, w in zip(grads, weights, strict=True):
        total.add_(g.to(torch.float64), alpha=w)
    return total.to(dtype)


def _collective_device(group: dist.ProcessGroup) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------- stats


def _stats(
    shared_blocks: Tensor,
    projected: Tensor,
    weights: Tensor,
    orders: Tensor,
    num_shared: int,
    *,
    squeeze: bool,
) -> PCGradStats:
    gram = shared_blocks.sum(0)
    cos = cosine_similarity(gram)
    num_tasks = gram.shape[-1]
    off_diagonal = ~torch.eye(num_tasks, dtype=torch.bool)
    return PCGradStats(
        cosine=cos,
        magnitude_similarity=magnitude_similarity(gram),
        conflicts=(gram < 0) & off_diagonal,
        projected=projected[0] if squeeze else projected,
        weights=weights[0] if squeeze else weights,
        grad_norms=gram.diagonal().clamp(min=0).sqrt(),
        orders=orders,
        num_shared=num_shared,
        nonfinite_tasks=(),
    )


def _nonfinite_stats(orders: Tensor, num_shared: int, nonfinite: tuple[int, ...]) -> PCGradStats:
    num_tasks = orders.shape[0]
    nan = torch.full((num_tasks, num_tasks), math.nan, dtype=torch.float64)
    return PCGradStats(
        cosine=nan,
        magnitude_similarity=nan.clone(),
        conflicts=torch.zeros(num_tasks, num_tasks, dtype=torch.bool),
        projected=torch.zeros(num_tasks, num_tasks, dtype=torch.bool),
        weights=torch.full((num_tasks,), math.nan, dtype=torch.float64),
        grad_norms=torch.full((num_tasks,), math.nan, dtype=torch.float64),
        orders=orders,
        num_shared=num_shared,
        nonfinite_tasks=nonfinite,
    )
