"""PCGrad + SMART in PyTorch Lightning, with manual optimization.

    python examples/lightning_manual.py               # tiny random BERT, 200 steps
    python examples/lightning_manual.py --steps 30    # what the test suite runs

Lightning's automatic optimization calls `loss.backward()` on the one loss that
`training_step` returns; PCGrad needs one loss per task, so the module sets
`automatic_optimization = False` and drives the step itself: `PCGrad.backward`,
`self.clip_gradients` (acts on the combined gradient PCGrad has written into
`.grad`), `optimizer.step()`, then the teacher's EMA update. Use 32-bit
precision with this recipe: under Lightning's mixed-precision plugins, losses
must go through `self.manual_backward`, which takes one loss.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

import gradtools

from toy_tasks import KINDS, ToyDataset, TwoHeadEncoder, task_losses, tiny_bert


class MultiTaskModule(pl.LightningModule):
    def __init__(self, model: TwoHeadEncoder, total_steps: int, lr: float = 1e-3,
                 max_grad_norm: float = 1.0, lambda_s: float = 5.0, mu: float = 1.0,
                 log_every: int = 10, seed: int = 0) -> None:
        super().__init__()
        self.automatic_optimization = False  # PCGrad does its own backward passes
        self.model = model
        self.lr, self.max_grad_norm, self.lambda_s, self.mu = lr, max_grad_norm, lambda_s, mu
        self.log_every, self.seed = log_every, seed
        self.smart = gradtools.SMART(epsilon=1e-4, noise_std=1e-4, step_size=1e-2)
        # A plain attribute, not a submodule: the teacher's weights are no parameters to train.
        self.teacher = gradtools.MomentumTeacher(model, total_steps=total_steps)
        self.window: list[float] = []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return gradtools.PCGrad(gradtools.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.01),
                                generator=torch.Generator().manual_seed(self.seed))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        optimizer = self.optimizers()  # Lightning's wrapper; .optimizer is the PCGrad
        pcgrad: gradtools.PCGrad = optimizer.optimizer
        ids, mask = batch["input_ids"], batch["attention_mask"]
        tap = gradtools.EmbeddingTap(self.model.embedding_module())

        def run() -> tuple[Tensor, Tensor]:
            return self.model(ids, mask)

        embeds, outputs = tap.capture(run)
        losses = task_losses(outputs, batch)
        r_s = self.smart(tap.forward_with(run), embeds, outputs, kind=KINDS, mask=mask, per_output=True)
        bregman = self.teacher.bregman(lambda m: m(ids, mask), outputs, kind=KINDS, per_output=True)
        total = [losses[i] + self.lambda_s * r_s[i] + self.mu * bregman[i] for i in range(2)]

        optimizer.zero_grad()
        pcgrad.backward(total)
        self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm,
                            gradient_clip_algorithm="norm")
        optimizer.step()
        self.teacher.update(self.model)

        self.window.append(sum(loss.item() for loss in losses))
        step = self.global_step  # counts optimizer steps, so it is already this step's number
        if step % self.log_every == 0 or step == self.trainer.max_steps:
            print(f"step {step:4d}  loss {sum(self.window) / len(self.window):.4f}  "
                  f"r_s {self.smart.stats.r_s.item():.2e}", flush=True)
            self.window.clear()

    def on_fit_start(self) -> None:
        self.teacher.module.to(self.device)  # Lightning moves submodules only; the teacher is not one

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["teacher"] = self.teacher.state_dict()  # so a resumed run keeps its teacher

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.teacher.load_state_dict(checkpoint["teacher"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    model = TwoHeadEncoder(tiny_bert(seed=args.seed))
    module = MultiTaskModule(model, total_steps=args.steps, lr=args.lr, log_every=args.log_every,
                             seed=args.seed)
    data = torch.utils.data.DataLoader(ToyDataset(1024, 16, model.encoder.config.vocab_size,
                                                  args.seed + 1),
                                       batch_size=args.batch_size, shuffle=True)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=1, precision="32-true",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, data)


if __name__ == "__main__":
    main()
