"""PCGrad + SMART inside the Hugging Face Trainer: a Trainer subclass and a callback.

    python examples/hf_trainer.py                  # tiny random BERT, 200 steps
    python examples/hf_trainer.py --steps 30       # what the test suite runs

The Trainer calls `accelerator.backward(loss)` on one scalar; PCGrad needs one
loss per task, so `MultiTaskTrainer.training_step` runs the forward passes and
`PCGrad.backward(losses)` itself. Everything after it is the Trainer's own
loop: `max_grad_norm` clipping (PCGrad has written the combined gradient into
`.grad` when `backward` returns, so the clip acts on it), `optimizer.step()`,
the LR scheduler and logging. `TeacherCallback` updates the momentum teacher
after every optimizer step (`on_step_end`) and, before each step, checks that
the clipped gradient is within `max_grad_norm`.

Keep `gradient_accumulation_steps=1` with this recipe: the Trainer divides the
loss by the accumulation steps inside its own `training_step`, which this one
replaces. (For accumulation, call `PCGrad.backward(..., combine=False)` for all
but the last micro-batch.)
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainingArguments

import gradtools

from toy_tasks import KINDS, ToyDataset, TwoHeadEncoder, task_losses, tiny_bert


class MultiTaskTrainer(Trainer):
    """A Trainer whose training step hands one loss per task to gradtools.PCGrad."""

    def __init__(self, *args: Any, smart: gradtools.SMART, teacher: gradtools.MomentumTeacher,
                 lambda_s: float = 5.0, mu: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.smart, self.teacher = smart, teacher
        self.lambda_s, self.mu = lambda_s, mu
        self.task_loss_history: list[float] = []
        self.unclipped_norm = 0.0

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        tap = gradtools.EmbeddingTap(model.embedding_module())

        def run() -> tuple[Tensor, Tensor]:
            return model(ids, mask)

        with self.compute_loss_context_manager():  # autocast when --bf16/--fp16 are set
            embeds, outputs = tap.capture(run)
            losses = task_losses(outputs, inputs)
            r_s = self.smart(tap.forward_with(run), embeds, outputs, kind=KINDS, mask=mask,
                             per_output=True)
            bregman = self.teacher.bregman(lambda m: m(ids, mask), outputs, kind=KINDS,
                                           per_output=True)
            total = [losses[i] + self.lambda_s * r_s[i] + self.mu * bregman[i] for i in range(2)]
        # self.optimizer is accelerate's wrapper around the PCGrad passed in `optimizers=`.
        pcgrad: gradtools.PCGrad = getattr(self.optimizer, "optimizer", self.optimizer)
        pcgrad.backward(total)  # the combined gradient is in .grad now, before the Trainer clips
        self.unclipped_norm = _grad_norm(model)
        task_loss = sum(loss.detach() for loss in losses)
        self.task_loss_history.append(float(task_loss))
        return torch.stack([t.detach() for t in total]).sum()  # what the Trainer logs as "loss"


def _grad_norm(model: nn.Module) -> float:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


class TeacherCallback(TrainerCallback):
    """EMA teacher after every optimizer step; prints the falling task loss; checks the clip."""

    def __init__(self, trainer: MultiTaskTrainer, log_every: int) -> None:
        self.trainer, self.log_every = trainer, log_every
        self.largest_clipped_norm = 0.0
        self.largest_unclipped_norm = 0.0

    def on_pre_optimizer_step(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        # Runs after the Trainer clipped the gradients and before optimizer.step().
        self.largest_clipped_norm = max(self.largest_clipped_norm, _grad_norm(self.trainer.model))
        self.largest_unclipped_norm = max(self.largest_unclipped_norm, self.trainer.unclipped_norm)

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.teacher.update(self.trainer.model)
        history = self.trainer.task_loss_history
        if state.global_step % self.log_every == 0 or state.global_step == state.max_steps:
            window = history[-self.log_every:]
            print(f"step {state.global_step:4d}  loss {sum(window) / len(window):.4f}  "
                  f"grad norm before clipping up to {self.largest_unclipped_norm:.3f}, "
                  f"after up to {self.largest_clipped_norm:.3f} "
                  f"(max_grad_norm {args.max_grad_norm})", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = TwoHeadEncoder(tiny_bert(seed=args.seed))
    vocab_size = model.encoder.config.vocab_size
    optimizer = gradtools.PCGrad(gradtools.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01),
                                 generator=torch.Generator().manual_seed(args.seed))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            max_grad_norm=args.max_grad_norm, gradient_accumulation_steps=1,
            logging_strategy="no", save_strategy="no", report_to="none", use_cpu=True,
            remove_unused_columns=False,  # the task labels are not arguments of forward()
            disable_tqdm=True, seed=args.seed, dataloader_num_workers=0,
        )
        trainer = MultiTaskTrainer(
            model=model, args=training_args,
            train_dataset=ToyDataset(1024, 16, vocab_size, args.seed + 1),
            optimizers=(optimizer, scheduler),
            smart=gradtools.SMART(epsilon=1e-4, noise_std=1e-4, step_size=1e-2),
            teacher=gradtools.MomentumTeacher(model, total_steps=args.steps),
        )
        callback = TeacherCallback(trainer, args.log_every)
        trainer.add_callback(callback)
        trainer.train()
    if callback.largest_clipped_norm > args.max_grad_norm * (1 + 1e-4):
        raise SystemExit(f"gradient clipping did not hold: {callback.largest_clipped_norm}")


if __name__ == "__main__":
    main()
