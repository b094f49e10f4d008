"""`predict`: a trained run's predictions for dev or test-student files, as CSV with ids.

Inputs are the CS224N tab-separated files (labeled or not, test-student's extra
index column included); each output row holds the id, the predicted label and the
task's probabilities or unclipped score.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from bert_demo.evaluation.evaluate import predict_task, write_predictions
from bert_demo.run_folder.run_dir import load_trained, resolve_device, run_folder
from bert_demo.run_folder.safe_write import refuse_links
from bert_demo.tasks import PAPER_TASKS, get_task, guess_task
from bert_demo.tasks.data import find_data_dir, read_task_file
from bert_demo.training.speed import run_autocast


def default_inputs(data_dir: Path, tasks: Sequence[str] = PAPER_TASKS) -> list[tuple[str, Path]]:
    """Every dev and test-student file of ``tasks`` that exists in ``data_dir``."""
    found = []
    for task in tasks:
        for split in ("dev", "test-student"):
            path = data_dir / get_task(task).file_name(split)
            if path.is_file():
                found.append((task, path))
    return found


def predict_files(
    run: str | os.PathLike[str],
    inputs: list[str] | None = None,
    task: str | None = None,
    output: str | os.PathLike[str] | None = None,
    data: str | None = None,
    device: str | None = None,
    weights: str = "best",
    progress: bool = False,
    precision: str | None = None,
) -> list[tuple[Path, int]]:
    """Write one ``<input stem>-predictions.csv`` per input; returns (path, rows) of each.

    With one input and ``output`` ending in .csv, that is the file written; else
    ``output`` is a folder (default: RUN/predictions). ``precision``: see
    :func:`bert_demo.training.speed.run_autocast` (None: the run's own).
    """
    torch_device = resolve_device(device)
    model, tokenizer, config = load_trained(run, torch_device, weights)
    if inputs is None:
        data_dir = find_data_dir(data if data is not None else config.data)
        jobs = default_inputs(data_dir, tuple(model.heads))
        if not jobs:
            raise FileNotFoundError(f"no dev or test-student files in {data_dir}")
    else:
        jobs = [(task or guess_task(path), Path(path)) for path in inputs]
    run_dir = run_folder(run)
    single_file = output is not None and str(output).endswith(".csv")
    if single_file and len(jobs) != 1:
        raise ValueError(f"--output {output} names one CSV file but there are {len(jobs)} inputs")
    folder = Path(output) if output is not None and not single_file else run_dir / "predictions"
    # Inside the run (the default), no link the run holds may send the files elsewhere.
    root = run_dir if output is None else None
    if root is not None:
        refuse_links(folder, root)
    # Read every input first: a bad file is named before anything is written.
    inputs_read = []
    for job_task, path in jobs:
        examples = read_task_file(job_task, path)
        if not examples:
            raise ValueError(f"{path}: no rows to predict (only a header)")
        inputs_read.append((job_task, path, examples))
    named = "--output " if output is not None else ""
    targets = [Path(str(output)) if single_file else folder / f"{path.stem}-predictions.csv"
               for _, path, _ in inputs_read]
    _refuse_collisions(targets, [path for _, path, _ in inputs_read])
    # Make sure the predictions can be written before spending minutes on them.
    target_dir = Path(str(output)).parent if single_file else folder
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(target_dir, os.W_OK):
            raise PermissionError(13, "Permission denied", str(target_dir))
    except OSError as e:
        raise ValueError(f"{named}{output or folder}: cannot write predictions there "
                         f"({e.strerror or e})") from None
    written = []
    for (job_task, _, examples), target in zip(inputs_read, targets, strict=True):
        with run_autocast(precision, config.precision, torch_device):
            result = predict_task(
                model, job_task, examples, tokenizer, config.max_length,
                config.eval_batch_size, torch_device, progress,
            )
        try:
            written.append((write_predictions(target, result, root), len(result.ids)))
        except OSError as e:
            raise ValueError(f"{named}{target}: cannot write predictions there "
                             f"({e.strerror or e})") from None
    return written


def _refuse_collisions(targets: list[Path], inputs: list[Path]) -> None:
    """Two inputs whose predictions would go to one file (``a/batch.csv`` and
    ``b/batch.csv``): the second would silently replace the first."""
    seen: dict[Path, Path] = {}
    for target, source in zip(targets, inputs, strict=True):
        if target in seen:
            raise ValueError(f"--input {seen[target]} and {source} would both write {target}; "
                             "rename one, or predict them one at a time with --output FILE.csv")
        seen[target] = source
