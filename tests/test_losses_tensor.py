"""``opt.backward`` takes a 1-D tensor of T losses (as torchjd users pass) like a list of them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradtools
from gradtools import aggregation as agg


@pytest.mark.parametrize("name", ["upgrad", "pcgrad", "mean", "mgda"])
def test_a_stacked_tensor_of_losses_equals_the_list(name: str) -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(3))
    params = [*trunk.parameters(), *heads.parameters()]
    x, y = torch.randn(10, 4), torch.randn(10)

    def losses() -> list[torch.Tensor]:
        z = trunk(x)
        return [
            F.mse_loss(h(z).squeeze(-1), s * y)
            for h, s in zip(heads, (1.0, -1.0, 0.5), strict=True)
        ]

    grads = []
    for as_tensor in (False, True):
        opt = gradtools.MultiTask(
            torch.optim.SGD(params, lr=0.1),
            agg.from_name(name),
            generator=torch.Generator().manual_seed(3),
        )
        opt.zero_grad()
        listed = losses()
        opt.backward(torch.stack(listed) if as_tensor else listed)
        grads.append([p.grad.clone() for p in params])
        assert opt.stats is not None and opt.stats.num_shared == 2  # the heads are not shared
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
