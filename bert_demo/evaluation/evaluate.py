"""Dev metrics and prediction files.

Each task's metric is named in :mod:`bert_demo.tasks` (``sst_acc``, ``para_acc``,
``sts_pearson``); ``overall`` is mean(sst_acc, para_acc, (sts_pearson + 1) / 2), the
CS224N score.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from bert_demo.model.multitask import MultitaskBert
from bert_demo.model.tokenizer import WordPieceTokenizer
from bert_demo.run_folder.safe_write import atomic_write
from bert_demo.tasks import get_task, overall
from bert_demo.tasks.batching import Example, eval_batches
from bert_demo.tasks.metrics import accuracy, overall_score, pearson

__all__ = ["TaskPredictions", "accuracy", "evaluate", "evaluate_with_predictions",
           "overall_score", "pearson", "predict_task", "write_predictions"]


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
        return get_task(self.task).metric(self.predicted, self.gold)


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
    progress: bool = False,
) -> TaskPredictions:
    """Run the model over examples of one task (eval mode, no gradient).

    ``progress``: a progress bar on stderr, counting examples.
    """
    if not examples:
        raise ValueError(f"no {task} examples to predict")
    was_training = model.training
    model.eval()
    order = _by_length(examples)
    ordered = [examples[i] for i in order]
    chunks: list[Tensor] = []
    bar = tqdm(total=len(examples), desc=task, unit="ex", disable=not progress, leave=False,
               dynamic_ncols=True)
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
            bar.update(min(batch_size, len(examples) - bar.n))
    finally:
        bar.close()
        model.train(was_training)
    sorted_outputs = torch.cat(chunks)
    outputs = torch.empty_like(sorted_outputs)
    outputs[torch.tensor(order)] = sorted_outputs
    predicted = [float(p) for p in get_task(task).predict(outputs).tolist()]
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
    progress: bool = False,
) -> dict[str, float]:
    """Dev metrics for every task in ``dev_sets``, plus ``overall`` when the paper's three are."""
    return evaluate_with_predictions(
        model, dev_sets, tokenizer, max_length, batch_size, device, progress)[0]


def evaluate_with_predictions(
    model: MultitaskBert,
    dev_sets: Mapping[str, Sequence[Example]],
    tokenizer: WordPieceTokenizer,
    max_length: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[dict[str, float], dict[str, TaskPredictions]]:
    """:func:`evaluate`'s metrics and the per-example predictions they were computed from."""
    metrics: dict[str, float] = {}
    results: dict[str, TaskPredictions] = {}
    for task, examples in dev_sets.items():
        result = predict_task(model, task, examples, tokenizer, max_length, batch_size, device,
                              progress)
        metrics[get_task(task).metric_name] = result.metric()
        results[task] = result
    score = overall(metrics)
    if score is not None:
        metrics["overall"] = score
    return metrics, results


def write_predictions(path: str | os.PathLike[str], result: TaskPredictions,
                      root: str | os.PathLike[str] | None = None) -> Path:
    """Write ``id,<prediction>,<outputs>`` rows (one per input row, input order) atomically.

    The outputs are the task's probabilities or unclipped score
    (:meth:`bert_demo.tasks.Task.output_columns`).
    """
    task = get_task(result.task)
    values = task.output_values(result.outputs).tolist()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, root) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", task.prediction_column, *task.output_columns()])
        for example_id, value, row in zip(result.ids, result.predicted, values, strict=True):
            writer.writerow([example_id, task.format_prediction(value),
                             *(f"{v:.6g}" for v in row)])
    return path
