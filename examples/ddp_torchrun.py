"""Data-parallel multi-task training: DistributedDataParallel, torchrun and an exact PCGrad.

    torchrun --nproc_per_node 2 examples/ddp_torchrun.py            # 2 CPU processes (gloo)
    torchrun --nproc_per_node 4 examples/ddp_torchrun.py            # 4 GPUs (nccl; not run by the tests)
    python examples/ddp_torchrun.py --steps 40                      # one process, what the tests run

PCGrad is nonlinear, so the mean of per-process surgeries is not the surgery of
the mean. ``process_group=`` makes the wrapper average each task's gradient over
the processes first (one all-reduce per step) and run the same surgery
everywhere; DistributedDataParallel must not reduce too, so the forward and
``opt.backward`` run under ``ddp_model.no_sync()``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from two_head_mlp import TwoHeadMLP, make_data

import gradtools


def init_process_group() -> torch.device:
    """torchrun's environment, or a one-process group when run with plain python."""
    use_cuda = torch.cuda.is_available()
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("nccl" if use_cuda else "gloo")
    else:
        rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    if use_cuda and dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        torch.manual_seed(args.seed)  # the same initial weights on every process
        x_all, y_all, t_all = (t.to(device) for t in make_data(1024, 8, 4, args.seed))
        model = TwoHeadMLP(8, 64, 4).to(device)
        ddp_model = DistributedDataParallel(model)
        opt = gradtools.PCGrad(gradtools.AdamW(model.parameters(), lr=args.lr),
                               process_group=dist.group.WORLD,
                               generator=torch.Generator().manual_seed(args.seed))
        batches = torch.Generator().manual_seed(args.seed + 1)

        window: list[float] = []
        for step in range(1, args.steps + 1):
            # One global batch, each process a disjoint share of its rows.
            idx = torch.randint(0, len(x_all), (args.batch_size * world,), generator=batches)
            idx = idx[rank::world].to(device)
            opt.zero_grad()
            with ddp_model.no_sync():  # the forward too: DDP arms its reduction there
                logits, prediction = ddp_model(x_all[idx])
                losses = [F.cross_entropy(logits, y_all[idx]), F.mse_loss(prediction, t_all[idx])]
                opt.backward(losses)   # task gradients averaged over processes, then the surgery
            opt.step()

            window.append(sum(loss.item() for loss in losses))
            if (step % args.log_every == 0 or step == args.steps) and rank == 0:
                print(f"step {step:4d}  loss {sum(window) / len(window):.4f}  processes {world}",
                      flush=True)
            if step % args.log_every == 0:
                window.clear()
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
