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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from bert_demo.run_folder.safe_write import write_bytes

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


def selection_score(metrics: dict[str, float]) -> float:
    """What "best" maximises: the overall dev score (the mean metric when it is absent)."""
    if "overall" in metrics:
        return metrics["overall"]
    return sum(metrics.values()) / len(metrics) if metrics else math.nan


class BestWeights:
    """Keeps ``best.safetensors`` at the evaluation with the highest :func:`selection_score`.

    The score to beat is read back from the file, so a resumed run goes on comparing
    against the best of its first part. Ties keep the earlier weights; NaN never wins.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / BEST_WEIGHTS
        self.info = read_info(self.path) if self.path.is_file() else None

    @property
    def score(self) -> float:
        return -math.inf if self.info is None else selection_score(self.info.metrics)

    def consider(self, model: nn.Module, info: WeightsInfo) -> bool:
        """Save ``model`` when ``info.metrics`` beat the best so far; returns whether it did."""
        score = selection_score(info.metrics)
        if not score > self.score:  # also False for NaN
            return False
        save_weights(model, self.path, info)
        self.info = info
        return True

    def summary(self) -> dict[str, Any] | None:
        """final.json's ``best`` entry."""
        if self.info is None:
            return None
        return {"file": BEST_WEIGHTS, "step": self.info.step, "epoch": self.info.epoch,
                "dev": self.info.metrics}
