"""Which file of the data folder holds which task, and reading it with the right reader."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from bert_demo.batching import Example
from bert_demo.data import read_pairs, read_sentences
from bert_demo.multitask import TASKS, check_task

TRAIN_FILES = {"sst": "ids-sst-train.csv", "para": "quora-train.csv", "sts": "sts-train.csv"}
DEV_FILES = {"sst": "ids-sst-dev.csv", "para": "quora-dev.csv", "sts": "sts-dev.csv"}
# The reduced Quora data has no test-student file; the others do.
TEST_FILES = {"sst": "ids-sst-test-student.csv", "para": "quora-test-student.csv",
              "sts": "sts-test-student.csv"}

# Our task names -> the data module's file formats.
DATA_TASK = {"sst": "sst", "para": "quora", "sts": "sts"}


def read_task_file(
    task: str, path: str | os.PathLike[str], labeled: bool | None = None
) -> list[Example]:
    """Read a CS224N file of ``task``; ``labeled=None`` follows the file's header."""
    check_task(task)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{task} data file {path} does not exist")
    if task == "sst":
        return list(read_sentences(path, "sst", labeled=labeled))
    return list(read_pairs(path, DATA_TASK[task], labeled=labeled))  # type: ignore[arg-type]


def guess_task(path: str | os.PathLike[str]) -> str:
    """The task of a file from its name (ids-sst-*, quora-*, sts-*)."""
    name = Path(path).name.lower()
    if "sst" in name:
        return "sst"
    if "quora" in name or "para" in name:
        return "para"
    if "sts" in name:
        return "sts"
    raise ValueError(f"cannot tell the task of {path} from its name: pass --task {'|'.join(TASKS)}")


def subset(examples: list[Example], limit: int | None) -> list[Example]:
    """A fixed random subset of ``limit`` rows (seed 0, file order kept), the same for every run."""
    if limit is None or limit >= len(examples):
        return examples
    generator = torch.Generator().manual_seed(0)
    keep = sorted(torch.randperm(len(examples), generator=generator)[:limit].tolist())
    return [examples[i] for i in keep]


def load_split(
    data_dir: Path, tasks: tuple[str, ...], files: dict[str, str], limit: int | None,
    random_subset: bool,
) -> dict[str, list[Example]]:
    split: dict[str, list[Example]] = {}
    for task in tasks:
        examples = read_task_file(task, data_dir / files[task], labeled=True)
        split[task] = subset(examples, limit) if random_subset else examples[:limit]
    return split
