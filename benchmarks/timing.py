"""Shared timing helpers for the benchmark scripts.

The machine is noisy (two cores shared with other work), so variants are timed
interleaved, round-robin, and compared by their medians within one run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    variants: dict[str, Callable[[], object]],
    repeats: int = 7,
    warmup: int = 2,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Run each variant ``warmup`` times, then ``repeats`` rounds of all variants in turn.

    Returns the per-call seconds of each variant.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ms(samples: list[float]) -> float:
    return 1e3 * statistics.median(samples)


def ratio_table(
    title: str, times: dict[str, list[float]], baselines: list[str], unit: str = "ms"
) -> str:
    """A markdown table: median time of each variant and its ratio to each baseline."""
    medians = {name: median_ms(samples) for name, samples in times.items()}
    header = f"| {title} | median {unit} | " + " | ".join(f"/ {b}" for b in baselines) + " |"
    rule = "|---|---:|" + "---:|" * len(baselines)
    rows = [header, rule]
    for name, value in medians.items():
        ratios = " | ".join(f"{value / medians[b]:.2f}x" for b in baselines)
        rows.append(f"| {name} | {value:.1f} | {ratios} |")
    return "\n".join(rows)
