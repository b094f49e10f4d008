"""Every task of the demo in one table: its files, outputs, loss, metric and settings.

    sst     SST-5 sentiment: 5 logits over the sentence vector, cross-entropy, accuracy
    para    Quora paraphrase: one logit per question pair, binary cross-entropy, accuracy
    sts     STS-B similarity: one score on 0..5 per pair, squared error, Pearson's r
    cfimdb  CFIMDB movie reviews: 2 logits, cross-entropy, accuracy (not trained by default)

Every other module reads a :class:`Task` from :data:`TASKS` instead of branching on
a task's name, so adding a task is one record here plus its batch-size setting in
:class:`bert_demo.config.TrainConfig`.

The data files are tab-separated (see :mod:`bert_demo.tasks.data`), named
``<file_prefix>-<split>.csv``; columns are found by header name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from bert_demo.tasks.metrics import accuracy, overall_score, pearson

TaskKind = Literal["classes", "binary", "score"]

# What SMART compares clean and perturbed outputs with, per kind of output:
# symmetric KL over softmax classes, Bernoulli symmetric KL for one logit,
# squared error for a regression score.
DIVERGENCE_OF_KIND: dict[str, str] = {"classes": "kl", "binary": "bkl", "score": "mse"}


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"label {text!r} is not a number") from None


def class_label(low: int, high: int) -> Callable[[str], float]:
    """Parser of an integer class label in low..high ("3" and "3.0" both read as 3)."""

    def parse(text: str) -> float:
        value = _number(text)
        if not value.is_integer() or not low <= value <= high:
            raise ValueError(f"label {text!r} is not an integer class in {low}..{high}")
        return int(value)

    return parse


def score_label(low: float, high: float) -> Callable[[str], float]:
    """Parser of a real-valued label in [low, high]."""

    def parse(text: str) -> float:
        value = _number(text)
        if not low <= value <= high:  # also rejects nan
            raise ValueError(f"label {text!r} is outside [{low}, {high}]")
        return value

    return parse


def _check_shapes(name: str, output: Tensor, labels: Tensor) -> None:
    # A [B] prediction against [B, 1] labels would broadcast to [B, B]: refuse it.
    if output.shape != labels.shape:
        raise ValueError(
            f"{name} output shape {tuple(output.shape)} != labels shape {tuple(labels.shape)}"
        )


@dataclass(frozen=True)
class Task:
    """One task: where its data is, what the model outputs for it, how it is scored."""

    name: str
    description: str
    # data: files <file_prefix>-<split>.csv, columns found by header name
    file_prefix: str
    text_columns: tuple[str, ...]  # one sentence, or the two of a pair
    label_column: str
    parse_label: Callable[[str], float]  # raises ValueError with a readable reason
    # model output, loss and prediction
    kind: TaskKind
    num_outputs: int  # logits per example for "classes"; one logit or score otherwise
    score_range: tuple[float, float] = (0.0, 1.0)  # "score" tasks: predictions are clipped here
    class_names: tuple[str, ...] = ()  # "classes" tasks: for reports
    # pair heads: initial scale/shift of a cosine head, bias of a cross-encoded head
    cosine_init: tuple[float, float] = (10.0, -7.0)
    cross_bias: float = 0.0
    # evaluation
    metric_name: str = ""
    metric_title: str = ""  # the column header in tables
    prediction_column: str = ""
    # the TrainConfig field holding this task's training batch size
    batch_setting: str = ""
    aliases: tuple[str, ...] = ()  # other names the data files go by

    @property
    def pairs(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def divergence(self) -> str:
        """The SMART divergence kind of this task's output."""
        return DIVERGENCE_OF_KIND[self.kind]

    @property
    def label_dtype(self) -> torch.dtype:
        return torch.long if self.kind == "classes" else torch.float32

    @property
    def min_eval_examples(self) -> int:
        """Fewest dev rows the metric is defined on (a correlation needs two points)."""
        return 2 if self.kind == "score" else 1

    def file_name(self, split: str) -> str:
        return f"{self.file_prefix}-{split}.csv"

    def loss(self, output: Tensor, labels: Tensor) -> Tensor:
        """The paper's losses: cross-entropy, BCE on a logit, squared error."""
        if self.kind == "classes":
            return F.cross_entropy(output, labels.long())
        _check_shapes(self.name, output, labels)
        if self.kind == "binary":
            return F.binary_cross_entropy_with_logits(output, labels.to(output.dtype))
        return F.mse_loss(output, labels.to(output.dtype))

    def predict(self, output: Tensor) -> Tensor:
        """Model output -> predicted label: a class, 0/1 from the logit's sign, a clipped score."""
        if self.kind == "classes":
            return output.argmax(-1)
        if self.kind == "binary":
            return (output > 0).long()
        return output.clamp(*self.score_range)

    def metric(self, predicted: Sequence[float], gold: Sequence[float]) -> float:
        if self.kind == "score":
            return pearson(predicted, gold)
        return accuracy(predicted, gold)

    def output_columns(self) -> tuple[str, ...]:
        """Prediction-file columns beside the label: class probabilities, P(1), raw score."""
        if self.kind == "classes":
            return tuple(f"prob_{i}" for i in range(self.num_outputs))
        if self.kind == "binary":
            return (f"prob_{self.label_column}",)
        return (f"raw_{self.label_column}",)

    def output_values(self, output: Tensor) -> Tensor:
        """[N, len(output_columns())] from the model outputs of N examples."""
        if self.kind == "classes":
            return output.softmax(-1)
        if self.kind == "binary":
            return torch.sigmoid(output)[:, None]
        return output[:, None]  # before clipping to the score range

    def format_prediction(self, value: float) -> str:
        return f"{value:.4f}" if self.kind == "score" else str(int(value))


SENTIMENT_NAMES = ("very negative", "negative", "neutral", "positive", "very positive")

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            name="sst", description="SST-5 sentiment (5 classes)",
            file_prefix="ids-sst", text_columns=("sentence",), label_column="sentiment",
            parse_label=class_label(0, 4), kind="classes", num_outputs=5,
            class_names=SENTIMENT_NAMES, metric_name="sst_acc", metric_title="SST acc",
            prediction_column="predicted_sentiment", batch_setting="batch_sst",
        ),
        Task(
            # Quora labels are written 0.0 / 1.0 and read as floats (BCE targets).
            # The cosine head's logit crosses 0 near cos 0.7.
            name="para", description="Quora paraphrase (duplicate or not)",
            file_prefix="quora", text_columns=("sentence1", "sentence2"),
            label_column="is_duplicate", parse_label=class_label(0, 1), kind="binary",
            num_outputs=1, cosine_init=(10.0, -7.0), cross_bias=0.0, metric_name="para_acc",
            metric_title="Quora acc",
            prediction_column="predicted_is_duplicate", batch_setting="batch_para",
            aliases=("quora",),
        ),
        Task(
            # The cosine head maps cosines (mostly 0..1) onto 0..5 from the start.
            name="sts", description="STS-B similarity (0..5)",
            file_prefix="sts", text_columns=("sentence1", "sentence2"), label_column="similarity",
            parse_label=score_label(0.0, 5.0), kind="score", num_outputs=1,
            score_range=(0.0, 5.0), cosine_init=(5.0, 0.0), cross_bias=2.5,
            metric_name="sts_pearson", metric_title="STS r",
            prediction_column="predicted_similarity",
            batch_setting="batch_sts",
        ),
        Task(
            name="cfimdb", description="CFIMDB movie reviews (positive or negative)",
            file_prefix="ids-cfimdb", text_columns=("sentence",), label_column="sentiment",
            parse_label=class_label(0, 1), kind="classes", num_outputs=2,
            class_names=("negative", "positive"), metric_name="cfimdb_acc",
            metric_title="CFIMDB acc",
            prediction_column="predicted_sentiment", batch_setting="batch_cfimdb",
        ),
    )
}

# The paper's three tasks: trained by default, and always evaluated so that every
# run (a single-task baseline too) reports the overall score.
PAPER_TASKS: tuple[str, ...] = ("sst", "para", "sts")


def get_task(name: str) -> Task:
    """The task called ``name`` (or one of its aliases, e.g. ``quora`` for ``para``)."""
    if name in TASKS:
        return TASKS[name]
    for task in TASKS.values():
        if name in task.aliases:
            return task
    raise ValueError(f"unknown task {name!r}: task must be one of {tuple(TASKS)}")


def model_tasks(trained: Sequence[str]) -> tuple[str, ...]:
    """Tasks a model has heads for and is evaluated on: the paper's three, then any other."""
    return (*PAPER_TASKS, *(t for t in TASKS if t in trained and t not in PAPER_TASKS))


def overall(metrics: dict[str, float]) -> float | None:
    """The CS224N overall score when every paper task was scored, else None."""
    names = [TASKS[t].metric_name for t in PAPER_TASKS]
    if not all(name in metrics for name in names):
        return None
    return overall_score(*(metrics[name] for name in names))


def guess_task(path: str | os.PathLike[str]) -> str:
    """The task of a data file from its name: the first task whose name or alias it contains."""
    name = Path(path).name.lower()
    for task in TASKS.values():
        if any(word in name for word in (task.name, *task.aliases)):
            return task.name
    raise ValueError(
        f"cannot tell the task of {path} from its name: pass --task {'|'.join(TASKS)}"
    )
