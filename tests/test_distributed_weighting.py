"""gradtools.weighting under data parallelism: two gloo ranks keep identical state, equal to
one process that sees the union (the mean of the ranks' losses)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from rank_launcher import run_ranks
from test_weighting import T, TwoLayer, _drive, loss_sequence

from gradtools import weighting as wt

WORLD = 2


def makers(group: dist.ProcessGroup | None) -> dict[str, Any]:
    return {
        "uncertainty": lambda: wt.UncertaintyWeighting(T, process_group=group),
        "imtl-l": lambda: wt.IMTLL(T, process_group=group),
        "dwa": lambda: wt.DWA(T, process_group=group),
        "rlw": lambda: wt.RLW(T, seed=11, process_group=group),
        "famo": lambda: wt.FAMO(T, process_group=group),
    }


def rank_losses(rank: int) -> list[torch.Tensor]:
    # Each rank sees different losses; their mean is the union's.
    return [v * (1.0 + 0.5 * rank) for v in loss_sequence(8, seed=9)]


def union_losses() -> list[torch.Tensor]:
    return [(a + b) / 2 for a, b in zip(rank_losses(0), rank_losses(1), strict=True)]


def gradnorm_grad(model: TwoLayer, x: torch.Tensor, y: torch.Tensor, group: Any) -> torch.Tensor:
    weighting = wt.GradNorm(T, shared=list(model.shared.parameters()), process_group=group)
    weighting(model.losses(x, y))
    assert weighting.loss_weights.grad is not None
    return weighting.loss_weights.grad.clone()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, 4, generator=g), torch.randn(8, generator=g)


def _worker(rank: int, world: int, out_dir: str) -> None:
    results: dict[str, Any] = {}
    for name, make in makers(dist.group.WORLD).items():
        weighting = make()
        results[name] = {
            "weights": _drive(weighting, rank_losses(rank)),
            "state": weighting.state_dict(),
        }
    x, y = batch()
    half = slice(rank * 4, rank * 4 + 4)
    results["gradnorm"] = gradnorm_grad(TwoLayer(), x[half], y[half], dist.group.WORLD)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow  # two spawned processes importing torch
def test_weightings_stay_identical_across_ranks_and_equal_the_union(tmp_path: Path) -> None:
    run_ranks(_worker, WORLD, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for name, make in makers(None).items():
        expected = _drive(make(), union_losses())
        for result in ranks:
            for got, want in zip(result[name]["weights"], expected, strict=True):
                torch.testing.assert_close(got, want, msg=name)
            for key, value in result[name]["state"].items():
                if isinstance(value, torch.Tensor):
                    other = ranks[0][name]["state"][key]
                    torch.testing.assert_close(value, other, rtol=0, atol=0, equal_nan=True)
    x, y = batch()
    expected_grad = gradnorm_grad(TwoLayer(), x, y, None)
    for result in ranks:
        torch.testing.assert_close(result["gradnorm"], expected_grad)
