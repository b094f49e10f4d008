"""Many tasks on one shared batch: representation-level aggregation or a loss weighting.

    python examples/shared_batch.py                              # UPGrad on the features
    python examples/shared_batch.py --aggregator mgda            # MGDA-UB
    python examples/shared_batch.py --weighting uncertainty      # a loss weighting instead
    python examples/shared_batch.py --steps 40 --log-every 10    # what the test suite runs

Eight regression targets (a QM9-like setting) computed from one batch of inputs
by a shared MLP encoder and eight linear heads. With ``--aggregator`` the step is
``opt.backward(losses, features=h)``: one backward pass per task through its head
only, the aggregator's weights from the 8 x 8 Gram of the feature gradients, one
backward pass through the encoder. With ``--weighting`` the losses are combined
by a :mod:`gradtools.weighting` module into one loss and any optimizer steps.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradtools
from gradtools import aggregation as agg
from gradtools import weighting as wt

NUM_TASKS = 8


class SharedEncoder(nn.Module):
    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(NUM_TASKS))

    def losses(self, h: Tensor, targets: Tensor) -> list[Tensor]:
        return [F.mse_loss(head(h).squeeze(-1), y) for head, y in zip(self.heads, targets.T, strict=True)]


def make_data(n: int, in_dim: int, seed: int) -> tuple[Tensor, Tensor]:
    """Inputs and eight targets of different scales, some of them pulling against each other."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=gen)
    mix = torch.randn(in_dim, NUM_TASKS, generator=gen)
    scales = torch.logspace(-1, 1, NUM_TASKS)
    return x, torch.tanh(x @ mix) * scales


def make_weighting(name: str, model: SharedEncoder) -> wt.LossWeighting:
    if name == "uncertainty":
        return wt.UncertaintyWeighting(NUM_TASKS)
    if name == "imtl-l":
        return wt.IMTLL(NUM_TASKS)
    if name == "dwa":
        return wt.DWA(NUM_TASKS)
    if name == "rlw":
        return wt.RLW(NUM_TASKS, seed=0)
    if name == "gradnorm":
        return wt.GradNorm(NUM_TASKS, shared=list(model.encoder[-2].parameters()))
    raise ValueError(f"unknown weighting {name!r}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--aggregator", default="upgrad", help="a gradtools.aggregation name")
    choice.add_argument("--weighting", help="uncertainty, imtl-l, dwa, rlw or gradnorm")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    x_all, y_all = make_data(2048, 16, args.seed)
    model = SharedEncoder(16, 64)
    weighting = make_weighting(args.weighting, model) if args.weighting else None
    params = list(model.parameters()) + (list(weighting.parameters()) if weighting else [])
    inner = torch.optim.AdamW(params, lr=args.lr)
    opt = inner if weighting else gradtools.MultiTask(inner, agg.from_name(args.aggregator))
    gen = torch.Generator().manual_seed(args.seed + 1)
    running = 0.0
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, x_all.shape[0], (args.batch_size,), generator=gen)
        opt.zero_grad()
        h = model.encoder(x_all[rows])
        losses = model.losses(h, y_all[rows])
        if weighting is None:
            assert isinstance(opt, gradtools.MultiTask)
            opt.backward(losses, features=h)  # one batch, shared features: aggregate there
        else:
            weighting(losses).backward()
        opt.step()
        if isinstance(weighting, wt.DWA) and step % 20 == 0:
            weighting.end_epoch()  # DWA's "epoch": here every 20 steps
        running += float(torch.stack(losses).detach().mean())
        if step % args.log_every == 0:
            weights = weighting.weights if weighting else opt.stats.weights  # type: ignore[union-attr]
            shown = " ".join(f"{w:.2f}" for w in weights.tolist())
            print(f"step {step:4d}  loss {running / args.log_every:.4f}  weights {shown}")
            running = 0.0


if __name__ == "__main__":
    main()
