"""Per-call time of every aggregator's weights from one T x T Gram block, T = 3 and 10.

This is the host-side cost an aggregator adds to a multi-task step (the Gram
matrix and the weighted sum are the wrapper's and the same for every method).
Side by side, interleaved round-robin in one run, medians: ours, and torchjd
0.18's weighting of the same Gramian where torchjd has the method without
solvers we do not install (UPGrad/DualProj need quadprog, CAGrad/Nash-MTL
cvxpy). The Gram block comes from a random [T, 4096] float64 Jacobian.

    .venv/bin/python benchmarks/bench_aggregators.py [--repeats 41] [--tasks 3 10] [--front-only]

A second table times Nash-MTL and FairGrad on the Pareto front (two almost
opposite gradients, 1 + cos from 1e-7 down to 0), where the bargaining equation
is nearly singular, against a generic block: their Newton solver now stops when
a step leaves the iterate bit-identical; "no stop" is the same solver with that
rule switched off (the behaviour before it: 200 Newton steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import time_interleaved
from gradtools import aggregation as agg


def ours(num_tasks: int, gram: torch.Tensor) -> dict[str, Callable[[], object]]:
    variants: dict[str, Callable[[], object]] = {}
    generator = torch.Generator().manual_seed(0)
    for name in agg.available():
        aggregator = agg.from_name(name)

        def run(a: agg.Aggregator = aggregator) -> object:
            return a.aggregate(gram, a.draw(num_tasks, generator)).weights

        variants[name] = run
    return variants


def torchjd_variants(gram: torch.Tensor) -> dict[str, Callable[[], object]]:
    try:
        import torchjd.aggregation as jd
    except ImportError:
        return {}
    block = gram[0]
    weightings = {
        "mgda": jd.MGDA().gramian_weighting,
        "imtlg": jd.IMTLG().gramian_weighting,
        "alignedmtl": jd.AlignedMTL().gramian_weighting,
        "fairgrad": jd.FairGrad(alpha=1.0).gramian_weighting,
        "gradvac": jd.GradVac().gramian_weighting,
        "pcgrad": jd.PCGrad().gramian_weighting,
    }
    return {name: (lambda w=w: w(block)) for name, w in weightings.items()}


def front_table(repeats: int) -> None:
    """Nash-MTL/FairGrad per-call time on almost opposite gradients, with and without the stop."""
    from gradtools.aggregation import _solvers

    rng = torch.Generator().manual_seed(2)
    g = torch.randn(4096, dtype=torch.float64, generator=rng)
    noise = torch.randn(4096, dtype=torch.float64, generator=rng)
    cases = {"generic": torch.randn(2, 4096, dtype=torch.float64, generator=rng)}
    for tilt in (1e-3, 1e-6, 1e-8):
        cases[f"tilt {tilt:g}"] = torch.stack([g, -1.7 * (g + tilt * noise)])
    stop = _solvers.unchanged

    def never(new: object, old: object) -> bool:
        return False

    variants: dict[str, Callable[[], object]] = {}
    for case, jac in cases.items():
        gram = (jac @ jac.T).unsqueeze(0)
        for name in ("nashmtl", "fairgrad"):
            aggregator = agg.from_name(name)
            for label, rule in (("stop", stop), ("no stop", never)):

                def run(a: agg.Aggregator = aggregator, gm=gram, r=rule) -> object:
                    _solvers.unchanged = r
                    try:
                        # A fresh solve each call (no warm start from the last one).
                        return type(a)().aggregate(gm, None).weights
                    finally:
                        _solvers.unchanged = stop

                variants[f"{name} | {case} | {label}"] = run
    times = time_interleaved(variants, repeats=repeats, warmup=1)
    print("| method | gradients | 1 + cos | us, stop | us, no stop | no stop / stop |")
    print("|---|---|---:|---:|---:|---:|")
    for case, jac in cases.items():
        cos = float(jac[0] @ jac[1] / (jac[0].norm() * jac[1].norm()))
        for name in ("nashmtl", "fairgrad"):
            fast = 1e6 * statistics.median(times[f"{name} | {case} | stop"])
            slow = 1e6 * statistics.median(times[f"{name} | {case} | no stop"])
            print(
                f"| {name} | {case} | {1 + cos:.1e} | {fast:.0f} | {slow:.0f} | {slow / fast:.1f}x |"
            )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--tasks", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--front-only", action="store_true", help="only the Pareto-front table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, one thread, median of {args.repeats} interleaved calls\n")
    front_table(max(5, args.repeats // 4))
    if args.front_only:
        return
    for num_tasks in args.tasks:
        jac = torch.randn(
            num_tasks, 4096, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
        )
        gram = (jac @ jac.T).unsqueeze(0)
        mine = ours(num_tasks, gram)
        theirs = torchjd_variants(gram)
        variants = {
            **{f"ours {k}": v for k, v in mine.items()},
            **{f"torchjd {k}": v for k, v in theirs.items()},
        }
        times = time_interleaved(variants, repeats=args.repeats, warmup=3)
        print(f"| T = {num_tasks} | ours, us per call | torchjd, us | ours / torchjd |")
        print("|---|---:|---:|---:|")
        for name in mine:
            ours_us = 1e6 * statistics.median(times[f"ours {name}"])
            if f"torchjd {name}" in times:
                jd_us = 1e6 * statistics.median(times[f"torchjd {name}"])
                print(f"| {name} | {ours_us:.0f} | {jd_us:.0f} | {ours_us / jd_us:.2f}x |")
            else:
                print(f"| {name} | {ours_us:.0f} | | |")
        print()


if __name__ == "__main__":
    main()
