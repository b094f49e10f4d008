"""Training settings and the named presets (`paper`, `quick`).

A run is fully described by one :class:`TrainConfig`; it is saved as config.json
beside the checkpoint and restored by ``--resume``. Command-line flags override
the preset, which overrides the defaults below.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from bert_demo.multitask import TASKS, HeadSettings

OPTIMIZERS = ("adamw", "torch-adamw", "lamb", "radam")
MODES = ("finetune", "pretrain")
SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class TrainConfig:
    # what to train on
    model: str | None = None  # None: the packaged MiniLM-L6-H384
    data: str | None = None  # None: $BERT_DEMO_DATA, else ../shared/data
    tasks: tuple[str, ...] = TASKS
    mode: str = "finetune"  # finetune: everything trains; pretrain: frozen encoder, heads only
    # the paper's three methods
    smart: bool = False
    pcgrad: bool = False
    sts_aug: bool = False
    # optimisation
    optimizer: str = "adamw"
    lr: float = 1e-5
    head_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup: float = 0.0  # fraction of all steps with a linear warm-up
    epochs: int = 10
    steps_per_epoch: int | None = None  # None: the largest task's batches per pass over its data
    max_steps: int | None = None  # stop after this many steps in all (overrides epochs)
    batch_sst: int = 2
    batch_para: int = 20
    batch_sts: int = 2
    max_length: int = 128
    length_buckets: int = 50  # sort windows of this many batches by length (1: off)
    max_train_examples: int | None = None  # per task, a fixed random subset
    max_eval_examples: int | None = None  # per task, the first rows of each dev file
    eval_batch_size: int = 64
    # model
    encoder_dropout: float = 0.1
    pooling: str = "cls"
    pair_encoding: str = "separate"
    para_head: str = "features"
    sts_head: str = "cosine"
    head_dropout: float = 0.3
    # SMART (Jiang et al. 2020), the paper's settings
    smart_lambda: float = 5.0
    smart_epsilon: float = 1e-4
    smart_sigma: float = 1e-4
    smart_eta: float = 1e-2
    smart_steps: int = 1
    bregman_mu: float = 1.0
    # bookkeeping
    seed: int = 0
    log_every: int = 20
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. ablation row)

    def __post_init__(self) -> None:
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"tasks: unknown task {task!r}; choose from {TASKS}")
        if not self.tasks:
            raise ValueError("tasks: at least one task is needed")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: {self.tasks} names a task twice")
        _choice("mode", self.mode, MODES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        for name in ("epochs", "batch_sst", "batch_para", "batch_sts", "max_length",
                     "eval_batch_size", "smart_steps", "log_every", "length_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps_per_epoch", "max_steps", "max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or unset), got {value}")
        if self.lr <= 0 or (self.head_lr is not None and self.head_lr <= 0):
            raise ValueError("lr and head_lr must be > 0")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")
        if self.pcgrad and len(self.tasks) < 2:
            raise ValueError("pcgrad needs at least two tasks (it resolves conflicts between them)")
        if self.sts_aug and "sts" not in self.tasks:
            raise ValueError("sts_aug needs the sts task")
        self.head_settings()  # validates pooling, pair_encoding, heads, head_dropout

    def head_settings(self) -> HeadSettings:
        return HeadSettings(
            pooling=self.pooling,  # type: ignore[arg-type]
            pair_encoding=self.pair_encoding,  # type: ignore[arg-type]
            para_head=self.para_head,  # type: ignore[arg-type]
            sts_head=self.sts_head,  # type: ignore[arg-type]
            head_dropout=self.head_dropout,
        )

    def batch_size(self, task: str) -> int:
        return {"sst": self.batch_sst, "para": self.batch_para, "sts": self.batch_sts}[task]

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["tasks"] = list(self.tasks)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s): {unknown}")
        values = dict(values)
        if "tasks" in values:
            values["tasks"] = tuple(values["tasks"])
        return cls(**values)

    def save(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainConfig:
        try:
            values = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from e
        return cls.from_dict(values)

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        return replace(self, **overrides)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


# The report's settings: lr 1e-5, dropout 0.1 (encoder) / 0.3 (heads), batch sizes
# 2/20/2 (stsAug doubles STS to 4), 10 epochs, SMART lambda 5, eps 1e-4, sigma 1e-4,
# mu 1, eta 1e-2. An epoch is one pass over the largest task's batches.
PAPER: dict[str, Any] = {
    "lr": 1e-5,
    "encoder_dropout": 0.1,
    "head_dropout": 0.3,
    "batch_sst": 2,
    "batch_para": 20,
    "batch_sts": 2,
    "epochs": 10,
    "pooling": "cls",
    "schedule": "constant",
    "smart_lambda": 5.0,
    "smart_epsilon": 1e-4,
    "smart_sigma": 1e-4,
    "bregman_mu": 1.0,
    "smart_eta": 1e-2,
}

# Sized for a 2-core CPU with the packaged MiniLM: 534 steps (two passes over SST)
# and two dev evaluations took 21 CPU-minutes (21 min wall on a 2-core box shared
# with other jobs, one thread); the measured scores are in the README.
QUICK: dict[str, Any] = {
    "lr": 1.5e-4,
    "head_lr": 1e-3,
    "encoder_dropout": 0.1,
    "head_dropout": 0.1,
    "batch_sst": 32,
    "batch_para": 16,
    "batch_sts": 8,
    "max_length": 64,
    "epochs": 2,
    "steps_per_epoch": 267,  # one pass over SST's 8,544 sentences
    "pooling": "mean",
    "schedule": "linear",
    "warmup": 0.1,
    "weight_decay": 0.01,
}

PRESETS: dict[str, dict[str, Any]] = {"paper": PAPER, "quick": QUICK}


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return TrainConfig(**{**PRESETS[name], **overrides})
