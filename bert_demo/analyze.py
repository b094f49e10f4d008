"""`analyze`: the error analysis of the report as a tool.

Writes, for a trained run, the SST dev confusion matrix as a PNG and a markdown
report listing the largest dev errors of each task with their sentences:

    sst   wrong predictions, most confident first (probability of the predicted class)
    para  pairs whose predicted probability is furthest from the label
    sts   pairs whose predicted score is furthest from the gold score
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from bert_demo.batching import Example
from bert_demo.data import PairExample, SentenceExample, find_data_dir
from bert_demo.datasets import DEV_FILES, load_split
from bert_demo.evaluate import METRIC_OF_TASK, TaskPredictions, predict_task
from bert_demo.multitask import NUM_SENTIMENT_CLASSES, TASKS
from bert_demo.train import load_trained, resolve_device

SENTIMENT_NAMES = ("very negative", "negative", "neutral", "positive", "very positive")


def confusion_matrix(predicted: list[float], gold: list[float], classes: int) -> torch.Tensor:
    """counts[g, p]: how many examples of gold class g were predicted as p."""
    counts = torch.zeros(classes, classes, dtype=torch.long)
    for p, g in zip(predicted, gold, strict=True):
        counts[int(g), int(p)] += 1
    return counts


def plot_confusion(counts: torch.Tensor, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    # Any: the matplotlib type stubs here lag its real signatures.
    fig: Any
    ax: Any
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(counts.numpy(), cmap="Blues")
    ax.set_xticks(range(len(SENTIMENT_NAMES)), SENTIMENT_NAMES, rotation=30, ha="right")
    ax.set_yticks(range(len(SENTIMENT_NAMES)), SENTIMENT_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    peak = int(counts.max())
    for g in range(counts.shape[0]):
        for p in range(counts.shape[1]):
            value = int(counts[g, p])
            ax.text(p, g, str(value), ha="center", va="center",
                    color="white" if value > peak / 2 else "black")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def largest_errors(result: TaskPredictions, top: int) -> list[tuple[int, float]]:
    """(row, error size) of the ``top`` largest errors of a task, largest first."""
    if result.gold is None:
        raise ValueError(f"the {result.task} file has no labels")
    if result.task == "sst":
        confidence = result.outputs.softmax(-1).max(-1).values.tolist()
        errors = [(i, confidence[i]) for i, (p, g) in enumerate(
            zip(result.predicted, result.gold, strict=True)) if p != g]
    elif result.task == "para":
        probability = torch.sigmoid(result.outputs).tolist()
        errors = [(i, abs(probability[i] - g)) for i, g in enumerate(result.gold)]
    else:
        errors = [(i, abs(p - g)) for i, (p, g) in enumerate(
            zip(result.predicted, result.gold, strict=True))]
    return sorted(errors, key=lambda item: -item[1])[:top]


def _text(example: Example) -> str:
    if isinstance(example, SentenceExample):
        return example.sentence.strip()
    assert isinstance(example, PairExample)
    return f"{example.sentence1.strip()} // {example.sentence2.strip()}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def analyze(
    run: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    top: int = 10,
    data: str | None = None,
    max_eval_examples: int | None = None,
    device: str | None = None,
) -> Path:
    """Write sst_confusion.png and errors.md for a run; returns the markdown path."""
    if top < 1:
        raise ValueError(f"--top must be >= 1, got {top}")
    torch_device = resolve_device(device)
    model, tokenizer, config = load_trained(run, torch_device)
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    folder = Path(out) if out is not None else run_dir / "analysis"
    folder.mkdir(parents=True, exist_ok=True)
    data_dir = find_data_dir(data if data is not None else config.data)
    dev = load_split(data_dir, TASKS, DEV_FILES, max_eval_examples, random_subset=False)

    lines = [f"# Error analysis of {run_dir}", ""]
    for task in TASKS:
        result = predict_task(model, task, dev[task], tokenizer, config.max_length,
                              config.eval_batch_size, torch_device)
        lines += [f"## {task} ({METRIC_OF_TASK[task]} {result.metric():.4f})", ""]
        if task == "sst":
            assert result.gold is not None
            counts = confusion_matrix(result.predicted, result.gold, NUM_SENTIMENT_CLASSES)
            plot_confusion(counts, folder / "sst_confusion.png",
                           f"SST dev confusion (acc {result.metric():.3f})")
            lines += ["Confusion matrix (rows gold, columns predicted); "
                      "picture: sst_confusion.png", "",
                      "| gold \\ predicted | " + " | ".join(SENTIMENT_NAMES) + " |",
                      "|---" * (NUM_SENTIMENT_CLASSES + 1) + "|"]
            for g, name in enumerate(SENTIMENT_NAMES):
                lines.append(f"| {name} | " + " | ".join(str(int(c)) for c in counts[g]) + " |")
            lines.append("")
        header = {"sst": "confidence", "para": "|p - label|", "sts": "|score - gold|"}[task]
        lines += [f"Largest errors ({header}):", "",
                  f"| id | gold | predicted | {header} | text |", "|---|---|---|---|---|"]
        assert result.gold is not None
        for row, size in largest_errors(result, top):
            example = dev[task][row]
            predicted = result.predicted[row]
            shown = f"{predicted:.2f}" if task == "sts" else str(int(predicted))
            lines.append(f"| {example.id} | {result.gold[row]:g} | {shown} | {size:.3f} | "
                         f"{_cell(_text(example))} |")
        lines.append("")
    report = folder / "errors.md"
    report.write_text("\n".join(lines))
    return report
