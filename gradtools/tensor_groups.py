"""Group tensors by (device, dtype): what foreach kernels and flat buffers need.

``torch._foreach_*`` kernels, ``torch.cat`` into one flat buffer and one
collective call per buffer all require their tensors on one device and of one
dtype, so several places in gradtools split their lists this way first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["DeviceDtype", "group_by_device_dtype"]

T = TypeVar("T")
DeviceDtype = tuple[torch.device, torch.dtype]


def group_by_device_dtype(
    items: Iterable[T], tensor_of: Callable[[T], Tensor] | None = None
) -> dict[DeviceDtype, list[T]]:
    """Split ``items`` by the device and dtype of their tensor, keeping their order.

    ``tensor_of`` maps an item to its tensor (default: the item is the tensor),
    so indices or (param, grad) pairs can be grouped too, e.g.
    ``group_by_device_dtype(range(len(params)), lambda i: params[i])``.
    Groups come out in the order their first item appears.
    """
    groups: dict[DeviceDtype, list[T]] = {}
    for item in items:
        tensor = item if tensor_of is None else tensor_of(item)
        assert isinstance(tensor, Tensor)
        groups.setdefault((tensor.device, tensor.dtype), []).append(item)
    return groups
