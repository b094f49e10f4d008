"""Optimizers for the demo: gradtools.AdamW by default, torch's AdamW, torch_optimizer's
Lamb and RAdam; any of them can be wrapped by gradtools.PCGrad."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

import gradtools
from bert_demo.training.speed import adamw_flags


class FeatureUnavailable(RuntimeError):
    """A flag asks for an optional package that is not installed."""


def make_optimizer(
    name: str, param_groups: Iterable[dict[str, Any]], weight_decay: float,
    adamw_impl: str = "for-loop",
) -> Optimizer:
    """Build the optimizer ``name`` over param groups that each carry their own lr.

    ``adamw_impl`` (fused, foreach, for-loop) picks gradtools.AdamW's implementation;
    resolve ``fused`` with :func:`bert_demo.training.speed.resolve_adamw_impl` first.
    """
    # A group may set its own weight decay (the loss weights of --weighting: none).
    groups = [{"weight_decay": weight_decay, **g} for g in param_groups]
    if name == "adamw":
        flags = adamw_flags(adamw_impl)
        return gradtools.AdamW(groups, fused=flags["fused"], foreach=flags["foreach"])
    if name == "torch-adamw":
        return torch.optim.AdamW(groups)
    if name in ("lamb", "radam"):
        try:
            import torch_optimizer
        except ImportError as e:
            raise FeatureUnavailable(
                f"--optimizer {name} needs the torch-optimizer package: "
                "pip install -e '.[bench]' in the clone"
            ) from e
        cls = torch_optimizer.Lamb if name == "lamb" else torch_optimizer.RAdam
        return cls(groups)
    raise ValueError(f"--optimizer must be adamw, torch-adamw, lamb or radam, got {name!r}")


def wrap_pcgrad(
    optimizer: Optimizer,
    generator: torch.Generator,
    process_group: torch.distributed.ProcessGroup | None = None,
) -> Optimizer:
    """gradtools.PCGrad around ``optimizer``, drawing task orders from ``generator``.

    ``process_group``: under torchrun, average each task's gradient over the
    processes before the surgery (see gradtools.PCGrad).
    """
    return gradtools.PCGrad(optimizer, generator=generator, process_group=process_group)


def make_schedule(
    optimizer: Optimizer, kind: str, total_steps: int, warmup_fraction: float
) -> LambdaLR:
    """constant: lr stays put. linear: linear warm-up, then linear decay to zero."""
    warmup = math.floor(total_steps * warmup_fraction)

    def factor(step: int) -> float:
        if kind == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return LambdaLR(optimizer, factor)


def wrap_aggregator(
    optimizer: Optimizer,
    name: str,
    generator: torch.Generator,
    process_group: torch.distributed.ProcessGroup | None = None,
) -> Optimizer:
    """gradtools.MultiTask around ``optimizer`` with the aggregator ``name`` (see
    :func:`gradtools.aggregation.available`); random aggregators draw from ``generator``."""
    return gradtools.MultiTask(optimizer, aggregator=name, generator=generator,
                               process_group=process_group)
