"""`predict`: a trained run's predictions for dev or test-student files, as CSV with ids."""

from __future__ import annotations

import os
from pathlib import Path

from bert_demo.data import find_data_dir
from bert_demo.datasets import DEV_FILES, TEST_FILES, guess_task, read_task_file
from bert_demo.evaluate import predict_task, write_predictions
from bert_demo.multitask import TASKS
from bert_demo.train import load_trained, resolve_device


def default_inputs(data_dir: Path) -> list[tuple[str, Path]]:
    """Every dev and test-student file of the three tasks that exists in ``data_dir``."""
    found = []
    for task in TASKS:
        for name in (DEV_FILES[task], TEST_FILES[task]):
            if (data_dir / name).is_file():
                found.append((task, data_dir / name))
    return found


def predict_files(
    run: str | os.PathLike[str],
    inputs: list[str] | None = None,
    task: str | None = None,
    output: str | os.PathLike[str] | None = None,
    data: str | None = None,
    device: str | None = None,
) -> list[tuple[Path, int]]:
    """Write one ``<input stem>-predictions.csv`` per input; returns (path, rows) of each.

    With one input and ``output`` ending in .csv, that is the file written; else
    ``output`` is a folder (default: RUN/predictions).
    """
    torch_device = resolve_device(device)
    model, tokenizer, config = load_trained(run, torch_device)
    if inputs is None:
        data_dir = find_data_dir(data if data is not None else config.data)
        jobs = default_inputs(data_dir)
        if not jobs:
            raise FileNotFoundError(f"no dev or test-student files in {data_dir}")
    else:
        jobs = [(task or guess_task(path), Path(path)) for path in inputs]
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    single_file = output is not None and str(output).endswith(".csv")
    if single_file and len(jobs) != 1:
        raise ValueError(f"--output {output} names one CSV file but there are {len(jobs)} inputs")
    folder = Path(output) if output is not None and not single_file else run_dir / "predictions"
    written = []
    for job_task, path in jobs:
        examples = read_task_file(job_task, path)
        result = predict_task(
            model, job_task, examples, tokenizer, config.max_length, config.eval_batch_size,
            torch_device,
        )
        target = Path(str(output)) if single_file else folder / f"{path.stem}-predictions.csv"
        written.append((write_predictions(target, result), len(result.ids)))
    return written
