"""Per-task gradient storage, the Gram blocks of the task gradients, and their weighted sums.

Each task's gradient is kept either as the tensors autograd produced (one per
parameter: no copy) or, in a :class:`Bucket`, as slices of one flat row per
task and (device, dtype). The Gram matrix of the task gradients is built from
small blocks (one per bucket or parameter tensor) with one transfer to the
host; the combined gradient is one weighted sum per parameter. Nothing here
knows which method chose the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch._utils import _unflatten_dense_tensors

from gradtools.tensor_groups import group_by_device_dtype

__all__ = [
    "Bucket",
    "GramBlocks",
    "GramItem",
    "gradient_precision",
    "gram_blocks",
    "weighted_sum",
    "weighted_sum_float64",
    "weights_are_safe",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
# Task weights outside this range could overflow or underflow when multiplied
# into a float32 gradient; those (rare) parameters are combined in float64.
_SAFE_WEIGHT = 2.0**60
# Elements of the float64 buffer a Gram block is multiplied in (2 MiB: it stays in cache).
_MATMUL_CHUNK = 1 << 18


class GramItem:
    """Some tasks' gradients over one stretch of parameters, as flat vectors."""

    def __init__(self, vectors: list[tuple[int, Tensor]], numel: int) -> None:
        self.vectors = vectors
        self.numel = numel


class Bucket:
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
    ) -> dict[Tensor, Bucket]:
        """Buckets (one per device and dtype) for the parameters shared in this call's graphs."""
        bucketed = []
        for p in params:
            count = sum(p in leaves for leaves in reached)
            shared = id(p) in explicit_shared if explicit_shared is not None else count >= 2
            if shared and count and p.is_floating_point() and not p.is_sparse:
                bucketed.append(p)
        buckets: dict[Tensor, Bucket] = {}
        for group in group_by_device_dtype(bucketed).values():
            bucket = Bucket(group)
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

    def gram_item(self) -> GramItem:
        return GramItem([(t, self.rows[t]) for t in sorted(self.rows)], self.numel)

    def combine(self, weights: list[float]) -> list[tuple[Tensor, Tensor, bool]]:
        """Each parameter's slice of ``sum_t weights[t] * rows[t]``."""
        tasks = sorted(self.rows)
        w = [weights[t] for t in tasks]
        rows = [self.rows[t] for t in tasks]
        if not weights_are_safe(w):
            total = weighted_sum_float64(rows, w, self.dtype)
        else:
            total = weighted_sum([[row] for row in rows], w, self.dtype)[0]
        pieces = _unflatten_dense_tensors(total, self.params)
        return [(p, piece, True) for p, piece in zip(self.params, pieces, strict=True)]


@dataclass(frozen=True)
class GramBlocks:
    """Gram blocks of the task gradients, in a unit chosen so float64 can hold them.

    ``blocks[k]`` is item k's ``[T, T]`` Gram matrix divided by ``4 ** log2_unit``
    (the gradients measured in units of ``2 ** log2_unit``). The unit is 1
    (``log2_unit == 0``) except when float64 gradients are so large (|g| around
    1e154 and above) that their dot products overflow: then every block is
    recomputed with the gradients scaled by one power of two, which leaves the
    ratios the aggregators work on exact.
    """

    blocks: Tensor
    log2_unit: int = 0


def gradient_precision(items: list[GramItem]) -> float:
    """Relative accuracy of the gradients in ``items``: the machine epsilon of their coarsest dtype.

    A float32 model's gradients are rounded to float32 (and carry at least that
    much error from the backward pass), so the Gram entries describe the exact
    task gradients only to about this fraction of ``|g_i| |g_j|``, however
    exactly :func:`gram_blocks` multiplies them. The aggregators take their rank,
    existence and stationarity decisions at this precision. float64's epsilon
    when no item holds a gradient.
    """
    eps = [torch.finfo(v.dtype).eps for item in items for _, v in item.vectors]
    return max(eps, default=torch.finfo(torch.float64).eps)


def gram_blocks(items: list[GramItem], num_tasks: int) -> GramBlocks:
    """One Gram matrix per item, ``[I, T, T]`` (float64, on the CPU), accumulated in float64.

    Each block is computed where the gradients live, in float64 whatever the
    gradients' dtype: the product of two float32 (or half) numbers is exact in
    float64 and the sums round at 1e-16, so a block is the Gram matrix of the
    stored gradients to float64's accuracy. In float32 it would not be: its
    rounding (about 1e-7 of ``|g_i| |g_j|``) shows up as eigenvalues of that
    size, negative ones included, where the gradients are linearly dependent,
    and the dual-cone projections of UPGrad and DualProj then write a ``.grad``
    that conflicts with a task (issue 20). Each block is one matrix product per
    chunk of at most ``_MATMUL_CHUNK`` converted elements, so the float64 copy
    stays small; all blocks come to the host in one transfer per device.
    float64 blocks that overflow while their gradients are finite are
    recomputed in a common power-of-two unit (see :class:`GramBlocks`). Genuine
    inf/NaN gradients stay non-finite. The bookkeeping is plain Python: hundreds
    of tiny tensor writes would cost more than the products themselves on a GPU.
    """
    blocks = [[[0.0] * num_tasks for _ in range(num_tasks)] for _ in items]
    per_device: dict[torch.device, tuple[list[Tensor], list[tuple[int, int, int]]]] = {}
    for k, item in enumerate(items):
        if not item.vectors:
            continue
        values, where = per_device.setdefault(item.vectors[0][1].device, ([], []))
        values.append(_gram_in_float64([v for _, v in item.vectors], 1.0).reshape(-1))
        tasks = [t for t, _ in item.vectors]
        where.extend((k, i, j) for i in tasks for j in tasks)
    for values, where in per_device.values():
        flat = torch.cat(values).to(device="cpu", dtype=torch.float64).tolist()  # the host sync
        for (k, i, j), value in zip(where, flat, strict=True):
            if i <= j:  # one number for [i][j] and [j][i] (a product need not be symmetric)
                blocks[k][i][j] = value
                blocks[k][j][i] = value

    # Products of float32 (or half) numbers cannot leave float64's range: only
    # float64 gradients (or non-finite ones) give a non-finite block.
    overflowed = [
        k
        for k, item in enumerate(items)
        if item.vectors and any(not math.isfinite(x) for row in blocks[k] for x in row)
    ]
    log2_unit = 0
    if overflowed and _all_finite(items[k] for k in overflowed):
        log2_unit = _common_unit(items)
        if log2_unit != 0:
            factor = math.ldexp(1.0, -log2_unit)
            for k, item in enumerate(items):
                if not item.vectors:
                    continue
                scaled = _gram_in_float64([v for _, v in item.vectors], factor).cpu().tolist()
                tasks = [t for t, _ in item.vectors]
                for a, i in enumerate(tasks):
                    for b, j in enumerate(tasks[a:], start=a):
                        blocks[k][i][j] = blocks[k][j][i] = scaled[a][b]
    result = torch.tensor(blocks, dtype=torch.float64).reshape(len(items), num_tasks, num_tasks)
    return GramBlocks(result, log2_unit)


def _gram_in_float64(vectors: list[Tensor], factor: float) -> Tensor:
    """``[k, k]`` float64 Gram matrix of k flat vectors (each multiplied by ``factor``).

    One matrix product per chunk: the chunk of all k rows is copied (and
    converted) into a float64 buffer, then multiplied by its transpose. k(k+1)/2
    separate dot products would read every gradient k times over (memory-bound:
    at T = 10 that is most of the wrapper's cost); this reads each once. The
    buffer bounds the float64 copy to about ``_MATMUL_CHUNK`` elements; a block
    that fits in one chunk (most tensors under ``granularity="tensor"``) is
    stacked and converted in two kernels instead.
    """
    count = len(vectors)
    numel = vectors[0].numel()
    if numel * count <= _MATMUL_CHUNK:
        rows = torch.stack(vectors).to(torch.float64)
        if factor != 1.0:
            rows.mul_(factor)
        return rows @ rows.T
    step = max(1, _MATMUL_CHUNK // count)
    buffer = torch.empty(count, step, dtype=torch.float64, device=vectors[0].device)
    total = torch.zeros(count, count, dtype=torch.float64, device=vectors[0].device)
    for start in range(0, numel, step):
        width = min(step, numel - start)
        rows = buffer[:, :width]
        for r, v in enumerate(vectors):
            rows[r].copy_(v[start : start + width])
        if factor != 1.0:
            rows.mul_(factor)
        total.addmm_(rows, rows.T)
    return total


def _all_finite(items: object) -> bool:
    return all(bool(torch.isfinite(v).all()) for item in items for _, v in item.vectors)  # type: ignore[attr-defined]


def _common_unit(items: list[GramItem]) -> int:
    """The power of two that brings the largest gradient entry into [0.5, 1)."""
    largest = max(
        (float(v.abs().max()) for item in items for _, v in item.vectors if v.numel()),
        default=0.0,
    )
    if largest == 0.0 or not math.isfinite(largest):
        return 0
    return math.frexp(largest)[1]


def weights_are_safe(weights: list[float]) -> bool:
    """Whether every weight can multiply a float32 gradient without leaving its range."""
    return all(w == 0.0 or 1 / _SAFE_WEIGHT <= abs(w) <= _SAFE_WEIGHT for w in weights)


def weighted_sum(
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


def weighted_sum_float64(grads: list[Tensor], weights: list[float], dtype: torch.dtype) -> Tensor:
    """``sum_t weights[t] * grads[t]`` accumulated in float64, returned as ``dtype``."""
    total = torch.zeros_like(grads[0], dtype=torch.float64)
    for g, w in zip(grads, weights, strict=True):
        total.add_(g.to(torch.float64), alpha=w)
    return total.to(dtype)
