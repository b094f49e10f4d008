"""gradtools.tensor_groups: the one (device, dtype) grouping helper."""

from __future__ import annotations

import torch

from gradtools.tensor_groups import group_by_device_dtype


def test_groups_keep_order_and_split_by_dtype_and_device() -> None:
    a = torch.zeros(2)
    b = torch.zeros(3, dtype=torch.float64)
    c = torch.ones(1)
    meta = torch.empty(2, device="meta")
    groups = group_by_device_dtype([a, b, c, meta])
    assert list(groups) == [
        (torch.device("cpu"), torch.float32),
        (torch.device("cpu"), torch.float64),
        (torch.device("meta"), torch.float32),
    ]
    cpu32 = groups[(torch.device("cpu"), torch.float32)]
    assert len(cpu32) == 2 and cpu32[0] is a and cpu32[1] is c


def test_items_can_be_grouped_through_a_key() -> None:
    params = [torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)]
    groups = group_by_device_dtype(range(len(params)), lambda i: params[i])
    assert groups == {
        (torch.device("cpu"), torch.float32): [0, 2],
        (torch.device("cpu"), torch.bfloat16): [1],
    }
