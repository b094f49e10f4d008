"""The collectives that keep a multi-task step exact under data parallelism.

The aggregation is nonlinear in the task gradients, so the mean of per-rank
aggregations is not the aggregation of the mean: every rank first averages the
per-task gradients (all tasks in one all-reduce), then runs the same method on
the same Gram matrix. Per-step random draws come from the group's first rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _unflatten_dense_tensors

from gradtools._task_gradients import Bucket
from gradtools.tensor_groups import group_by_device_dtype

__all__ = ["average_task_gradients", "broadcast_from_first_rank", "reached_on_any_rank"]


def collective_device(group: dist.ProcessGroup) -> torch.device:
    """Where small messages must live for ``group``'s backend (CUDA for NCCL)."""
    backend = dist.get_backend(group)
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_first_rank(value: Tensor, group: dist.ProcessGroup) -> Tensor:
    """``value`` as the group's first rank holds it (a CPU tensor; same shape on every rank)."""
    shipped = value.to(collective_device(group))
    dist.broadcast(shipped, src=dist.get_global_rank(group, 0), group=group)
    return shipped.cpu()


def _any_rank(flags: list[list[bool]], group: dist.ProcessGroup) -> list[list[int]]:
    rows = len(flags)
    cols = len(flags[0]) if flags else 0
    message = torch.tensor(flags, dtype=torch.uint8, device=collective_device(group))
    message = message.reshape(rows, cols)
    dist.all_reduce(message, op=dist.ReduceOp.MAX, group=group)
    return message.cpu().tolist()


def reached_on_any_rank(
    params: list[Tensor], reached: list[set[Tensor]], group: dist.ProcessGroup
) -> list[set[Tensor]]:
    """For each task, the parameters its loss reaches on at least one rank."""
    rows = _any_rank([[p in leaves for p in params] for leaves in reached], group)
    return [{p for p, flag in zip(params, row, strict=True) if flag} for row in rows]


def average_task_gradients(
    task_grads: list[dict[Tensor, Tensor]],
    params: list[Tensor],
    buckets: dict[Tensor, Bucket],
    group: dist.ProcessGroup,
) -> None:
    """Average every task's gradients over ``group``, in place.

    Ranks may differ in which task reached which parameter (a batch without some
    token, say): they agree on the union first, with zeros where one is missing.
    """
    rows = _any_rank([[p in grads for p in params] for grads in task_grads], group)
    world = dist.get_world_size(group)
    # Every rank lists the same tensors in the same order (task, then parameter).
    listed: list[Tensor] = []
    for task, grads in enumerate(task_grads):
        for k, p in enumerate(params):
            if not rows[task][k]:
                continue
            if p not in grads:
                bucket = buckets.get(p)
                if bucket is not None:
                    grads[p] = bucket.view(task, p)
                else:
                    grads[p] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            listed.append(grads[p])
    # One all-reduce of all tasks' gradients packed side by side (one per device
    # and dtype, so usually exactly one): a single round of communication per
    # step, instead of one per task or per tensor. The price is a flat copy of
    # the per-task gradients for the duration of the call.
    for tensors in group_by_device_dtype(listed).values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        torch._foreach_copy_(tensors, _unflatten_dense_tensors(flat, tensors))
