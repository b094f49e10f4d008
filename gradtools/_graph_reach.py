"""Which parameters each task's loss reaches, and which graphs must outlive their backward pass.

Reach is read from the autograd graph, before any backward pass: a leaf tensor
is reached by a loss when its ``AccumulateGrad`` node is below the loss's
``grad_fn``. That is exact for ordinary (eager) graphs. Some nodes are opaque:
a custom ``torch.autograd.Function`` (and the single node a ``torch.compile``'d
model's backward runs as) lists every input it saw, and may write zero
gradients into leaves the loss does not depend on (a compiled multi-head model
writes zeros into the other tasks' heads). A graph that contains such a node is
reported as ``opaque`` so the wrapper can check the gradients it gets instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["GraphReach", "analyse_graphs", "nonzero_gradients"]


@dataclass
class GraphReach:
    """What walking the losses' graphs found (one entry per loss).

    Attributes:
        needed_later: whether a later loss's backward pass goes through part of
            this loss's graph (so the graph must survive its own backward pass).
        leaves: the leaf tensors (parameters) each loss's graph reaches.
        opaque: whether the graph holds a node whose reach may be wider than the
            loss's real dependence (a custom or compiled autograd Function).
    """

    needed_later: list[bool]
    leaves: list[set[Tensor]]
    opaque: list[bool]


def analyse_graphs(losses: list[Tensor]) -> GraphReach:
    """Walk each loss's autograd graph once (see :class:`GraphReach`).

    Graphs that only meet at the leaves (separate batches) can be freed as soon
    as they are used; a node shared with a later loss keeps its graph alive.
    """
    needed_later = [False] * len(losses)
    reached: list[set[Tensor]] = [set() for _ in losses]
    opaque = [False] * len(losses)
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
            if isinstance(node, _CUSTOM_FUNCTION_NODE):
                opaque[task] = True
            for child, _ in node.next_functions:
                if child is None:
                    continue
                if type(child) is _ACCUMULATE_GRAD:
                    # A leaf's accumulator holds no saved tensors: meeting there is fine.
                    leaves.add(child.variable)  # type: ignore[attr-defined]
                else:
                    stack.append(child)
    return GraphReach(needed_later, reached, opaque)


def _accumulate_grad_type() -> type:
    leaf = torch.zeros(1, requires_grad=True)
    node = leaf.expand(2).grad_fn
    assert node is not None
    return type(node.next_functions[0][0])


_ACCUMULATE_GRAD = _accumulate_grad_type()
# Backward nodes of torch.autograd.Function subclasses, torch.compile's
# CompiledFunctionBackward among them.
_CUSTOM_FUNCTION_NODE = torch.autograd.function.BackwardCFunction


def nonzero_gradients(fresh: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """The (param, grad) pairs whose gradient is not exactly zero everywhere.

    For an opaque graph, an all-zero gradient is what its backward writes into
    a leaf the loss does not depend on, so such a leaf does not count as reached.
    One host sync per device.
    """
    if not fresh:
        return fresh
    by_device: dict[torch.device, list[int]] = {}
    for k, (_, g) in enumerate(fresh):
        by_device.setdefault(g.device, []).append(k)
    keep = [True] * len(fresh)
    for indices in by_device.values():
        counts = torch.stack([torch.count_nonzero(fresh[k][1]) for k in indices]).tolist()
        for k, count in zip(indices, counts, strict=True):
            keep[k] = count > 0
    return [pair for pair, kept in zip(fresh, keep, strict=True) if kept]
