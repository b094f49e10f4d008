"""A run's final dev predictions, one row per dev example, for statistics across runs.

``RUN/dev_predictions.csv.gz``: columns ``task,id,prediction,gold`` (SST class,
Quora 0/1, STS score to 4 decimals), gzip'd without a timestamp so that the same
predictions give the same bytes. About 4,000 rows, ~60 KB: small enough to commit
with an ablation, and what the bootstrap over dev examples in
:mod:`bert_demo.ablation.stats` resamples.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bert_demo.run_folder.safe_write import write_bytes

if TYPE_CHECKING:  # evaluate needs the demo extra (tqdm); ablate's table does not
    from bert_demo.evaluation.evaluate import TaskPredictions

DEV_PREDICTIONS = "dev_predictions.csv.gz"
COLUMNS = ["task", "id", "prediction", "gold"]


@dataclass(frozen=True)
class DevPredictions:
    """One task's predictions and gold labels, aligned, in dev-file order."""

    ids: tuple[str, ...]
    predicted: tuple[float, ...]
    gold: tuple[float, ...]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4f}"


def write_dev_predictions(
    path: str | os.PathLike[str], results: Mapping[str, TaskPredictions]
) -> Path:
    """Write every labeled task's predictions atomically (unlabeled tasks are skipped)."""
    return write_bytes(path, dev_predictions_bytes(results))


def dev_predictions_bytes(results: Mapping[str, TaskPredictions]) -> bytes:
    """The gzip'd CSV of :func:`write_dev_predictions` (the same predictions, the same bytes)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    for task, result in results.items():
        if result.gold is None:
            continue
        for example_id, predicted, gold in zip(result.ids, result.predicted, result.gold,
                                               strict=True):
            writer.writerow([task, example_id, _number(predicted), _number(gold)])
    return gzip.compress(text.getvalue().encode("utf-8"), mtime=0)


def read_dev_predictions(path: str | os.PathLike[str]) -> dict[str, DevPredictions]:
    """Task -> its predictions, from a file written by :func:`write_dev_predictions`."""
    path = Path(path)
    rows: dict[str, tuple[list[str], list[float], list[float]]] = {}
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != COLUMNS:
            raise ValueError(f"{path}:1: expected the columns {COLUMNS}, got {header}")
        for line, row in enumerate(reader, start=2):
            if len(row) != len(COLUMNS):
                raise ValueError(f"{path}:{line}: expected {len(COLUMNS)} fields, got {row}")
            task, example_id, predicted, gold = row
            try:
                values = float(predicted), float(gold)
            except ValueError:
                raise ValueError(f"{path}:{line}: prediction and gold must be numbers, "
                                 f"got {predicted!r}, {gold!r}") from None
            ids, preds, golds = rows.setdefault(task, ([], [], []))
            ids.append(example_id)
            preds.append(values[0])
            golds.append(values[1])
    return {task: DevPredictions(tuple(i), tuple(p), tuple(g))
            for task, (i, p, g) in rows.items()}
