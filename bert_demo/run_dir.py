"""A run folder: its layout, writing its files safely, and loading a trained model back.

    config.json      the TrainConfig (``--resume`` reads it back)
    checkpoint.pt    model, optimizer (PCGrad included), schedule, teacher, RNG, step
    metrics.jsonl    one JSON line per logged window of steps and per dev evaluation
    final.json       dev metrics and wall time once the run has finished

Every file but metrics.jsonl is written whole or not at all (:func:`atomic_write`),
so an interrupted write never leaves half a checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from bert_demo.config import TrainConfig
from bert_demo.model import BertConfig, BertModel, resolve_model_path
from bert_demo.multitask import MultitaskBert
from bert_demo.tasks import model_tasks
from bert_demo.tokenizer import WordPieceTokenizer

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
FINAL = "final.json"
CHECKPOINT_FORMAT = 1


class RunDirError(RuntimeError):
    """The output folder does not fit what was asked (an existing run, nothing to resume)."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once written, it replaces ``path`` in one rename.

    If the block raises, the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike[str], value: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def save_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def save_config(config: TrainConfig, path: str | os.PathLike[str]) -> None:
    write_json(path, config.to_dict())


def load_config(path: str | os.PathLike[str]) -> TrainConfig:
    """A run's config.json; a broken or hand-edited file gets an error naming it."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object of settings")
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def resolve_device(name: str | None) -> torch.device:
    """``None``: cuda when present, else cpu. A named cuda device must exist."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: bert_demo runs on cpu or cuda")
    return device


def run_folder(run: str | os.PathLike[str]) -> Path:
    """The run folder of ``run`` (a run folder or its checkpoint.pt)."""
    path = Path(run)
    return path if path.is_dir() else path.parent


class CheckpointUnreadable(ValueError):
    """checkpoint.pt cannot be read (cut short, overwritten, not a checkpoint)."""


def check_format(state: Any, path: Path) -> None:
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a bert_demo checkpoint (format {CHECKPOINT_FORMAT})")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """checkpoint.pt's content; a truncated or foreign file gets an error naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointUnreadable(
            f"{path}: not a readable bert_demo checkpoint (truncated or corrupt? {reason})"
        ) from None
    check_format(state, path)
    return state


def new_model(config: TrainConfig, encoder: BertModel) -> MultitaskBert:
    """The heads of ``config`` on ``encoder`` (the paper's three tasks, plus any other trained)."""
    return MultitaskBert(encoder, config.head_settings(), model_tasks(config.tasks))


def load_trained(
    run: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> tuple[MultitaskBert, WordPieceTokenizer, TrainConfig]:
    """Model, tokenizer and config of a run folder (or a checkpoint.pt path)."""
    path = Path(run)
    checkpoint_path = path / CHECKPOINT if path.is_dir() else path
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint_path}")
    state = read_checkpoint(checkpoint_path)
    try:
        config = TrainConfig.from_dict(json.loads(state["config"]))
        encoder = BertModel(BertConfig(**json.loads(state["encoder_config"])))
        model = new_model(config, encoder)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointUnreadable(
            f"{checkpoint_path}: does not describe a model this bert_demo can rebuild "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    model.to(device).eval()
    tokenizer = WordPieceTokenizer.from_folder(resolve_model_path(config.model))
    return model, tokenizer, config
