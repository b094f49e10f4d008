"""Paired comparisons of two ablation rows: how much one beats the other, and how sure we are.

Two rows are compared on the seeds both ran (seed k of one row against seed k of
the other: same data order, same initial heads), per task metric:

- **over seeds**: the mean of the per-seed differences with a two-sided 95%
  Student-t interval, ``mean +- t_{0.975, n-1} * sd / sqrt(n)`` (scipy.stats.t). It
  measures how much the difference moves from one training run to the next. One
  seed has no interval.
- **over dev examples**: a paired bootstrap. Each replicate resamples the dev
  examples of a task with replacement (the same draw for every seed and both
  rows) and recomputes the mean difference of the metric; the interval is the
  2.5 and 97.5 percentiles. It measures how much the difference depends on which
  dev examples happened to be in the dev set. ``overall`` combines the tasks'
  replicates with the leaderboard formula (the tasks' dev sets are independent).

A difference counts as real (``better``/``worse``) only when *both* intervals
exclude zero on the same side; anything less is ``unclear``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor

from bert_demo.run_folder.dev_predictions import DevPredictions

TASK_METRICS = {"sst": "sst_acc", "para": "para_acc", "sts": "sts_pearson"}
METRICS = ("sst_acc", "para_acc", "sts_pearson", "overall")
BOOTSTRAP_REPLICATES = 2000
Verdict = Literal["better", "worse", "unclear"]


@dataclass(frozen=True)
class Run:
    """One finished run of a row: its seed, dev metrics and (if saved) dev predictions."""

    seed: int
    dev: Mapping[str, float]
    predictions: Mapping[str, DevPredictions] | None = None


@dataclass(frozen=True)
class Comparison:
    """Row minus reference for one metric, over the seeds both ran."""

    metric: str
    seeds: int
    mean: float
    seed_interval: tuple[float, float] | None  # 95% t interval; None with one seed
    example_interval: tuple[float, float] | None  # 95% bootstrap; None without predictions

    @property
    def verdict(self) -> Verdict:
        intervals = (self.seed_interval, self.example_interval)
        if any(i is None for i in intervals):
            return "unclear"
        if all(i[0] > 0 for i in intervals if i is not None):
            return "better"
        if all(i[1] < 0 for i in intervals if i is not None):
            return "worse"
        return "unclear"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "seeds": self.seeds, "mean": self.mean,
                "seed_interval": self.seed_interval, "example_interval": self.example_interval,
                "verdict": self.verdict}


def t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom (p > 0.5).

    scipy.stats.t.ppf; imported here so that the rest of bert_demo runs without scipy.
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if not 0.5 < probability < 1:
        raise ValueError(f"probability must be in (0.5, 1), got {probability}")
    from scipy import stats

    return float(stats.t.ppf(probability, df))


def seed_interval(differences: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean difference; None for fewer than two seeds."""
    n = len(differences)
    if n < 2:
        return None
    mean = statistics.fmean(differences)
    half = t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return mean - half, mean + half


def _metric_rows(task: str, predicted: Tensor, gold: Tensor) -> Tensor:
    """The task's metric per bootstrap row: tensors are [replicates, examples]."""
    if task in ("sst", "para"):
        return (predicted == gold).double().mean(dim=1)
    p = predicted - predicted.mean(dim=1, keepdim=True)
    g = gold - gold.mean(dim=1, keepdim=True)
    denominator = ((p * p).sum(dim=1) * (g * g).sum(dim=1)).sqrt()
    # A constant resample has no correlation: count it as 0 rather than NaN.
    return torch.where(denominator > 0, (p * g).sum(dim=1) / denominator.clamp(min=1e-300),
                       torch.zeros_like(denominator))


def _aligned(task: str, runs: Sequence[DevPredictions]) -> tuple[Tensor, list[Tensor]]:
    """Gold labels and every run's predictions, checked to cover the same examples."""
    first = runs[0]
    for other in runs[1:]:
        if other.ids != first.ids or other.gold != first.gold:
            raise ValueError(f"{task}: the runs' dev predictions cover different examples; "
                             "compare runs evaluated on the same dev rows")
    as_tensor = partial(torch.tensor, dtype=torch.float64)
    return as_tensor(first.gold), [as_tensor(r.predicted) for r in runs]


def bootstrap_differences(
    task: str, row: Sequence[DevPredictions], reference: Sequence[DevPredictions],
    replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0,
) -> Tensor:
    """[replicates] mean over seeds of metric(row) - metric(reference) on resampled examples.

    Not scipy.stats.bootstrap: its resamples come from numpy's generator, not this
    seeded torch one, so it would redraw them and move every committed interval.
    """
    gold, predicted = _aligned(task, [*row, *reference])
    n = len(gold)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (replicates, n), generator=generator)
    resampled_gold = gold[draws]
    scores = [_metric_rows(task, p[draws], resampled_gold) for p in predicted]
    k = len(row)
    return torch.stack([scores[i] - scores[k + i] for i in range(k)]).mean(dim=0)


def _percentiles(values: Tensor) -> tuple[float, float]:
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=values.dtype))
    return float(low), float(high)


def compare(row: Sequence[Run], reference: Sequence[Run],
            replicates: int = BOOTSTRAP_REPLICATES) -> dict[str, Comparison]:
    """Row minus reference for every metric both have, paired by seed."""
    ref_by_seed = {r.seed: r for r in reference}
    pairs = [(r, ref_by_seed[r.seed]) for r in sorted(row, key=lambda r: r.seed)
             if r.seed in ref_by_seed]
    if not pairs:
        return {}
    with_predictions = all(a.predictions is not None and b.predictions is not None
                           for a, b in pairs)
    boot: dict[str, Tensor] = {}
    comparisons: dict[str, Comparison] = {}
    for task, metric in TASK_METRICS.items():
        if not all(metric in a.dev and metric in b.dev for a, b in pairs):
            continue
        if with_predictions and all(task in a.predictions and task in b.predictions  # type: ignore[operator]
                                    for a, b in pairs):
            boot[metric] = bootstrap_differences(
                task, [a.predictions[task] for a, _ in pairs],  # type: ignore[index]
                [b.predictions[task] for _, b in pairs], replicates)  # type: ignore[index]
        comparisons[metric] = _comparison(metric, pairs, boot.get(metric))
    if all(m in comparisons for m in TASK_METRICS.values()) and all(
            "overall" in a.dev and "overall" in b.dev for a, b in pairs):
        overall_boot = None
        if all(m in boot for m in TASK_METRICS.values()):
            overall_boot = (boot["sst_acc"] + boot["para_acc"] + boot["sts_pearson"] / 2) / 3
        comparisons["overall"] = _comparison("overall", pairs, overall_boot)
    return comparisons


def _comparison(metric: str, pairs: Sequence[tuple[Run, Run]],
                boot: Tensor | None) -> Comparison:
    differences = [float(a.dev[metric]) - float(b.dev[metric]) for a, b in pairs]
    return Comparison(
        metric=metric,
        seeds=len(pairs),
        mean=statistics.fmean(differences),
        seed_interval=seed_interval(differences),
        example_interval=None if boot is None else _percentiles(boot),
    )
