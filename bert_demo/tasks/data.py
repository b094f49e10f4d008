"""Readers for the CS224N multitask files, and STS augmentation by pair reversal.

The files are tab-separated with a header row. Their first column is an unnamed
row index; the ``*-test-student.csv`` files carry no label column (and the SST
and CFIMDB ones an extra leading index column). Columns are therefore found by
their header names, never by position::

    <index>  id  sentence             sentiment       SST (0..4), CFIMDB (0/1)
    <index>  id  sentence1 sentence2  is_duplicate    Quora (0.0/1.0)
    <index>  id  sentence1 sentence2  similarity      STS-B (0.0..5.0)

Fields follow the ``csv`` module's standard quoting (a field that starts with
``"`` is quoted, ``""`` inside it is one quote). That is how the files were
written: STS sentences such as ``"He said ""yes""."`` decode to ``He said
"yes".``; reading with quoting switched off would keep those quote marks. (The
Quora and CFIMDB texts were quoted twice upstream, so after decoding they still
hold some doubled quotes; we keep the text as the files define it.)

A malformed row raises :class:`DataFormatError` naming the file and line (bytes
that are not UTF-8, a field over the csv module's size limit included). An empty
sentence is an error by default; ``empty_text="keep"`` keeps it (prediction
answers every row) and ``"skip"`` drops it with a warning (training). The
other exception is an empty label cell: the real quora-train.csv has one (line
15624), the official 141k-pair file has a few, and the CS224N starter code
skipped them, so by default such a row is skipped with a warning
(``missing_label="error"`` makes it an error instead).
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from bert_demo.tasks import Task, get_task

__all__ = [
    "DataFormatError",
    "Example",
    "PairExample",
    "SentenceExample",
    "find_data_dir",
    "load_split",
    "read_pairs",
    "read_sentences",
    "read_task",
    "read_task_file",
    "require_rows",
    "reverse_pairs",
    "subset",
    "task_file",
]

Split = Literal["train", "dev", "test-student"]
SPLITS = ("train", "dev", "test-student")


class DataFormatError(ValueError):
    """A data file does not have the expected format; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class SentenceExample:
    """One single-sentence example (SST, CFIMDB). ``label`` is None in unlabeled files."""

    id: str
    sentence: str
    label: int | None


@dataclass(frozen=True)
class PairExample:
    """One sentence-pair example (Quora, STS). ``label`` is None in unlabeled files."""

    id: str
    sentence1: str
    sentence2: str
    label: float | None


Example = SentenceExample | PairExample


EmptyText = Literal["error", "skip", "keep"]


def _undecodable_line(path: Path) -> int:
    """The first line of ``path`` that is not UTF-8 (the text reader decodes ahead in blocks)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 1


def _csv_rows(path: Path, f: Iterable[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each row; a row the csv module cannot read names its line."""
    reader = csv.reader(f, delimiter="\t")
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataFormatError(f"{path}:{reader.line_num}: {e}") from None
        except UnicodeDecodeError as e:
            raise DataFormatError(
                f"{path}:{_undecodable_line(path)}: not UTF-8 text ({e.reason})"
            ) from None
        yield reader.line_num, row


def _read_rows(
    path: Path,
    fmt: Task,
    labeled: bool | None,
    missing_label: Literal["skip", "error"],
    empty_text: EmptyText = "error",
) -> list[tuple[str, list[str], float | None]]:
    """Parse a file into (id, texts, label) rows, validating every row."""
    if missing_label not in ("skip", "error"):
        raise ValueError(f"missing_label must be 'skip' or 'error', got {missing_label!r}")
    if empty_text not in ("error", "skip", "keep"):
        raise ValueError(f"empty_text must be 'error', 'skip' or 'keep', got {empty_text!r}")
    rows: list[tuple[str, list[str], float | None]] = []
    skipped: dict[str, list[int]] = {}  # reason -> lines
    with open(path, newline="", encoding="utf-8-sig") as f:  # a BOM (Excel, Notepad) is no part of the header
        lines = _csv_rows(path, f)
        try:
            _, header = next(lines)
        except StopIteration:
            raise DataFormatError(f"{path}:1: empty file, expected a header row") from None
        for name in ("id", *fmt.text_columns):
            if name not in header:
                raise DataFormatError(
                    f"{path}:1: header has no {name!r} column (columns: {header})"
                )
        has_label = fmt.label_column in header
        if labeled is True and not has_label:
            raise DataFormatError(
                f"{path}:1: header has no {fmt.label_column!r} label column (columns: {header})"
            )
        with_label = has_label if labeled is None else labeled
        id_col = header.index("id")
        text_cols = [header.index(name) for name in fmt.text_columns]
        label_col = header.index(fmt.label_column) if with_label else None

        for line, row in lines:
            where = f"{path}:{line}"
            if len(row) != len(header):
                raise DataFormatError(
                    f"{where}: expected {len(header)} tab-separated fields like the header, "
                    f"found {len(row)}"
                )
            texts = [row[c].strip() for c in text_cols]
            empty = [name for name, text in zip(fmt.text_columns, texts, strict=True) if not text]
            if empty and empty_text == "error":
                raise DataFormatError(f"{where}: empty {empty[0]!r}")
            if empty and empty_text == "skip":
                skipped.setdefault(f"an empty {empty[0]!r}", []).append(line)
                continue
            label: float | None = None
            if label_col is not None:
                cell = row[label_col].strip()
                if not cell and missing_label == "skip":
                    skipped.setdefault(f"an empty {fmt.label_column!r} label", []).append(line)
                    continue
                try:
                    label = fmt.parse_label(cell)
                except ValueError as e:
                    raise DataFormatError(f"{where}: {e}") from None
            rows.append((row[id_col].strip(), texts, label))
    if skipped:
        _warn_skipped(path, skipped)
    return rows


def _warn_skipped(path: Path, skipped: dict[str, list[int]]) -> None:
    """One warning per file, located at the data file's first skipped line (not at our code)."""

    def lines(numbers: list[int]) -> str:
        return ", ".join(map(str, numbers[:10])) + (" ..." if len(numbers) > 10 else "")

    parts = [f"{len(numbers)} row(s) with {reason} (line {lines(numbers)})"
             for reason, numbers in skipped.items()]
    first = min(n for numbers in skipped.values() for n in numbers)
    warnings.warn_explicit(
        f"{path}: skipped " + "; ".join(parts), UserWarning, str(path), first
    )


def read_sentences(
    path: str | os.PathLike[str],
    task: str = "sst",
    *,
    labeled: bool | None = None,
    missing_label: Literal["skip", "error"] = "skip",
    empty_text: EmptyText = "error",
) -> list[SentenceExample]:
    """Read an SST or CFIMDB file.

    ``labeled=None`` follows the header (test-student files have no label
    column); ``True`` demands a label column, ``False`` ignores it.
    ``empty_text``: a row with an empty sentence is an error, skipped (with one
    warning naming the lines) or kept (an empty sentence is valid input).
    """
    fmt = get_task(task)
    if fmt.pairs:
        raise ValueError(f"task {task!r} holds sentence pairs; use read_pairs")
    return [
        SentenceExample(id_, texts[0], None if label is None else int(label))
        for id_, texts, label in _read_rows(Path(path), fmt, labeled, missing_label, empty_text)
    ]


def read_pairs(
    path: str | os.PathLike[str],
    task: str = "sts",
    *,
    labeled: bool | None = None,
    missing_label: Literal["skip", "error"] = "skip",
    empty_text: EmptyText = "error",
) -> list[PairExample]:
    """Read a Quora or STS file (see :func:`read_sentences` for ``labeled``)."""
    fmt = get_task(task)
    if not fmt.pairs:
        raise ValueError(f"task {task!r} holds single sentences; use read_sentences")
    return [
        PairExample(id_, texts[0], texts[1], None if label is None else float(label))
        for id_, texts, label in _read_rows(Path(path), fmt, labeled, missing_label, empty_text)
    ]


def read_task(
    path: str | os.PathLike[str], task: str, **kwargs: bool | str | None
) -> list[SentenceExample] | list[PairExample]:
    """Read any task's file: :func:`read_sentences` or :func:`read_pairs` by task name."""
    if get_task(task).pairs:
        return read_pairs(path, task, **kwargs)  # type: ignore[arg-type]
    return read_sentences(path, task, **kwargs)  # type: ignore[arg-type]


def task_file(data_dir: str | os.PathLike[str], task: str, split: str) -> Path:
    """Path of a task's split, e.g. ``task_file(d, "sst", "dev")`` -> ``d/ids-sst-dev.csv``."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'dev' or 'test-student', got {split!r}")
    path = Path(data_dir) / get_task(task).file_name(split)
    if not path.is_file():
        raise FileNotFoundError(f"no {task} {split} file: {path} does not exist")
    return path


def find_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The data folder: ``explicit``, else ``$BERT_DEMO_DATA``, else ``../shared/data``.

    ``../shared/data`` is looked up from the current directory and, in a source
    checkout, from the repository root (never from an installed package's folder).
    """
    if explicit is not None:
        candidates, origin = [Path(explicit)], "the data argument"
    elif os.environ.get("BERT_DEMO_DATA"):
        candidates, origin = [Path(os.environ["BERT_DEMO_DATA"])], "$BERT_DEMO_DATA"
    else:
        candidates, origin = [Path.cwd().parent / "shared" / "data"], "the default"
        repo_root = Path(__file__).resolve().parents[2]  # bert_demo/tasks/data.py
        # Only a source checkout has a repository root; from an installed wheel this
        # folder is site-packages, and nothing beside it is the data.
        if (repo_root / "pyproject.toml").is_file():
            candidates.append(repo_root.parent / "shared" / "data")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"data folder not found ({origin}: {tried}); pass --data DIR or set BERT_DEMO_DATA "
        "to a folder holding the CS224N files (ids-sst-train.csv, quora-train.csv, ...)"
    )


def reverse_pairs(examples: Sequence[PairExample]) -> list[PairExample]:
    """stsAug: the examples followed by copies with the two sentences swapped.

    Similarity is symmetric, so each swapped pair keeps its label; applied to a
    batch it doubles the batch as in the paper.
    """
    swapped = [replace(e, sentence1=e.sentence2, sentence2=e.sentence1) for e in examples]
    return [*examples, *swapped]


def read_task_file(
    task: str,
    path: str | os.PathLike[str],
    labeled: bool | None = None,
    empty_text: EmptyText = "keep",
) -> list[Example]:
    """Read a file of ``task``; ``labeled=None`` follows the file's header.

    Rows with an empty sentence are kept by default: prediction answers every row.
    """
    get_task(task)  # an unknown task is named before a missing file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{task} data file {path} does not exist")
    return list(read_task(path, task, labeled=labeled, empty_text=empty_text))


def subset(examples: list[Example], limit: int | None) -> list[Example]:
    """A fixed random subset of ``limit`` rows (seed 0, file order kept), the same for every run."""
    if limit is None or limit >= len(examples):
        return examples
    generator = torch.Generator().manual_seed(0)
    keep = sorted(torch.randperm(len(examples), generator=generator)[:limit].tolist())
    return [examples[i] for i in keep]


def load_split(
    data_dir: Path, tasks: Sequence[str], split: Split, limit: int | None,
    random_subset: bool,
) -> dict[str, list[Example]]:
    """The labeled ``split`` of each task: a fixed random subset, or the first ``limit`` rows.

    Training skips rows with an empty sentence (one warning per file names them);
    evaluation keeps them, as prediction does.
    """
    loaded: dict[str, list[Example]] = {}
    empty_text: EmptyText = "skip" if split == "train" else "keep"
    for task in tasks:
        path = Path(data_dir) / get_task(task).file_name(split)
        examples = read_task_file(task, path, labeled=True, empty_text=empty_text)
        loaded[task] = subset(examples, limit) if random_subset else examples[:limit]
    return loaded


def require_rows(
    data_dir: Path, split: Split, loaded: dict[str, list[Example]], limit: int | None = None
) -> None:
    """Refuse a split a run cannot use: no training rows, fewer dev rows than a metric needs."""
    for task, examples in loaded.items():
        spec = get_task(task)
        path = Path(data_dir) / spec.file_name(split)
        if split == "train":
            if not examples:
                raise DataFormatError(f"{path}: no training rows")
            continue
        if len(examples) < spec.min_eval_examples:
            shown = f" (--max-eval-examples {limit})" if limit is not None else ""
            raise DataFormatError(
                f"{path}: {len(examples)} dev row(s){shown}; "
                f"{spec.metric_name} needs at least {spec.min_eval_examples}"
            )
