"""One shared batch through a shared encoder and T heads: every way to take a multi-task step.

The setting of issue 22: an MLP encoder 256-512-512-512 (ReLU), batch 128, T
linear heads with an MSE loss each, AdamW, one thread. Variants, each with its
own copy of the model and optimizer, timed round-robin (benchmarks/timing.py),
for each aggregator (UPGrad and MGDA by default) and each T:

- ``plain``: ``sum(losses).backward()``, the cost we aim at;
- ``gradtools exact``: ``MultiTask.backward(losses)``: T backward passes through
  the encoder, the Gram over the encoder's parameters;
- ``gradtools exact, batched``: the same weights and gradients, the T encoder
  passes replaced by one ``autograd.grad(..., is_grads_batched=True)`` of the T
  feature gradients (issue 22 item 2; a prototype here, not in the library);
- ``gradtools features=``: ``MultiTask.backward(losses, features=h)``
  (representation level; with MGDA this is MGDA-UB);
- ``torchjd mtl_backward``: torchjd 0.18 ``mtl_backward(losses, features=h)`` +
  ``jac_to_grad(encoder params, aggregator)`` (exact, parameter level);
- ``torchjd autogram``: torchjd's ``autogram.Engine(encoder)`` Gramian of the
  losses w.r.t. the encoder + its weighting + ``losses.backward(weights)``.

Ratios are paired: each variant's time over the plain step's in the same round,
then the median over rounds, for wall time and for the thread's CPU time (the
latter leaves out the waits for a core on a loaded machine). ``gradtools
features= (Mean: no solve)`` runs the same pipeline with a free solve. The T x T solve alone (the aggregator on a fixed
Gram of the feature gradients) is timed apart.

    .venv/bin/python benchmarks/bench_shared_batch.py [--tasks 2 10 40] [--repeats 9]
        [--aggregators upgrad mgda] [--no-torchjd]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradtools
from gradtools import aggregation as agg

try:
    from benchmarks.timing import median_ms
except ImportError:  # run as a script: benchmarks/ is on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.timing import median_ms

BATCH = 128
WIDTHS = (256, 512, 512, 512)
TORCHJD_NAMES = {"upgrad": "UPGrad", "mgda": "MGDA"}


class SharedBatchNet(nn.Module):
    def __init__(self, num_tasks: int, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.encoder = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(widths[-1], 1) for _ in range(num_tasks))

    def losses(self, h: Tensor, ys: Tensor) -> list[Tensor]:
        return [F.mse_loss(head(h).squeeze(-1), y) for head, y in zip(self.heads, ys, strict=True)]


def make_variants(
    name: str, num_tasks: int, torchjd: bool, widths: tuple[int, ...] = WIDTHS
) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    base = SharedBatchNet(num_tasks, widths)
    x = torch.randn(BATCH, widths[0])
    ys = torch.randn(num_tasks, BATCH)
    variants: dict[str, Callable[[], None]] = {}

    plain_net = copy.deepcopy(base)
    plain_opt = torch.optim.AdamW(plain_net.parameters(), lr=1e-4)

    def plain() -> None:
        plain_opt.zero_grad()
        h = plain_net.encoder(x)
        sum(plain_net.losses(h, ys)).backward()  # type: ignore[union-attr]
        plain_opt.step()

    variants["plain"] = plain

    for label, features in (("gradtools exact", False), ("gradtools features=", True)):
        net = copy.deepcopy(base)
        opt = gradtools.MultiTask(torch.optim.AdamW(net.parameters(), lr=1e-4), agg.from_name(name))

        def ours(
            net: SharedBatchNet = net, opt: gradtools.MultiTask = opt, features: bool = features
        ) -> None:
            opt.zero_grad()
            h = net.encoder(x)
            opt.backward(net.losses(h, ys), features=h if features else None)
            opt.step()

        variants[label] = ours

    # The same pipeline with a solve that costs nothing: what the plumbing costs.
    net = copy.deepcopy(base)
    mean_opt = gradtools.MultiTask(torch.optim.AdamW(net.parameters(), lr=1e-4), agg.Mean())

    def no_solve(net: SharedBatchNet = net, opt: gradtools.MultiTask = mean_opt) -> None:
        opt.zero_grad()
        h = net.encoder(x)
        opt.backward(net.losses(h, ys), features=h)
        opt.step()

    variants["gradtools features= (Mean: no solve)"] = no_solve
    variants["gradtools exact, batched"] = _batched_exact(base, name, x, ys)
    if torchjd:
        try:
            variants.update(_torchjd_variants(base, name, x, ys))
        except ImportError as error:  # torchjd's UPGrad needs qpsolvers + quadprog
            print(f"torchjd {name}: skipped ({error})", file=sys.stderr)
    return variants


def _batched_exact(base: SharedBatchNet, name: str, x: Tensor, ys: Tensor) -> Callable[[], None]:
    """The exact step with one batched encoder pass for the T task gradients (item 2's prototype)."""
    net = copy.deepcopy(base)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    aggregator = agg.from_name(name)
    encoder = list(net.encoder.parameters())

    def step() -> None:
        opt.zero_grad()
        h = net.encoder(x)
        losses = net.losses(h, ys)
        rows = []
        for head, loss in zip(net.heads, losses, strict=True):
            d, *head_grads = torch.autograd.grad(loss, [h, *head.parameters()])
            rows.append(d)
            for p, g in zip(head.parameters(), head_grads, strict=True):
                p.grad = g
        d_all = torch.stack(rows)
        jac = torch.autograd.grad(h, encoder, grad_outputs=d_all, is_grads_batched=True)
        flat = torch.cat([j.reshape(len(rows), -1) for j in jac], dim=1)
        gram = (flat @ flat.T).double()
        w = aggregator.weights(gram[None])[0].to(flat.dtype)
        combined = w @ flat
        offset = 0
        for p in encoder:
            p.grad = combined[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        opt.step()

    return step


def _torchjd_variants(
    base: SharedBatchNet, name: str, x: Tensor, ys: Tensor
) -> dict[str, Callable[[], None]]:
    import torchjd.aggregation as jd
    from torchjd.autogram import Engine
    from torchjd.autojac import jac_to_grad, mtl_backward

    cls = TORCHJD_NAMES[name]
    variants: dict[str, Callable[[], None]] = {}

    net = copy.deepcopy(base)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    aggregator = getattr(jd, cls)()
    encoder = list(net.encoder.parameters())

    def autojac() -> None:
        opt.zero_grad()
        h = net.encoder(x)
        mtl_backward(net.losses(h, ys), features=h)
        jac_to_grad(encoder, aggregator)
        opt.step()

    variants["torchjd mtl_backward"] = autojac

    gram_net = copy.deepcopy(base)
    gram_opt = torch.optim.AdamW(gram_net.parameters(), lr=1e-4)
    engine = Engine(gram_net.encoder, batch_dim=None)
    weighting = getattr(jd, f"{cls}Weighting")()

    def autogram() -> None:
        gram_opt.zero_grad()
        h = gram_net.encoder(x)
        losses = torch.stack(gram_net.losses(h, ys))
        weights = weighting(engine.compute_gramian(losses))
        losses.backward(weights)
        gram_opt.step()

    variants["torchjd autogram"] = autogram
    return variants


def time_both_clocks(
    variants: dict[str, Callable[[], None]], repeats: int, warmup: int = 2
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Round-robin like benchmarks/timing.py, recording wall time and this thread's CPU time.

    On a machine shared with other jobs, wall time includes waiting for a core;
    the thread's CPU time does not (it still includes cache and memory contention).
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start_wall, start_cpu = time.perf_counter(), time.thread_time()
            fn()
            cpu[name].append(time.thread_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    return wall, cpu


def paired_ratios(times: dict[str, list[float]]) -> dict[str, float]:
    return {
        name: statistics.median(t / p for t, p in zip(samples, times["plain"], strict=True))
        for name, samples in times.items()
    }


def solve_ms(name: str, num_tasks: int, repeats: int) -> float:
    """The aggregator alone on the feature Gram of one step (the T x T solve)."""
    torch.manual_seed(0)
    net = SharedBatchNet(num_tasks)
    h = net.encoder(torch.randn(BATCH, WIDTHS[0]))
    ys = torch.randn(num_tasks, BATCH)
    d = torch.stack(
        [
            torch.autograd.grad(loss, h, retain_graph=True)[0].reshape(-1)
            for loss in net.losses(h, ys)
        ]
    )
    gram = (d @ d.T).double()[None]
    aggregator = agg.from_name(name)
    samples = []
    for _ in range(repeats):
        start = time.thread_time()
        aggregator.weights(gram, torch.Generator().manual_seed(0))
        samples.append(time.thread_time() - start)
    return median_ms(samples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 10, 40])
    parser.add_argument("--aggregators", nargs="+", default=["upgrad", "mgda"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-torchjd", action="store_true")
    parser.add_argument(
        "--widths", type=int, nargs="+", default=list(WIDTHS), help="encoder layer widths"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), batch {BATCH}, "
        f"encoder {'-'.join(map(str, args.widths))}, load average {os.getloadavg()[0]:.1f}"
    )
    for name in args.aggregators:
        for num_tasks in args.tasks:
            variants = make_variants(name, num_tasks, not args.no_torchjd, tuple(args.widths))
            wall, cpu = time_both_clocks(variants, repeats=args.repeats)
            wall_ratios, cpu_ratios = paired_ratios(wall), paired_ratios(cpu)
            solve = solve_ms(name, num_tasks, args.repeats)
            print(f"\n{name}, T = {num_tasks}: (T x T solve alone: {solve:.2f} ms CPU)")
            print(
                "| variant | median wall ms | / plain, wall | median CPU ms | / plain, CPU |\n"
                "|---|---:|---:|---:|---:|"
            )
            for label in variants:
                print(
                    f"| {label} | {median_ms(wall[label]):.1f} | {wall_ratios[label]:.2f}x | "
                    f"{median_ms(cpu[label]):.1f} | {cpu_ratios[label]:.2f}x |"
                )
            sys.stdout.flush()


if __name__ == "__main__":
    main()
