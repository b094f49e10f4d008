"""The Gram blocks alone: float64 accumulation (gradtools) against the float32 product it replaced.

T flat float32 task gradients of D elements (D = 15.3M, the shared parameters of
the 2-layer MiniLM shape in bench_multitask.py; one block, ``granularity="all"``
on a CPU), timed interleaved round-robin; ratio = median over rounds of
(float64 time / float32 time in the same round).

    .venv/bin/python benchmarks/bench_gram.py [--tasks 3 10] [--numel 15300000] [--repeats 9]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from gradtools._task_gradients import GramItem, gram_blocks

try:
    from benchmarks.baselines.float32_gram import float32_gram_blocks
    from benchmarks.timing import median_ms, time_interleaved
except ImportError:  # run as a script: benchmarks/ is on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.baselines.float32_gram import float32_gram_blocks
    from benchmarks.timing import median_ms, time_interleaved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, nargs="*", default=[3, 10])
    parser.add_argument("--numel", type=int, default=15_300_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, cpu, threads {torch.get_num_threads()}, D = {args.numel}")
    for num_tasks in args.tasks:
        ratio, ms64, ms32 = compare(num_tasks, args.numel, args.repeats)
        print(
            f"T = {num_tasks}: float64 {ms64:.0f} ms, float32 {ms32:.0f} ms, "
            f"paired ratio {ratio:.2f}x"
        )


def compare(num_tasks: int, numel: int, repeats: int) -> tuple[float, float, float]:
    """(paired median float64/float32 ratio, float64 median ms, float32 median ms)."""
    rows = torch.randn(num_tasks, numel, generator=torch.Generator().manual_seed(0))

    def items() -> list[GramItem]:
        return [GramItem([(t, rows[t]) for t in range(num_tasks)], numel)]

    def float64() -> None:
        gram_blocks(items(), num_tasks)

    def float32() -> None:
        with float32_gram_blocks():
            gram_blocks(items(), num_tasks)

    times = time_interleaved({"float64": float64, "float32": float32}, repeats=repeats)
    ratio = statistics.median(
        a / b for a, b in zip(times["float64"], times["float32"], strict=True)
    )
    return ratio, median_ms(times["float64"]), median_ms(times["float32"])


if __name__ == "__main__":
    main()
