"""The scores of the CS224N tasks: accuracy, Pearson's r and the overall score.

Pure functions of predicted and gold values; :mod:`bert_demo.tasks` says which
task uses which.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def accuracy(predicted: Sequence[float], gold: Sequence[float]) -> float:
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} labels")
    if not gold:
        raise ValueError("accuracy of an empty set")
    return sum(int(p == g) for p, g in zip(predicted, gold, strict=True)) / len(gold)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; NaN when either side is constant (r is undefined there)."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} predictions for {len(y)} labels")
    if len(x) < 2:
        raise ValueError("Pearson correlation needs at least two points")
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def overall_score(sst_acc: float, para_acc: float, sts_pearson: float) -> float:
    """The CS224N leaderboard score: r is mapped from [-1, 1] to [0, 1] first."""
    return (sst_acc + para_acc + (sts_pearson + 1) / 2) / 3
