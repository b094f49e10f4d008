"""Two task heads on one shared MLP, trained with PCGrad, SMART and gradtools.AdamW.

    python examples/two_head_mlp.py               # 300 steps, a few seconds on a CPU
    python examples/two_head_mlp.py --steps 40    # what the test suite runs

The tasks share the trunk: a 4-way classification (cross-entropy, SMART's "kl")
and a regression (squared error, SMART's "mse"). The inputs are features, so
SMART perturbs them directly: the "embeddings" of an MLP are its input. Each
task's loss carries its own R_s and Bregman terms (`per_output=True`), so PCGrad
sees one complete loss per task.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradtools


class TwoHeadMLP(nn.Module):
    def __init__(self, in_dim: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(),
                                   nn.Linear(hidden, hidden), nn.GELU())
        self.classify = nn.Linear(hidden, classes)
        self.regress = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(x)
        return self.classify(h), self.regress(h).squeeze(-1)


def make_data(n: int, in_dim: int, classes: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Features, class labels from a random linear map, and a smooth regression target."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=gen)
    labels = (x @ torch.randn(in_dim, classes, generator=gen)).argmax(dim=-1)
    target = torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]
    return x, labels, target


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    x_all, y_all, t_all = make_data(1024, 8, 4, args.seed)
    model = TwoHeadMLP(8, args.hidden, 4)
    optimizer = gradtools.PCGrad(gradtools.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01),
                                 generator=torch.Generator().manual_seed(args.seed))
    # Inputs are O(1) features, so the ball is wider than for BERT embeddings.
    smart = gradtools.SMART(epsilon=1e-2, noise_std=1e-3, step_size=1e-2, steps=1)
    teacher = gradtools.MomentumTeacher(model, total_steps=args.steps)
    lambda_s, mu = 1.0, 1.0
    batches = torch.Generator().manual_seed(args.seed + 1)

    window: list[float] = []
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x_all), (args.batch_size,), generator=batches)
        x, labels, target = x_all[idx], y_all[idx], t_all[idx]

        logits, prediction = model(x)
        task_losses = [F.cross_entropy(logits, labels), F.mse_loss(prediction, target)]
        kinds = ("kl", "mse")
        r_s = smart(model, x, (logits, prediction), kind=kinds, per_output=True)
        bregman = teacher.bregman(lambda m: m(x), (logits, prediction), kind=kinds, per_output=True)
        losses = [task_losses[i] + lambda_s * r_s[i] + mu * bregman[i] for i in range(2)]

        optimizer.zero_grad()
        optimizer.backward(losses)   # one loss per task: PCGrad removes the conflicting parts
        optimizer.step()
        teacher.update(model)        # after every optimizer step

        window.append(sum(loss.item() for loss in task_losses))
        if step % args.log_every == 0 or step == args.steps:
            stats = optimizer.stats
            conflicts = int(stats.conflicts.sum()) // 2 if stats is not None else 0
            print(f"step {step:4d}  loss {sum(window) / len(window):.4f}  "
                  f"r_s {smart.stats.r_s.item():.2e}  bregman {teacher.stats.bregman.item():.2e}  "
                  f"conflicting pairs {conflicts}", flush=True)
            window.clear()


if __name__ == "__main__":
    main()
