"""What ``features=`` cannot avoid on top of a plain step: a floor for its ratio.

Issue 22 asks for ``MultiTask.backward(losses, features=h)`` at <= 1.3x a plain
summed step at T = 40 on bench_shared_batch.py's encoder. Whatever the
plumbing, representation-level aggregation needs each task's feature gradient
on its own (T head passes instead of one fused backward), those gradients side
by side (``[T, n]``, n = batch x feature size), their float32 Gram matrix, the
weighted combination and the T x T solve. This script times each of those
operations by itself, in the cheapest form we found (the Gram in its fastest
memory layout, with the transposing copy that layout needs left out, so the
floor is optimistic), and adds them up:

    floor = 1 + (sum of the extra operations) / (plain step)

A ratio under the floor is out of reach without changing what is computed (a
lower-precision Gram, fewer feature gradients). CPU time of this thread,
medians, interleaved.

    .venv/bin/python benchmarks/shared_batch_floor.py [--tasks 40] [--repeats 31]
        [--widths 256 512 512 512]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from gradtools import aggregation as agg

try:
    from benchmarks.bench_shared_batch import BATCH, WIDTHS, SharedBatchNet
except ImportError:  # run as a script: benchmarks/ is on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.bench_shared_batch import BATCH, WIDTHS, SharedBatchNet


def cpu_medians(parts: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median CPU ms of each part, the parts timed round-robin after two warm-up calls."""
    for fn in parts.values():
        fn()
        fn()
    samples: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(repeats):
        for name, fn in parts.items():
            start = time.thread_time()
            fn()
            samples[name].append(time.thread_time() - start)
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--aggregator", default="mgda")
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    num_tasks = args.tasks
    net = SharedBatchNet(num_tasks, tuple(args.widths))
    plain_net = copy.deepcopy(net)
    plain_opt = torch.optim.AdamW(plain_net.parameters(), lr=1e-4)
    x = torch.randn(BATCH, args.widths[0])
    ys = torch.randn(num_tasks, BATCH)

    def plain_step() -> None:
        plain_opt.zero_grad()
        sum(plain_net.losses(plain_net.encoder(x), ys)).backward()  # type: ignore[union-attr]
        plain_opt.step()

    h = net.encoder(x).detach().requires_grad_()
    heads = list(net.heads.parameters())

    def separate_head_passes() -> list[torch.Tensor]:
        return [torch.autograd.grad(loss, [h, *net.heads[t].parameters()])[0]
                for t, loss in enumerate(net.losses(h, ys))]

    def fused_head_pass() -> None:  # what the plain step spends on the heads
        torch.autograd.grad(sum(net.losses(h, ys)), [h, *heads])  # type: ignore[arg-type]

    rows = separate_head_passes()
    stacked = torch.stack(rows).reshape(num_tasks, -1)
    columns = stacked.T.contiguous()  # [n, T]: the layout in which the Gram product is fastest
    weights = torch.rand(num_tasks, dtype=torch.float64)
    gram = (stacked @ stacked.T).double()[None]
    aggregator = agg.from_name(args.aggregator)
    draw = torch.Generator().manual_seed(0)
    parts: dict[str, Callable[[], object]] = {
        "plain step": plain_step,
        "T separate head passes": separate_head_passes,
        "one fused head pass": fused_head_pass,
        "stack the T feature gradients": lambda: torch.stack(rows),
        "Gram [T, n] x [n, T], rows layout": lambda: stacked @ stacked.T,
        "Gram, columns layout (copy not counted)": lambda: columns.T @ columns,
        "combination sum_t w_t d_t": lambda: torch.tensordot(weights.float(), stacked, dims=1),
        f"{args.aggregator} T x T solve": lambda: aggregator.weights(gram, draw),
    }
    ms = cpu_medians(parts, args.repeats)
    print(f"torch {torch.__version__}, 1 thread, batch {BATCH}, encoder "
          f"{'-'.join(map(str, args.widths))}, T = {num_tasks}, n = {stacked.shape[1]}, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| part | median CPU ms | / plain step |\n|---|---:|---:|")
    for name, value in ms.items():
        print(f"| {name} | {value:.2f} | {value / ms['plain step']:.2f}x |")
    extra_heads = ms["T separate head passes"] - ms["one fused head pass"]
    without_solve = (extra_heads + ms["stack the T feature gradients"]
                     + ms["Gram, columns layout (copy not counted)"]
                     + ms["combination sum_t w_t d_t"])
    solve = ms[f"{args.aggregator} T x T solve"]
    plain = ms["plain step"]
    print(f"\nfloor of features= / plain: {1 + (without_solve + solve) / plain:.2f}x "
          f"({1 + without_solve / plain:.2f}x without the solve)")


if __name__ == "__main__":
    main()
