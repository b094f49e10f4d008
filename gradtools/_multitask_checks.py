"""Validation of what a user hands the multi-task wrapper: errors that name the argument.

Everything here raises before anything is changed (no backward pass, no
gradient written), with a ``TypeError`` for a wrong kind of value and a
``ValueError`` for a wrong value, and a message that names the argument
(``granularity``, ``shared_params[1]``, ``losses[2]``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from gradtools import aggregation as agg

__all__ = ["check_settings", "checked_aggregator", "checked_losses", "checked_shared_params"]


def check_settings(
    optimizer: object,
    granularity: object,
    generator: object,
    process_group: object,
    gradient_buckets: object,
    plain_backward: object,
) -> None:
    """Check the wrapper's constructor arguments other than the aggregator and ``shared_params``."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    if granularity not in ("all", "group", "tensor"):
        raise ValueError(f"granularity must be 'all', 'group' or 'tensor', got {granularity!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (draws are made on the host), "
            f"got one on {generator.device}"
        )
    if process_group is not None and not (
        dist.is_available() and isinstance(process_group, dist.ProcessGroup)
    ):
        raise TypeError(
            "process_group must be a torch.distributed.ProcessGroup or None, "
            f"got {type(process_group).__name__}"
        )
    if gradient_buckets is not None and not isinstance(gradient_buckets, bool):
        raise TypeError(f"gradient_buckets must be True, False or None, got {gradient_buckets!r}")
    if gradient_buckets and granularity != "all":
        raise ValueError(
            f"gradient_buckets=True needs granularity='all' (got {granularity!r}): "
            "per-group or per-tensor Gram matrices need per-tensor storage"
        )
    if plain_backward not in ("warn", "error", "ignore"):
        raise ValueError(
            f"plain_backward must be 'warn', 'error' or 'ignore', got {plain_backward!r}"
        )


def checked_aggregator(aggregator: object) -> agg.Aggregator:
    """An aggregator instance, or the registry entry of its name."""
    if isinstance(aggregator, str):
        try:
            return agg.from_name(aggregator)
        except ValueError as error:
            raise ValueError(f"aggregator: {error}") from None
    if isinstance(aggregator, type) and issubclass(aggregator, agg.Aggregator):
        raise TypeError(
            f"aggregator must be an instance, got the class {aggregator.__name__}; "
            f"write {aggregator.__name__}()"
        )
    if not isinstance(aggregator, agg.Aggregator):
        raise TypeError(
            "aggregator must be a gradtools.aggregation.Aggregator or a registry name "
            f"(one of {', '.join(agg.available())}), got {type(aggregator).__name__}"
        )
    return aggregator


def checked_shared_params(
    shared_params: Iterable[Tensor] | None, params: list[Tensor]
) -> set[int] | None:
    """The ids of the explicitly shared parameters (``None``: detect them from the graphs)."""
    if shared_params is None:
        return None
    if isinstance(shared_params, Tensor):
        raise TypeError(
            "shared_params must be an iterable of parameters, got a single Tensor; "
            "wrap it in a list"
        )
    if not isinstance(shared_params, Iterable):
        raise TypeError(
            f"shared_params must be an iterable of parameters, got {type(shared_params).__name__}"
        )
    chosen = list(shared_params)
    for k, p in enumerate(chosen):
        if not isinstance(p, Tensor):
            raise TypeError(f"shared_params[{k}] must be a Tensor, got {type(p).__name__}")
    ids = {id(p) for p in chosen}
    if not ids <= {id(p) for p in params}:
        raise ValueError("shared_params holds tensors that are not in the optimizer")
    return ids


def checked_losses(losses: Sequence[Tensor] | Tensor) -> list[Tensor]:
    """The losses as a list, after checking each is a differentiable float scalar on one device.

    A 1-D tensor of T losses (``torch.stack(losses)``, as torchjd users pass) is
    split into its T elements.
    """
    if isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(
                "losses must be a sequence of scalar losses or a 1-D tensor of T losses, "
                f"got a tensor of shape {list(losses.shape)}"
            )
        losses = list(losses.unbind())
    else:
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
