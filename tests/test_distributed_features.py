"""``backward(losses, features=h)`` under data parallelism: two gloo processes on the CPU.

Each rank holds half of one shared batch and its task losses are means over its
half; the union's loss is the mean over ranks. The union's feature gradient is
then rank r's divided by R on rank r's rows, so the union Gram is the sum of the
ranks' Grams over R**2: the wrapper reduces that T x T matrix (never the
features), every rank gets the same weights, runs its own encoder pass, and the
step's gradients are averaged. The reference runs one process on the union batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rank_launcher import run_ranks
from test_distributed import CollectiveLog
from torch import Tensor, nn

import gradtools
from gradtools import aggregation as agg

WORLD = 2
STEPS = 3
ROWS_PER_RANK = 4
SIGNS = (1.0, -0.8, 1.2)
WIDTH = 8


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(5, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh()
        )
        self.heads = nn.ModuleList(nn.Linear(WIDTH, 1) for _ in SIGNS)


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def global_batch(step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    rows = WORLD * ROWS_PER_RANK
    return torch.randn(rows, 5, generator=g), torch.randn(rows, generator=g)


def run_step(net: Net, opt: gradtools.MultiTask, x: Tensor, y: Tensor) -> None:
    opt.zero_grad()
    h = net.encoder(x)
    losses = [
        F.mse_loss(head(h).squeeze(-1), s * y) for head, s in zip(net.heads, SIGNS, strict=True)
    ]
    opt.backward(losses, features=h)
    opt.step()


def _worker(rank: int, world: int, out_dir: str) -> None:
    net = make_net()
    opt = gradtools.MultiTask(
        torch.optim.SGD(net.parameters(), lr=0.1), agg.UPGrad(), process_group=dist.group.WORLD
    )
    weights, collectives = [], []
    for step in range(STEPS):
        x, y = global_batch(step)
        rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
        log = CollectiveLog()
        with log.installed():
            run_step(net, opt, x[rows], y[rows])
        assert opt.stats is not None
        weights.append(opt.stats.weights.clone())
        collectives.append(log.calls)
    result: dict[str, Any] = {
        "params": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "weights": weights,
        "collectives": collectives,
    }
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow  # two spawned processes importing torch
def test_features_data_parallel_equals_one_process_on_the_union(tmp_path: Path) -> None:
    run_ranks(_worker, WORLD, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    net = make_net()
    opt = gradtools.MultiTask(torch.optim.SGD(net.parameters(), lr=0.1), agg.UPGrad())
    expected_weights = []
    for step in range(STEPS):
        run_step(net, opt, *global_batch(step))
        assert opt.stats is not None
        expected_weights.append(opt.stats.weights.clone())

    num_params = sum(p.numel() for p in net.parameters())
    for result in ranks:
        for name, want in net.state_dict().items():
            torch.testing.assert_close(result["params"][name], want, rtol=0, atol=1e-6)
            assert torch.equal(result["params"][name], ranks[0]["params"][name])
        for got, want in zip(result["weights"], expected_weights, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        # What travels: the T x T Gram, then the step's gradients once (as a plain
        # data-parallel step would), and a small flag message; never the features.
        for calls in result["collectives"]:
            floats = sorted(c[2] for c in calls if c[1].is_floating_point)
            assert floats == [len(SIGNS) ** 2, num_params], calls
