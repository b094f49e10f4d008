"""Per-call time of every aggregator's weights from one T x T Gram block, T = 3 and 10.

This is the host-side cost an aggregator adds to a multi-task step (the Gram
matrix and the weighted sum are the wrapper's and the same for every method).
Side by side, interleaved round-robin in one run, medians: ours, and torchjd
0.18's weighting of the same Gramian where torchjd has the method without
solvers we do not install (UPGrad/DualProj need quadprog, CAGrad/Nash-MTL
cvxpy). The Gram block comes from a random [T, 4096] float64 Jacobian.

    .venv/bin/python benchmarks/bench_aggregators.py [--repeats 41] [--tasks 3 10]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--tasks", type=int, nargs="+", default=[3, 10])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, one thread, median of {args.repeats} interleaved calls\n")
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
