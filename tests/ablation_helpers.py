"""Train functions for ablate's parallel tests: importable, so spawned workers can run them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from bert_demo.training.train import train


def train_recording_threads(config: Any, out: Path, **kwargs: Any) -> Any:
    """Train, leaving the worker's thread count and process id beside the run."""
    result = train(config, out, **kwargs)
    (Path(out) / "threads.txt").write_text(str(torch.get_num_threads()))
    (Path(out) / "pid.txt").write_text(str(os.getpid()))
    return result


def train_failing_stsaug(config: Any, out: Path, **kwargs: Any) -> Any:
    if config.sts_aug and not config.smart:
        raise RuntimeError(f"seed {config.seed} of stsaug fails on purpose")
    return train(config, out, **kwargs)
