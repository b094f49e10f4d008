"""The two-task toy problem of the CAGrad and Nash-MTL papers, for every aggregator.

Two losses of a 2-d parameter x, a valley and a Pareto front (the segment near
x2 = -8, -7 <= x1 <= 7). Each aggregator drives x through
``MultiTask(torch.optim.Adam([x], lr))`` from the Nash-MTL paper's five starts,
and every trajectory is drawn on the loss plane (f1, f2) over the front.

Facts taken from the official code (rewritten here, not copied):
- the losses: Nash-MTL's ``experiments/toy/problem.py`` (class ``Toy``, itself
  CAGrad's ``toy.py`` with the first loss scaled): ``scale=0.1`` for f1 as in
  Nash-MTL's ``experiments/toy/trainer.py``; CAGrad's own toy has scale 1;
- the starts, Adam's lr (1e-3) and 35,000 steps: Nash-MTL's
  ``experiments/toy/trainer.py`` (CAGrad's ``toy.py`` uses three of them,
  (-8.5, 7.5), (-8.5, -5), (9, 9), and 100,000 steps);
- CAGrad's c = 0.4: Nash-MTL's ``experiments/utils.py`` default (ours too).

    python examples/toy_pareto.py                      # the papers' length (35,000 steps)
    python examples/toy_pareto.py --steps 300 --lr 0.05 --out /tmp/toy.png   # a quick look

docs/images/toy_pareto.png is ``--steps 3500 --lr 0.01 --aggregators sum pcgrad
cagrad mgda nashmtl fairgrad upgrad imtlg`` (Adam covers the same distance as
35,000 steps of 1e-3; about 1 ms per MultiTask step on one CPU thread).

Prints, per aggregator and start, the final losses and the distance (in the
loss plane) to the Pareto front, computed on a grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradtools
from gradtools import aggregation as agg

# Nash-MTL's five starts (x1, x2).
STARTS = [(-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)]
SCALE = 0.1  # the first loss's factor in Nash-MTL's toy
FLOOR = 5e-6  # the official code clamps |.| at this before the log
# Aggregators shown reaching the front from all five starts of this toy in the
# Nash-MTL paper's figure (its code's misc/toy_pareto_2d.png): Nash-MTL and
# MGDA; FairGrad(alpha=1) solves Nash-MTL's equation. CAGrad's and UPGrad's
# convergence theorems need convexity: from (9, 9) CAGrad stays in the valley
# in that figure (as LS and PCGrad do) and in ours (UPGrad too).
CLAIMS_FRONT = ("mgda", "nashmtl", "fairgrad")
# Distance in the loss plane under which an endpoint counts as on the front.
FRONT_TOLERANCE = 0.05


def toy_losses(x: Tensor, scale: float = SCALE) -> tuple[Tensor, Tensor]:
    """The two losses at x = (x1, x2): log valleys for x2 > 0, quadratics for x2 < 0."""
    x1, x2 = x[0], x[1]
    log1 = ((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs().clamp(min=FLOOR)).log() + 6
    log2 = ((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs().clamp(min=FLOOR)).log() + 6
    quad1 = ((x1 - 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    quad2 = ((x1 + 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
    upper = torch.tanh(0.5 * x2).clamp(min=0)
    lower = torch.tanh(-0.5 * x2).clamp(min=0)
    f1 = (log1 * upper + quad1 * lower) * scale
    f2 = log2 * upper + quad2 * lower
    return f1, f2


def trajectory(name: str, start: tuple[float, float], steps: int, lr: float) -> np.ndarray:
    """x after each of ``steps`` MultiTask(Adam) steps from ``start``: ``[steps + 1, 2]``."""
    x = torch.nn.Parameter(torch.tensor(start, dtype=torch.float32))
    opt = gradtools.MultiTask(
        torch.optim.Adam([x], lr=lr),
        agg.from_name(name),
        generator=torch.Generator().manual_seed(0),
    )
    points = np.empty((steps + 1, 2))
    points[0] = start
    for step in range(steps):
        opt.zero_grad()
        opt.backward(list(toy_losses(x)))
        opt.step()
        points[step + 1] = x.detach().numpy()
    return points


def losses_at(points: np.ndarray) -> np.ndarray:
    """``[N, 2]`` losses of ``[N, 2]`` points (float64)."""
    f1, f2 = toy_losses(torch.from_numpy(points).T.to(torch.float64))
    return torch.stack([f1, f2], -1).numpy()


def pareto_front(resolution: int = 801) -> np.ndarray:
    """The non-dominated losses of a grid over the front's region, sorted by f1."""
    x1, x2 = np.meshgrid(np.linspace(-8, 8, resolution), np.linspace(-12, -4, resolution))
    losses = losses_at(np.stack([x1.ravel(), x2.ravel()], -1))
    losses = losses[np.lexsort((losses[:, 1], losses[:, 0]))]
    keep = losses[:, 1] < np.minimum.accumulate(np.r_[np.inf, losses[:-1, 1]])
    return losses[keep]


def distance_to_front(losses: np.ndarray, front: np.ndarray) -> float:
    """Distance of one loss pair to the front; 0 when it dominates part of the grid front."""
    if ((front >= losses).all(-1)).any():
        return 0.0
    return float(np.sqrt(((front - losses) ** 2).sum(-1)).min())


def plot(runs: dict[str, list[np.ndarray]], front: np.ndarray, out: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 5
    rows = -(-len(runs) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.0 * rows), squeeze=False)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(STARTS)))
    for ax, (name, paths) in zip(axes.ravel(), runs.items(), strict=False):
        ax.plot(front[:, 0], front[:, 1], color="black", lw=2, label="Pareto front")
        for color, path in zip(colors, paths, strict=True):
            losses = losses_at(path)
            label = f"start ({path[0, 0]:g}, {path[0, 1]:g})"
            ax.plot(losses[:, 0], losses[:, 1], color=color, lw=1, label=label)
            ax.scatter(*losses[0], color=color, s=12)
            ax.scatter(*losses[-1], color=color, marker="*", s=60, edgecolor="black", lw=0.5)
        ax.set_title(name)
        ax.set_xlabel("f1 (x 0.1)")
        ax.set_ylabel("f2")
    spare = axes.ravel()[len(runs) :]
    for ax in spare:
        ax.axis("off")
    # The legend goes where no trajectory is: a spare panel, or else outside the last row.
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    if len(spare):
        spare[0].legend(handles, labels, loc="center", fontsize=9)
    else:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=35_000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--aggregators", nargs="+", default=agg.available())
    parser.add_argument(
        "--starts", type=int, nargs="+", default=list(range(len(STARTS))), help="indices"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/images/toy_pareto.png"))
    args = parser.parse_args(argv)
    front = pareto_front()
    runs: dict[str, list[np.ndarray]] = {}
    distances: dict[str, list[float]] = {}
    for name in args.aggregators:
        runs[name] = [trajectory(name, STARTS[i], args.steps, args.lr) for i in args.starts]
        distances[name] = []
        for i, path in zip(args.starts, runs[name], strict=True):
            end = losses_at(path[-1:])[0]
            distance = distance_to_front(end, front)
            distances[name].append(distance)
            mark = "front" if distance <= FRONT_TOLERANCE else "off"
            print(
                f"{name:10s} start {STARTS[i]!s:12s} -> x ({path[-1, 0]:7.3f}, {path[-1, 1]:7.3f})"
                f" losses ({end[0]:8.4f}, {end[1]:8.4f}) distance {distance:.4f} {mark}"
            )
    for name in CLAIMS_FRONT:
        if name in distances:
            reached = sum(d <= FRONT_TOLERANCE for d in distances[name])
            print(f"{name}: on the front from {reached} of {len(distances[name])} starts")
    title = f"MultiTask(Adam(lr={args.lr:g})), {args.steps} steps; stars: endpoints"
    plot(runs, front, args.out, title)
    print(f"wrote {args.out}")
    return distances


if __name__ == "__main__":
    main()
