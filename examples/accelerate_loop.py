"""A multi-task training loop under Hugging Face accelerate.

    python examples/accelerate_loop.py                 # 300 steps on one process
    python examples/accelerate_loop.py --steps 40      # what the test suite runs

``accelerator.prepare`` wraps the optimizer in its own ``AcceleratedOptimizer``;
keep a reference to the PCGrad object to call its ``backward`` with one loss per
task (``accelerator.backward`` takes one loss). Tested with one process in
float32 only. With several processes the prepared model is a
DistributedDataParallel, so the forward and the backward run under
``accelerator.no_sync(model)`` and PCGrad averages the task gradients itself
(``process_group=``): the pattern of ``ddp_torchrun.py``, which is tested with two
processes, but not run through accelerate here. For fp16, the losses would also
need the GradScaler steps of ``amp_gradscaler.py``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from two_head_mlp import TwoHeadMLP, make_data

import gradtools


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    accelerator = Accelerator()  # sets up the processes before PCGrad asks for their group
    torch.manual_seed(args.seed)
    x, labels, target = make_data(1024, 8, 4, args.seed)
    sampler = torch.utils.data.RandomSampler(range(len(x)), replacement=True,
                                             num_samples=args.steps * args.batch_size,
                                             generator=torch.Generator().manual_seed(args.seed + 1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels, target),
                                         batch_size=args.batch_size, sampler=sampler)
    model = TwoHeadMLP(8, 64, 4)
    pcgrad = gradtools.PCGrad(
        gradtools.AdamW(model.parameters(), lr=args.lr),
        process_group=dist.group.WORLD if accelerator.num_processes > 1 else None,
        generator=torch.Generator().manual_seed(args.seed))
    model, optimizer, loader = accelerator.prepare(model, pcgrad, loader)

    window: list[float] = []
    for step, (inputs, y, t) in enumerate(loader, start=1):
        optimizer.zero_grad()
        with accelerator.no_sync(model):
            logits, prediction = model(inputs)
            losses = [F.cross_entropy(logits, y), F.mse_loss(prediction, t)]
            pcgrad.backward(losses)  # one loss per task, on the object accelerate wrapped
        optimizer.step()

        window.append(sum(loss.item() for loss in losses))
        if step % args.log_every == 0 or step == len(loader):
            accelerator.print(f"step {step:4d}  loss {sum(window) / len(window):.4f}  "
                              f"processes {accelerator.num_processes}")
            window.clear()


if __name__ == "__main__":
    main()
