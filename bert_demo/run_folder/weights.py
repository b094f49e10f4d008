"""Model-only weights of a run (safetensors) and the choice of the best evaluation.

A finished run keeps two model-only files instead of the optimizer checkpoint
(which is three times larger: it also holds AdamW's two moments):

    model.safetensors   the weights after the last step
    best.safetensors    the weights of the evaluation with the highest dev overall score

Each file carries what is needed to rebuild the model in its safetensors metadata
(the TrainConfig, the encoder's BertConfig, the step, epoch and dev metrics), so it
can be read without the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from bert_demo.run_folder.safe_write import write_bytes
from bert_demo.tasks import PAPER_TASKS, TASKS, Task

LAST_WEIGHTS = "model.safetensors"
BEST_WEIGHTS = "best.safetensors"
WEIGHTS_FORMAT = "bert_demo-weights-1"
# What evaluate/predict/analyze/export read by default.
WEIGHT_CHOICES = ("best", "last")


@dataclass(frozen=True)
class WeightsInfo:
    """The metadata of a weights file: where in training they come from."""

    config: dict[str, Any]  # TrainConfig.to_dict()
    encoder_config: dict[str, Any]  # BertConfig fields
    step: int
    epoch: float
    metrics: dict[str, float]  # dev metrics at that step ({} when not evaluated)

    def to_metadata(self) -> dict[str, str]:
        # safetensors metadata is str -> str only.
        return {"format": WEIGHTS_FORMAT, "config": json.dumps(self.config),
                "encoder_config": json.dumps(self.encoder_config), "step": str(self.step),
                "epoch": repr(self.epoch), "metrics": json.dumps(self.metrics)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None, path: Path) -> WeightsInfo:
        if not metadata or metadata.get("format") != WEIGHTS_FORMAT:
            raise ValueError(f"{path} is not a bert_demo weights file ({WEIGHTS_FORMAT})")
        return cls(json.loads(metadata["config"]), json.loads(metadata["encoder_config"]),
                   int(metadata["step"]), float(metadata["epoch"]), json.loads(metadata["metrics"]))


def save_weights(model: nn.Module, path: str | os.PathLike[str], info: WeightsInfo) -> Path:
    """Write the model's state dict (on the CPU, contiguous) and ``info``, atomically."""
    return write_bytes(path, weights_bytes(model, info))


def weights_bytes(model: nn.Module, info: WeightsInfo) -> bytes:
    """The safetensors file of ``model``'s state dict (on the CPU, contiguous) and ``info``."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save(state, metadata=info.to_metadata())


def read_info(path: str | os.PathLike[str]) -> WeightsInfo:
    """The metadata of a weights file, without reading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        return WeightsInfo.from_metadata(f.metadata(), path)


def read_weights(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], WeightsInfo]:
    from safetensors.torch import load_file

    info = read_info(path)
    return load_file(str(path), device="cpu"), info


def selection_score(metrics: dict[str, float], tasks: Sequence[str] | None = None) -> float:
    """What "best" maximises: the overall dev score when the run trained the paper's three
    tasks; else the mean of its trained tasks' scores (Pearson's r as (r + 1) / 2, as in
    the overall), so that untrained heads do not choose the weights.

    Without ``tasks`` (or when none of them has a score): the overall score, else the mean.
    """
    if tasks is not None and not set(PAPER_TASKS) <= set(tasks):
        scores = [_unit_score(TASKS[t], metrics[TASKS[t].metric_name]) for t in tasks
                  if TASKS[t].metric_name in metrics]
        if scores:
            return sum(scores) / len(scores)
    if "overall" in metrics:
        return metrics["overall"]
    return sum(metrics.values()) / len(metrics) if metrics else math.nan


def _unit_score(task: Task, value: float) -> float:
    return (value + 1) / 2 if task.kind == "score" else value
