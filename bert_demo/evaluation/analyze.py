"""`analyze`: the error analysis of the report as a tool.

Writes, for a trained run, the dev confusion matrix of each class task (SST) as a
PNG and a markdown report listing the largest dev errors of each task with their
sentences, by the kind of task (see :mod:`bert_demo.tasks`). Only wrong predictions
are listed:

    classes  wrong classes, most confident first (probability of the predicted class)
    binary   wrong labels, the predicted probability furthest from the label first
    score    scores furthest from the gold score (any difference is an error)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from bert_demo.evaluation.evaluate import TaskPredictions, predict_task
from bert_demo.run_folder.run_dir import load_trained, resolve_device, run_folder
from bert_demo.run_folder.safe_write import atomic_write, refuse_links, write_text
from bert_demo.tasks import get_task
from bert_demo.tasks.data import (
    Example,
    PairExample,
    SentenceExample,
    find_data_dir,
    load_split,
    require_rows,
)
from bert_demo.training.speed import run_autocast

# What the largest errors are measured by, per kind of task.
ERROR_MEASURE = {"classes": "confidence", "binary": "|p - label|", "score": "|score - gold|"}


def confusion_matrix(predicted: list[float], gold: list[float], classes: int) -> torch.Tensor:
    """counts[g, p]: how many examples of gold class g were predicted as p."""
    counts = torch.zeros(classes, classes, dtype=torch.long)
    for p, g in zip(predicted, gold, strict=True):
        counts[int(g), int(p)] += 1
    return counts


def plot_confusion(
    counts: torch.Tensor, path: Path, root: Path | None, title: str, names: tuple[str, ...]
) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    # Any: the matplotlib type stubs here lag its real signatures.
    fig: Any
    ax: Any
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(counts.numpy(), cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
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
    with atomic_write(path, root) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def largest_errors(result: TaskPredictions, top: int) -> list[tuple[int, float]]:
    """(row, error size) of the ``top`` largest errors of a task, largest first."""
    if result.gold is None:
        raise ValueError(f"the {result.task} file has no labels")
    kind = get_task(result.task).kind
    if kind == "classes":
        confidence = result.outputs.softmax(-1).max(-1).values.tolist()
        errors = [(i, confidence[i]) for i, (p, g) in enumerate(
            zip(result.predicted, result.gold, strict=True)) if p != g]
    elif kind == "binary":
        probability = torch.sigmoid(result.outputs).tolist()
        errors = [(i, abs(probability[i] - g)) for i, (p, g) in enumerate(
            zip(result.predicted, result.gold, strict=True)) if p != g]
    else:
        errors = [(i, abs(p - g)) for i, (p, g) in enumerate(
            zip(result.predicted, result.gold, strict=True)) if p != g]
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
    weights: str = "best",
    progress: bool = False,
    precision: str | None = None,
) -> Path:
    """Write sst_confusion.png and errors.md for a run; returns the markdown path.

    ``precision``: see :func:`bert_demo.training.speed.run_autocast` (None: the run's own).
    """
    if top < 1:
        raise ValueError(f"--top must be >= 1, got {top}")
    torch_device = resolve_device(device)
    model, tokenizer, config = load_trained(run, torch_device, weights)
    run_dir = run_folder(run)
    # Inside the run, no link may take the report elsewhere (RUN/analysis itself included).
    folder, root = (Path(out), None) if out is not None else (run_dir / "analysis", run_dir)
    refuse_links(folder, root)
    folder.mkdir(parents=True, exist_ok=True)
    data_dir = find_data_dir(data if data is not None else config.data)
    tasks = tuple(model.heads)
    dev = load_split(data_dir, tasks, "dev", max_eval_examples, random_subset=False)
    require_rows(data_dir, "dev", dev, max_eval_examples)

    lines = [f"# Error analysis of {run_dir}", ""]
    for task in tasks:
        spec = get_task(task)
        with run_autocast(precision, config.precision, torch_device):
            result = predict_task(model, task, dev[task], tokenizer, config.max_length,
                                  config.eval_batch_size, torch_device, progress)
        lines += [f"## {task} ({spec.metric_name} {result.metric():.4f})", ""]
        if spec.kind == "classes":
            assert result.gold is not None
            names = spec.class_names
            counts = confusion_matrix(result.predicted, result.gold, spec.num_outputs)
            picture = f"{task}_confusion.png"
            plot_confusion(counts, folder / picture, root,
                           f"{task.upper()} dev confusion (acc {result.metric():.3f})", names)
            lines += ["Confusion matrix (rows gold, columns predicted); "
                      f"picture: {picture}", "",
                      "| gold \\ predicted | " + " | ".join(names) + " |",
                      "|---" * (spec.num_outputs + 1) + "|"]
            for g, name in enumerate(names):
                lines.append(f"| {name} | " + " | ".join(str(int(c)) for c in counts[g]) + " |")
            lines.append("")
        header = ERROR_MEASURE[spec.kind]
        lines += [f"Largest errors ({header}):", "",
                  f"| id | gold | predicted | {header} | text |", "|---|---|---|---|---|"]
        assert result.gold is not None
        for row, size in largest_errors(result, top):
            example = dev[task][row]
            predicted = result.predicted[row]
            shown = f"{predicted:.2f}" if spec.kind == "score" else str(int(predicted))
            lines.append(f"| {example.id} | {result.gold[row]:g} | {shown} | {size:.3f} | "
                         f"{_cell(_text(example))} |")
        lines.append("")
    report = folder / "errors.md"
    write_text(report, "\n".join(lines), root)
    return report
