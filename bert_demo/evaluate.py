"""Dev metrics and prediction files.

    sst_acc      accuracy over the 5 sentiment classes
    para_acc     accuracy of logit > 0 against is_duplicate
    sts_pearson  Pearson correlation of predicted and gold similarity
    overall      mean(sst_acc, para_acc, (sts_pearson + 1) / 2), the CS224N score
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bert_demo.batching import Example, eval_batches
from bert_demo.multitask import MultitaskBert, predictions
from bert_demo.tokenizer import WordPieceTokenizer

METRIC_OF_TASK = {"sst": "sst_acc", "para": "para_acc", "sts": "sts_pearson"}


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
    return (sst_acc + para_acc + (sts_pearson + 1) / 2) / 3


@dataclass
class TaskPredictions:
    """Raw outputs and predicted labels of one task, in the order of the input file."""

    task: str
    ids: list[str]
    outputs: Tensor  # sst [N, 5] logits; para [N] logits; sts [N] scores
    predicted: list[float]
    gold: list[float] | None

    def metric(self) -> float:
        if self.gold is None:
            raise ValueError(f"the {self.task} file has no labels to score against")
        if self.task == "sts":
            return pearson(self.predicted, self.gold)
        return accuracy(self.predicted, self.gold)


def _by_length(examples: Sequence[Example]) -> list[int]:
    """Indices sorted by text length, so each batch pads little (evaluation is forward-only)."""

    def length(e: Example) -> int:
        if hasattr(e, "sentence"):
            return len(e.sentence)
        return max(len(e.sentence1), len(e.sentence2))

    return sorted(range(len(examples)), key=lambda i: length(examples[i]))


@torch.no_grad()
def predict_task(
    model: MultitaskBert,
    task: str,
    examples: Sequence[Example],
    tokenizer: WordPieceTokenizer,
    max_length: int,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> TaskPredictions:
    """Run the model over examples of one task (eval mode, no gradient)."""
    if not examples:
        raise ValueError(f"no {task} examples to predict")
    was_training = model.training
    model.eval()
    order = _by_length(examples)
    ordered = [examples[i] for i in order]
    chunks: list[Tensor] = []
    try:
        for batch in eval_batches(
            task, ordered, tokenizer, max_length, batch_size, model.separate_pairs
        ):
            batch = batch.to(device)
            chunks.append(
                model(task, batch.input_ids, batch.attention_mask, batch.token_type_ids)
                .float()
                .cpu()
            )
    finally:
        model.train(was_training)
    sorted_outputs = torch.cat(chunks)
    outputs = torch.empty_like(sorted_outputs)
    outputs[torch.tensor(order)] = sorted_outputs
    predicted = [float(p) for p in predictions(task, outputs).tolist()]
    labels = [e.label for e in examples]
    gold = None if any(label is None for label in labels) else [float(x) for x in labels]  # type: ignore[arg-type]
    return TaskPredictions(task, [e.id for e in examples], outputs, predicted, gold)


def evaluate(
    model: MultitaskBert,
    dev_sets: Mapping[str, Sequence[Example]],
    tokenizer: WordPieceTokenizer,
    max_length: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Dev metrics for every task in ``dev_sets``, plus ``overall`` when all three are there."""
    metrics: dict[str, float] = {}
    for task, examples in dev_sets.items():
        result = predict_task(model, task, examples, tokenizer, max_length, batch_size, device)
        metrics[METRIC_OF_TASK[task]] = result.metric()
    if all(name in metrics for name in METRIC_OF_TASK.values()):
        metrics["overall"] = overall_score(
            metrics["sst_acc"], metrics["para_acc"], metrics["sts_pearson"]
        )
    return metrics


PREDICTION_HEADER = {
    "sst": "predicted_sentiment",
    "para": "predicted_is_duplicate",
    "sts": "predicted_similarity",
}


def write_predictions(path: str | os.PathLike[str], result: TaskPredictions) -> Path:
    """Write ``id,<prediction>`` rows (one per input row, input order) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", PREDICTION_HEADER[result.task]])
        for example_id, value in zip(result.ids, result.predicted, strict=True):
            text = f"{value:.4f}" if result.task == "sts" else str(int(value))
            writer.writerow([example_id, text])
    os.replace(tmp, path)
    return path
