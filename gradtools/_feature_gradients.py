"""Representation-level task gradients: the plumbing behind ``MultiTask.backward(..., features=h)``.

When every task's loss is computed from shared features ``h`` (one batch through
a shared encoder, one head per task), each task's gradient with respect to ``h``
costs a backward pass through its head only. Their Gram matrix (T x T, summed
over the feature tensors, the micro-batches of an accumulated step and, under
DDP, the ranks) goes to the aggregator, and the encoder gets ONE backward pass
of the combined feature gradient ``sum_t w_t dL_t/dh``. By the chain rule that
is ``sum_t w_t J^T dL_t/dh = sum_t w_t g_t`` with ``g_t`` task t's exact
gradient of the encoder parameters: the exact combination of the task
gradients, with weights chosen from the feature gradients (MGDA-UB's
approximation, Sener & Koltun 2018, generalised to every Gram-based method).

Nothing here chooses weights; :mod:`gradtools.multitask` calls these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from gradtools._collectives import collective_device
from gradtools._graph_reach import _ACCUMULATE_GRAD
from gradtools._task_gradients import GramItem, gram_blocks

__all__ = [
    "FeatureBatch",
    "FeatureStep",
    "checked_features",
    "feature_gram",
    "feature_reach",
    "reduce_gram",
]


def checked_features(features: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """The feature tensors as a list; errors name ``features`` (or ``features[k]``)."""
    if isinstance(features, Tensor):
        listed = [features]
        names = ["features"]
    elif isinstance(features, Sequence) and not isinstance(features, str):
        listed = list(features)
        names = [f"features[{k}]" for k in range(len(listed))]
        if not listed:
            raise ValueError(
                "features is empty: pass the tensor(s) every task's loss is computed from"
            )
    else:
        raise TypeError(
            f"features must be a Tensor or a sequence of Tensors, got {type(features).__name__}"
        )
    seen: set[int] = set()
    for name, h in zip(names, listed, strict=True):
        if not isinstance(h, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(h).__name__}")
        if not h.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {h.dtype}")
        if not h.requires_grad:
            raise ValueError(
                f"{name} does not require grad: pass the encoder's output as computed "
                "(not detached, not under torch.no_grad())"
            )
        if id(h) in seen:
            raise ValueError(f"{name} is listed twice")
        seen.add(id(h))
    return listed


@dataclass
class FeatureReach:
    """How each loss reaches the features (one entry per loss).

    Attributes:
        features: per loss, the indices of the feature tensors it depends on.
        direct: per loss, the leaves (parameters) it reaches without going
            through a feature tensor: its head's parameters.
        needed_later: per loss, whether a later loss's head pass goes through a
            node of this loss's head graph (then that graph must be kept).
    """

    features: list[list[int]]
    direct: list[set[Tensor]]
    needed_later: list[bool]


def feature_reach(losses: list[Tensor], features: list[Tensor]) -> FeatureReach:
    """Walk each loss's graph down to the features (never below them).

    A feature tensor is found by its graph edge (its ``grad_fn`` and output
    index, or a leaf's ``AccumulateGrad`` node); the walk does not enter the
    encoder behind it.
    """
    # Each feature's graph edge: its (grad_fn, output index), or a leaf's accumulator
    # (two outputs of one node, e.g. torch.unbind, are two different features).
    key_of: dict[tuple[Any, int], int] = {}
    for k, h in enumerate(features):
        if h.grad_fn is None:
            key_of[(h.view_as(h).grad_fn.next_functions[0][0], 0)] = k  # type: ignore[union-attr]
        else:
            key_of[(h.grad_fn, h.output_nr)] = k
    reached_features: list[list[int]] = []
    direct: list[set[Tensor]] = []
    needed_later = [False] * len(losses)
    last_visitor: dict[Any, int] = {}
    for task, loss in enumerate(losses):
        found: set[int] = set()
        leaves: set[Tensor] = set()
        stack = []
        own = key_of.get((loss.grad_fn, loss.output_nr))
        if own is not None:  # the loss is itself a feature
            found.add(own)
        elif loss.grad_fn is not None:
            stack.append(loss.grad_fn)
        while stack:
            node = stack.pop()
            previous = last_visitor.get(node)
            if previous == task:
                continue
            if previous is not None:
                needed_later[previous] = True
            last_visitor[node] = task
            for child, output_nr in node.next_functions:
                if child is None:
                    continue
                hit = key_of.get((child, output_nr))
                if hit is not None:
                    found.add(hit)
                elif type(child) is _ACCUMULATE_GRAD:
                    leaves.add(child.variable)  # type: ignore[attr-defined]
                else:
                    stack.append(child)
        reached_features.append(sorted(found))
        direct.append(leaves)
    return FeatureReach(reached_features, direct, needed_later)


@dataclass
class FeatureBatch:
    """One ``backward(..., features=...)`` call's features and per-task feature gradients.

    ``grads[k]`` is ``[T, *features[k].shape]``: row t is dL_t/dh_k (zeros where
    task t does not use h_k). The features keep the encoder's graph alive until
    the combined feature gradient has been backpropagated through it.
    """

    features: list[Tensor]
    grads: list[Tensor]


@dataclass
class FeatureStep:
    """What an accumulated step keeps for the representation-level path."""

    batches: list[FeatureBatch] = field(default_factory=list)
    gram: Tensor | None = None  # float64 [T, T] on the CPU, summed over batches (local)
    # Whether the encoder pass may free the graphs (no later backward() in this step
    # can need them): set when the user passes retain_graph=False.
    free_graphs: bool = False


def feature_gradients(
    losses: list[Tensor],
    features: list[Tensor],
    reach: FeatureReach,
    retain_graph: bool | None,
) -> tuple[list[Tensor], list[dict[Tensor, Tensor]]]:
    """Each task's gradient w.r.t. the features and its head parameters (through its head only).

    Returns ``grads`` (one ``[T, *h.shape]`` tensor per feature) and, per task,
    its head parameters' gradients. The encoder graph is never entered, so it
    stays alive for the combined pass.
    """
    rows: list[list[Tensor | None]] = [[None] * len(losses) for _ in features]
    heads: list[dict[Tensor, Tensor]] = []
    for task, loss in enumerate(losses):
        used = reach.features[task]
        params = sorted(reach.direct[task], key=id)
        inputs = [features[k] for k in used] + params
        keep = reach.needed_later[task] if retain_graph is None else retain_graph
        results = torch.autograd.grad(loss, inputs, retain_graph=keep, allow_unused=True)
        for k, g in zip(used, results[: len(used)], strict=True):
            rows[k][task] = g
        heads.append(
            {p: g for p, g in zip(params, results[len(used) :], strict=True) if g is not None}
        )
    # One stacked copy per feature (no zero-fill first): the Gram's matrix product
    # and the combination both read the [T, n] rows.
    grads = [
        torch.stack([torch.zeros_like(h) if g is None else g for g in per_task])
        for h, per_task in zip(features, rows, strict=True)
    ]
    return grads, heads


# Columns per matrix product: each chunk's float32 product is summed in float64,
# so rounding grows with the chunk, not with the number of features.
_GRAM_CHUNK = 1 << 16


def feature_gram(grads: list[Tensor]) -> Tensor:
    """The ``[T, T]`` Gram matrix (float64, CPU) of the rows of ``grads`` (one ``[T, ...]`` per feature).

    The rows are already side by side, so this is a few matrix products on the
    device (no copy), each chunk's product added in float64. When the float32
    result may be inaccurate (non-finite, squared norms down where float32's
    products turn subnormal, or task gradients close to linearly dependent, where
    rounding would decide the rank) it falls back to the wrapper's exact float64
    :func:`gradtools._task_gradients.gram_blocks`.
    """
    num_tasks = grads[0].shape[0]
    flats = [g.reshape(num_tasks, -1) for g in grads]
    total = torch.zeros(num_tasks, num_tasks, dtype=torch.float64, device=flats[0].device)
    for flat in flats:
        wide = flat if flat.dtype == torch.float64 else flat.float()
        for start in range(0, wide.shape[1], _GRAM_CHUNK):
            chunk = wide[:, start : start + _GRAM_CHUNK]
            total += (chunk @ chunk.T).double()
    gram = total.cpu()
    numel = sum(f.shape[1] for f in flats)
    floor = numel * torch.finfo(torch.float32).tiny * 2.0**26
    if (bool(torch.isfinite(gram).all()) and bool((gram.diagonal() >= floor).all())
            and (flats[0].dtype == torch.float64 or _well_conditioned(gram))):
        return gram
    items = [GramItem([(t, row) for t, row in enumerate(f)], f.shape[1]) for f in flats]
    careful = gram_blocks(items, num_tasks)
    return torch.ldexp(careful.blocks.sum(0), torch.tensor(2 * careful.log2_unit))


# Smallest eigenvalue of the correlation matrix below which float32 products are not
# trusted: their rounding (about sqrt(n) * 6e-8 of |g_i| |g_j|) would decide the rank
# and the active set of dependent or near-duplicate task gradients, which the exact
# aggregators (UPGrad, DualProj, MGDA) read as signal.
_WELL_CONDITIONED = 1e-3


def _well_conditioned(gram: Tensor) -> bool:
    """Whether a float32-product Gram is far enough from singular to be used as it is."""
    norms = gram.diagonal().sqrt()
    corr = gram / (norms.unsqueeze(0) * norms.unsqueeze(1))
    return bool(torch.linalg.eigvalsh(corr)[0] >= _WELL_CONDITIONED)


def reduce_gram(gram: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The Gram matrix of the union batch from each rank's own ``[T, T]`` Gram.

    Rank r's task loss is the mean over its own samples, and the union loss the
    mean over ranks, so the union's feature gradient is rank r's divided by R
    on rank r's rows: the union Gram is ``sum_r G_r / R**2``. Only this T x T
    matrix travels, never the features or their gradients.
    """
    world = dist.get_world_size(group)
    shipped = gram.to(collective_device(group))
    dist.all_reduce(shipped, group=group)
    return shipped.cpu() / world**2


def average_grads(params: list[Tensor], group: dist.ProcessGroup) -> None:
    """Average the step's ``.grad`` over the ranks, in one all-reduce per dtype.

    Ranks agree first on which parameters hold a gradient on any rank (a head no
    sample of this rank used gets zeros), so every rank lists the same tensors.
    """
    flags = torch.tensor(
        [p.grad is not None for p in params], dtype=torch.uint8, device=collective_device(group)
    )
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    listed = []
    for p, flag in zip(params, flags.cpu().tolist(), strict=True):
        if not flag:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        listed.append(p.grad)
    world = dist.get_world_size(group)
    by_dtype: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in listed:
        by_dtype.setdefault((g.device, g.dtype), []).append(g)
    for tensors in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
