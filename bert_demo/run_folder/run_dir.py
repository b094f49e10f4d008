"""Reading a run back: its settings, its checkpoint, a trained model and its tokenizer.

The names of a run's files are defined here and in the modules of what they hold
(weights, dev_predictions, encoder_files); what writes them, when, and what a folder
must hold to be a run is :class:`bert_demo.run_folder.folder.RunFolder`'s.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bert_demo.config import TrainConfig
from bert_demo.json_file import read_json_object
from bert_demo.model import BertConfig, BertModel, resolve_model_path
from bert_demo.model.multitask import MultitaskBert
from bert_demo.run_folder.encoder_files import encoder_files
from bert_demo.run_folder.safe_write import refuse_links
from bert_demo.run_folder.weights import (
    BEST_WEIGHTS,
    LAST_WEIGHTS,
    WEIGHT_CHOICES,
    read_weights,
)
from bert_demo.tasks import model_tasks

if TYPE_CHECKING:  # the tokenizers package is the demo extra's: imported when a run loads
    from bert_demo.model.tokenizer import WordPieceTokenizer

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
FINAL = "final.json"
CHECKPOINT_FORMAT = 1


class RunDirError(RuntimeError):
    """The output folder does not fit what was asked (an existing run, nothing to resume)."""


def load_config(path: str | os.PathLike[str]) -> TrainConfig:
    """A run's config.json; a broken or hand-edited file gets an error naming it."""
    values = read_json_object(path, what="a JSON object of settings")
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


@dataclass
class TrainedRun:
    """A trained model read back from a run, and where its weights come from."""

    model: MultitaskBert
    tokenizer: WordPieceTokenizer
    config: TrainConfig
    weights_file: Path
    step: int


def _weights_file(path: Path, weights: str) -> Path:
    """The file to read: ``path`` itself, or in a run folder the best/last weights."""
    if path.is_file():
        return path
    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"--weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    # The last weights are model.safetensors once the run finished, else its checkpoint;
    # a run without best weights (none evaluated yet, or older runs) falls back to them.
    names = (LAST_WEIGHTS, CHECKPOINT) if weights == "last" else (
        BEST_WEIGHTS, LAST_WEIGHTS, CHECKPOINT)
    for name in names:
        if (path / name).is_file():
            return refuse_links(path / name, path)  # the run's own file, not one it points to
    raise FileNotFoundError(f"no checkpoint at {path}: none of {', '.join(names)} is there")


def _read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], Any]:
    """best/model.safetensors; a truncated or foreign file gets an error naming it."""
    from safetensors import SafetensorError

    try:
        return read_weights(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointUnreadable(
            f"{path}: not a readable weights file (truncated or corrupt? {e})"
        ) from None


def load_run(
    run: str | os.PathLike[str], device: torch.device | str = "cpu", weights: str = "best"
) -> TrainedRun:
    """Model, tokenizer and config of a run folder (or of one of its weight files).

    ``weights``: ``best`` (the best dev evaluation) or ``last`` (the last step).
    The tokenizer comes from the run's own ``encoder/`` copy when it has one, so the
    run works without the model it was trained from.
    """
    path = Path(run)
    weights_file = _weights_file(path, weights)
    try:
        if weights_file.suffix == ".safetensors":
            state, info = _read_weights_file(weights_file)
            config = TrainConfig.from_dict(info.config)
            encoder_config, step = info.encoder_config, info.step
        else:
            checkpoint = read_checkpoint(weights_file)
            config = TrainConfig.from_dict(json.loads(checkpoint["config"]))
            encoder_config = json.loads(checkpoint["encoder_config"])
            step, state = int(checkpoint["step"]), checkpoint["model"]
        model = new_model(config, BertModel(BertConfig(**encoder_config)))
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        if isinstance(e, CheckpointUnreadable):
            raise
        raise CheckpointUnreadable(
            f"{weights_file}: does not describe a model this bert_demo can rebuild "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    from bert_demo.model.tokenizer import WordPieceTokenizer

    model.to(device).eval()
    own_files = encoder_files(weights_file.parent)
    tokenizer = WordPieceTokenizer.from_folder(
        own_files if own_files is not None else resolve_model_path(config.model))
    return TrainedRun(model, tokenizer, config, weights_file, step)


def load_trained(
    run: str | os.PathLike[str], device: torch.device | str = "cpu", weights: str = "best"
) -> tuple[MultitaskBert, WordPieceTokenizer, TrainConfig]:
    """Model, tokenizer and config of a run folder (or a weights file); see :func:`load_run`."""
    trained = load_run(run, device, weights)
    return trained.model, trained.tokenizer, trained.config
