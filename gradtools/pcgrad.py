"""PCGrad as a wrapper around any ``torch.optim.Optimizer``.

This module is the autograd plumbing: it runs one backward pass per task, keeps
each task's gradient per parameter (taking the fresh ``.grad`` tensors autograd
produces, never copying the model), builds the T x T Gram matrix of the task
gradients one small block per parameter, asks :mod:`gradtools.aggregation` for
the task weights, and writes ``sum_j w_j g_j`` into ``.grad``. It knows nothing
about projection formulas.

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
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
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
            a parameter is shared when two or more tasks produced a gradient for it.
            Given explicitly, the others get the plain (reduced) sum of whatever
            tasks reached them.
        granularity: ``"all"`` projects over the whole shared vector (the paper);
            ``"group"`` over each param group's shared parameters separately;
            ``"tensor"`` over each shared parameter tensor separately.
        process_group: for data-parallel training. When given, the per-task gradients
            are averaged over the group's ranks before the surgery, so it runs on the
            global task gradients (not an average of per-rank surgeries), and the
            visiting orders are broadcast from the group's first rank. Do not let
            DistributedDataParallel reduce gradients too: run the forward passes and
            ``backward()`` under ``ddp_model.no_sync()``, or do not wrap the model.
    """

    # Per-step accumulation state (reset by zero_grad() and step()).
    _task_grads: list[dict[Tensor, Tensor]]  # task -> param -> running gradient sum
    _base_grads: dict[Tensor, Tensor]  # .grad found at the start of the step
    _num_tasks: int | None  # None between steps
    _orders: Tensor  # [T, T-1] visiting orders drawn for this step
    _pending_combine: bool
    _nonfinite_tasks: tuple[int, ...]
    _synced: bool  # per-task gradients already averaged across ranks

    def __init__(
        self,
        optimizer: Optimizer,
        reduction: Reduction = "sum",
        generator: torch.Generator | None = None,
        *,
        shared_params: Iterable[Tensor] | None = None,
        granularity: Granularity = "all",
        process_group: dist.ProcessGroup | None = None,
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
            raise ValueError(
                f"granularity must be 'all', 'group' or 'tensor', got {granularity!r}"
            )
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
        return self._stats

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"PCGrad(reduction={self.reduction!r}, granularity={self.granularity!r},\n"
            f"{inner}\n)"
        )

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
        gradients add up and the surgery runs on the sums.

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
                that differs from the previous ``backward()`` of this step.
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
        if self._num_tasks is None:
            # Start of a step: gradients already in .grad (none after zero_grad())
            # are kept aside and added to the combined gradient unchanged.
            self._num_tasks = len(losses)
            self._task_grads = [{} for _ in losses]
            self._base_grads = {}
            for p in params:
                if p.grad is not None:
                    self._base_grads[p] = p.grad
                    p.grad = None
            self._orders = self._draw_orders(len(losses))
        else:
            # .grad holds the combination of the previous call; recomputed below.
            for p in params:
                p.grad = None

        if retain_graph is None:
            retain = _graphs_needed_later(losses)
        else:
            retain = [retain_graph] * len(losses)
        try:
            for task, loss in enumerate(losses):
                self._backward_one(task, loss, params, retain[task])
        except BaseException:
            # The per-task sums are now partial: drop them rather than step on them.
            self._restore_base_grads(params)
            self._reset_accumulation()
            raise
        self._pending_combine = True
        if combine:
            self._combine()

    def _backward_one(self, task: int, loss: Tensor, params: list[Tensor], retain: bool) -> None:
        grads = self._task_grads[task]
        # Hand autograd this task's running sum so that it accumulates in place;
        # on the first call there is none and autograd's fresh tensor is taken as is.
        versions: dict[Tensor, int] = {}
        for p, running in grads.items():
            p.grad = running
            versions[p] = running._version
        loss.backward(retain_graph=retain)
        reached = False
        for p in params:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                p.grad = None
                raise TypeError(
                    f"losses[{task}] produced a sparse gradient; PCGrad needs dense gradients "
                    "(use nn.Embedding(sparse=False))"
                )
            if p not in versions or g._version != versions[p] or g is not grads.get(p):
                reached = True
            grads[p] = g
            p.grad = None
        if not reached:
            raise ValueError(
                f"losses[{task}] reaches no parameter of the optimizer (task {task}); "
                "check that its graph uses the model's parameters"
            )

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
        blocks = _gram_blocks(self._task_grads, shared + specific, num_tasks)
        shared_blocks = blocks[: len(shared)]

        diag = blocks.diagonal(dim1=-2, dim2=-1)
        nonfinite = tuple(
            t for t in range(num_tasks) if not bool(torch.isfinite(diag[:, t]).all())
        )
        self._nonfinite_tasks = nonfinite
        scale = 1.0 / num_tasks if self.reduction == "mean" else 1.0
        if nonfinite:
            # No surgery on inf/NaN: write the plain combination, which keeps the
            # non-finite values where a GradScaler's inf check will find them.
            block_weights = torch.full((1, num_tasks), scale, dtype=torch.float64)
            block_of = [0] * len(shared)
            self._stats = _nonfinite_stats(self._orders, len(shared), nonfinite)
        else:
            grouped, block_of = self._group_blocks(shared, shared_blocks)
            result = pcgrad(grouped, self._orders)
            block_weights = result.coefficients.sum(-2) * scale
            self._stats = _stats(
                shared_blocks.sum(0),
                result.projected,
                block_weights,
                self._orders,
                len(shared),
                squeeze=self.granularity == "all",
            )

        weights_host = block_weights.tolist()
        for p, g, fresh in self._combined_grads(shared, block_of, weights_host, scale, specific):
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
                is_shared = count >= 2
            (shared if is_shared else specific).append(p)
        return shared, specific

    def _group_blocks(self, shared: list[Tensor], blocks: Tensor) -> tuple[Tensor, list[int]]:
        """Sum per-tensor Gram blocks into the blocks the surgery runs on.

        Returns the ``[B, T, T]`` Gram matrices and, for each shared tensor, the
        index of its block.
        """
        num_tasks = blocks.shape[-1]
        if self.granularity == "tensor" and shared:
            return blocks, list(range(len(shared)))
        if self.granularity == "group" and shared:
            group_of = {}
            for index, group in enumerate(self.param_groups):
                for p in group["params"]:
                    group_of[p] = index
            used = sorted({group_of[p] for p in shared})
            position = {g: i for i, g in enumerate(used)}
            block_of = [position[group_of[p]] for p in shared]
            grouped = torch.zeros(len(used), num_tasks, num_tasks, dtype=torch.float64)
            grouped.index_add_(0, torch.tensor(block_of, dtype=torch.int64), blocks)
            return grouped, block_of
        return blocks.sum(0, keepdim=True), [0] * len(shared)

    def _combined_grads(
        self,
        shared: list[Tensor],
        block_of: list[int],
        weights: list[list[float]],
        scale: float,
        specific: list[Tensor],
    ) -> Iterable[tuple[Tensor, Tensor, bool]]:
        """Yield ``(param, combined gradient, is_fresh_tensor)`` for every parameter some task reached."""
        task_grads = self._task_grads
        # Shared: one weighted sum per parameter, batched with _foreach over the
        # parameters that have the same tasks, block, device and dtype.
        batches: dict[tuple[Any, ...], list[Tensor]] = defaultdict(list)
        for p, block in zip(shared, block_of, strict=True):
            tasks = tuple(t for t, grads in enumerate(task_grads) if p in grads)
            w = [weights[block][t] for t in tasks]
            if any(x != 0.0 and not (1 / _SAFE_WEIGHT <= abs(x) <= _SAFE_WEIGHT) for x in w):
                yield p, _weighted_sum_float64([task_grads[t][p] for t in tasks], w, p.dtype), True
                continue
            batches[(tasks, block, p.device, p.dtype)].append(p)
        for (tasks, block, _, dtype), ps in batches.items():
            w = [weights[block][t] for t in tasks]
            lists = [[task_grads[t][p] for p in ps] for t in tasks]
            for p, g in zip(ps, _weighted_sum(lists, w, dtype), strict=True):
                yield p, g, True

        # Task-specific: the plain (reduced) sum of the tasks that reached it.
        for p in specific:
            grads = [g[p] for g in task_grads if p in g]
            if len(grads) == 1 and scale == 1.0:
                yield p, grads[0], False  # the task's own gradient, no copy
            else:
                yield p, _weighted_sum([[g] for g in grads], [scale] * len(grads), p.dtype)[0], True

    # ------------------------------------------------------------------ helpers

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _reset_accumulation(self) -> None:
        self._task_grads = []
        self._base_grads = {}
        self._num_tasks = None
        self._orders = torch.empty(0, 0, dtype=torch.int64)
        self._pending_combine = False
        self._nonfinite_tasks = ()
        self._synced = False

    def _restore_base_grads(self, params: list[Tensor]) -> None:
        for p in params:
            p.grad = self._base_grads.get(p)

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
        handles = []
        tensors = []
        for task, grads in enumerate(self._task_grads):
            for k, p in enumerate(params):
                if not reached_host[task][k]:
                    continue
                if p not in grads:
                    grads[p] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                tensors.append(grads[p])
                handles.append(dist.all_reduce(grads[p], group=group, async_op=True))
        for handle in handles:
            handle.wait()
        if tensors:
            torch._foreach_div_(tensors, float(world))

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
                raise TypeError(f"losses[{task}] must be a real floating-point tensor, got {loss.dtype}")
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


# ---------------------------------------------------------------------- free helpers


def _graphs_needed_later(losses: list[Tensor]) -> list[bool]:
    """For each loss, whether a later loss's backward pass goes through part of its graph.

    Such a graph must survive its own backward pass. Graphs that only meet at
    the parameters (separate batches) are freed as soon as they are used.
    """
    retain = [False] * len(losses)
    if len(losses) == 1:
        return retain
    # last_visitor[node]: the latest task whose graph contains the node. Every
    # earlier task that contains it must keep it alive for that later pass. Each
    # task walks its whole graph: stopping at a node seen before would miss a
    # third task that reaches the nodes below it by another path.
    last_visitor: dict[Any, int] = {}
    for task, loss in enumerate(losses):
        stack = [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is None:
                continue
            previous = last_visitor.get(node)
            if previous == task:
                continue
            if previous is not None:
                retain[previous] = True
            last_visitor[node] = task
            for child, _ in node.next_functions:
                # Leaves' accumulators hold no saved tensors: meeting there is fine.
                if child is not None and type(child) is not _ACCUMULATE_GRAD:
                    stack.append(child)
    return retain


def _accumulate_grad_type() -> type:
    leaf = torch.zeros(1, requires_grad=True)
    node = leaf.expand(2).grad_fn
    assert node is not None
    return type(node.next_functions[0][0])


_ACCUMULATE_GRAD = _accumulate_grad_type()


def _gram_blocks(task_grads: list[dict[Tensor, Tensor]], params: list[Tensor], num_tasks: int) -> Tensor:
    """Per-parameter Gram matrices ``[P, T, T]`` (float64, on the CPU).

    Each dot product runs where the gradients live, in float32 (float64 for
    float64 parameters); all of them come to the host in one transfer per device.
    Blocks whose float32 result may be inaccurate (an overflow to inf, or squared
    norms so small that products fell into float32's subnormal range) are
    recomputed in float64; genuine inf/NaN gradients stay non-finite.
    """
    blocks = torch.zeros(len(params), num_tasks, num_tasks, dtype=torch.float64)
    if not params:
        return blocks
    per_device: dict[torch.device, tuple[list[Tensor], list[tuple[int, int, int]]]] = defaultdict(
        lambda: ([], [])
    )
    flat_grads: list[list[tuple[int, Tensor]]] = []
    for k, p in enumerate(params):
        present = [
            (t, _as_vector(grads[p])) for t, grads in enumerate(task_grads) if p in grads
        ]
        flat_grads.append(present)
        dots, where = per_device[p.device]
        for a, (i, gi) in enumerate(present):
            for j, gj in present[a:]:
                dots.append(torch.dot(gi, gj))
                where.append((k, i, j))
    for dots, where in per_device.values():
        values = torch.stack(dots).to(device="cpu", dtype=torch.float64)
        index = torch.tensor(where, dtype=torch.int64)
        blocks[index[:, 0], index[:, 1], index[:, 2]] = values
        blocks[index[:, 0], index[:, 2], index[:, 1]] = values

    # Which blocks to redo in float64.
    numels = torch.tensor([p.numel() for p in params], dtype=torch.float64)
    tiny = torch.tensor(
        [torch.finfo(_dot_dtype(p.dtype)).tiny * 2.0**26 for p in params], dtype=torch.float64
    )
    present_mask = torch.zeros(len(params), num_tasks, dtype=torch.bool)
    for k, present in enumerate(flat_grads):
        for t, _ in present:
            present_mask[k, t] = True
    diag = blocks.diagonal(dim1=-2, dim2=-1)
    inaccurate = (~torch.isfinite(blocks)).flatten(1).any(1) | (
        present_mask & (diag < (numels * tiny).unsqueeze(1))
    ).any(1)
    for k in inaccurate.nonzero().flatten().tolist():
        if _dot_dtype(params[k].dtype) == torch.float64:
            continue
        present = [(t, g.to(torch.float64)) for t, g in flat_grads[k]]
        for a, (i, gi) in enumerate(present):
            for j, gj in present[a:]:
                value = float(torch.dot(gi, gj))
                blocks[k, i, j] = value
                blocks[k, j, i] = value
    return blocks


def _dot_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_vector(grad: Tensor) -> Tensor:
    vector = grad.reshape(-1)
    if vector.dtype != _dot_dtype(vector.dtype):
        vector = vector.to(_dot_dtype(vector.dtype))
    return vector


def _weighted_sum(lists: list[list[Tensor]], weights: list[float], dtype: torch.dtype) -> list[Tensor]:
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


def _stats(
    gram: Tensor,
    projected: Tensor,
    weights: Tensor,
    orders: Tensor,
    num_shared: int,
    *,
    squeeze: bool,
) -> PCGradStats:
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

