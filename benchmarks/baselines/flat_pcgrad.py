"""PCGrad the way it is usually written, as a speed/memory baseline.

The common pattern in public PCGrad code: one ``backward(retain_graph=True)``
per task, each task's gradients copied out of ``.grad`` and concatenated into a
flat vector the size of the model, a Python loop over task pairs that decides
each projection on the host (one device sync per pair), then the merged vector
split back into ``.grad``. We keep its cost structure but not its known bugs:
a task is never compared with itself, only parameters that two or more tasks
reach are projected, and the reduction is the same on every parameter.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor


class FlatPCGrad:
    """Flatten-and-loop PCGrad around an inner optimizer (benchmark baseline)."""

    def __init__(self, optimizer: torch.optim.Optimizer, reduction: str = "sum", seed: int = 0):
        self.optimizer = optimizer
        self.reduction = reduction
        self.rng = random.Random(seed)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.optimizer.step()

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def backward(self, losses: list[Tensor]) -> None:
        params = self._params()
        flats: list[Tensor] = []
        reached: list[Tensor] = []
        for loss in losses:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward(retain_graph=True)
            # Copy every gradient into one model-sized vector (zeros where None).
            flats.append(
                torch.cat(
                    [
                        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                        for p in params
                    ]
                )
            )
            reached.append(
                torch.cat(
                    [torch.full((p.numel(),), p.grad is not None, device=p.device) for p in params]
                )
            )
        num_tasks = len(losses)
        projected = [g.clone() for g in flats]
        for i in range(num_tasks):
            others = [j for j in range(num_tasks) if j != i]
            self.rng.shuffle(others)
            for j in others:
                dot = torch.dot(projected[i], flats[j])
                if dot < 0:  # a host sync for every pair
                    projected[i] -= dot / flats[j].norm() ** 2 * flats[j]
        shared = torch.stack(reached).sum(0) >= 2
        merged = torch.stack(flats).sum(0)
        merged[shared] = torch.stack([g[shared] for g in projected]).sum(0)
        if self.reduction == "mean":
            merged /= num_tasks
        ever = torch.stack(reached).any(0)
        offset = 0
        for p in params:
            n = p.numel()
            if bool(ever[offset : offset + n].any()):
                p.grad = merged[offset : offset + n].view_as(p).clone()
            else:
                p.grad = None
            offset += n
