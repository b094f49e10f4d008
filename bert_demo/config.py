"""Training settings and the named presets (`paper`, `quick`, `full`).

A run is fully described by one :class:`TrainConfig`; it is saved as config.json
beside the checkpoint and restored by ``--resume``. Command-line flags override
the preset, which overrides the defaults below.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import Field, asdict, dataclass, field, fields, replace
from typing import Any

from bert_demo.model.multitask import HeadSettings
from bert_demo.tasks import PAPER_TASKS, TASKS, get_task
from bert_demo.training.speed import ADAMW_IMPLS, PRECISIONS
from bert_demo.training.weighting import HELP as WEIGHTING_HELP
from bert_demo.training.weighting import WEIGHTINGS, weighting_refusal
from gradtools.aggregation import available as available_aggregators

OPTIMIZERS = ("adamw", "torch-adamw", "lamb", "radam")
MODES = ("finetune", "frozen")
# Older names still accepted (runs saved before the rename say "pretrain").
MODE_ALIASES = {"pretrain": "frozen"}
SCHEDULES = ("constant", "linear")
POOLINGS = ("mean", "cls")
PAIR_ENCODINGS = ("separate", "cross")
PAIR_HEADS = ("features", "cosine")


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    method: bool = False,
    flag: bool = True,
    unset: str | None = None,
) -> Any:
    """A TrainConfig field with its help text and valid values, read by the CLI and checks.

    ``ge``/``gt``/``lt`` bound a number (which must also be finite); ``method``
    marks the paper's on/off methods (``ablate`` sets those per row); ``flag=False``
    keeps a field off the command line; ``unset`` says what a None default means.
    """
    metadata = {"help": help, "choices": choices, "ge": ge, "gt": gt, "lt": lt,
                "method": method, "flag": flag, "unset": unset}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    # what to train on
    model: str | None = setting(None, "model folder or cached hub id",
                                unset="the packaged MiniLM-L6-H384")
    data: str | None = setting(None, "data folder", unset="$BERT_DEMO_DATA, else ../shared/data")
    tasks: tuple[str, ...] = setting(PAPER_TASKS, "tasks to train", choices=tuple(TASKS))
    mode: str = setting("finetune", "finetune: everything trains; frozen: frozen encoder, "
                        "heads only ('pretrain' is accepted as an old name)", choices=MODES)
    # the paper's three methods
    smart: bool = setting(False, "SMART adversarial regularization with the momentum Bregman "
                          "teacher", method=True)
    # How the task gradients are combined (the paper's PCGrad is one way): one setting.
    aggregator: str | None = setting(
        None, "gradtools aggregator combining the task gradients: pcgrad (the paper's PCGrad "
        "gradient surgery; --pcgrad is short for it), upgrad, mgda, ...", choices=(
            *available_aggregators(),), unset="none, the gradients' sum", method=True)
    # How the task losses are weighted before they are summed or aggregated: one setting.
    weighting: str | None = setting(None, WEIGHTING_HELP, choices=tuple(WEIGHTINGS),
                                    unset="none, every loss weighs 1", method=True)
    sts_aug: bool = setting(False, "STS pair reversal, doubling the STS batch", method=True)
    # beyond the paper: its future work (MNRL)
    mnrl_weight: float = setting(
        0.0, "weight of the multiple negatives ranking loss on Quora duplicate pairs with "
        "in-batch negatives, added to the Quora loss (0: off)", ge=0, method=True)
    mnrl_scale: float = setting(
        20.0, "MNRL's scale: cosine similarities times this are the logits (1/temperature)",
        gt=0)
    # optimisation
    optimizer: str = setting("adamw", "optimizer (adamw is gradtools.AdamW)", choices=OPTIMIZERS)
    adamw_impl: str = setting(
        "for-loop", "gradtools.AdamW's implementation: fused (torch.compile'd, foreach where "
        "that does not compile), foreach, for-loop (the exact reference)", choices=ADAMW_IMPLS)
    precision: str = setting(
        "fp32", "forward passes in bf16 autocast (weights, optimizer state and losses stay "
        "fp32), fp32, or auto: bf16 where the CPU/GPU has bf16 units", choices=PRECISIONS)
    lr: float = setting(1e-5, "learning rate of the encoder", gt=0)
    head_lr: float | None = setting(None, "learning rate of the heads", gt=0, unset="--lr")
    weight_decay: float = setting(0.0, "decoupled weight decay", ge=0)
    schedule: str = setting("constant", "learning-rate schedule", choices=SCHEDULES)
    warmup: float = setting(0.0, "fraction of all steps with a linear warm-up", ge=0, lt=1)
    epochs: int = setting(10, "passes over the largest task", ge=1)
    steps_per_epoch: int | None = setting(
        None, "steps per epoch", ge=1, unset="the largest task's batches per pass")
    max_steps: int | None = setting(
        None, "stop after this many steps in all (overrides epochs)", ge=1, unset="no limit")
    batch_sst: int = setting(2, "SST batch size", ge=1)
    batch_para: int = setting(20, "Quora batch size", ge=1)
    batch_sts: int = setting(2, "STS batch size, before --sts-aug doubles it", ge=1)
    batch_cfimdb: int = setting(8, "CFIMDB batch size (when trained)", ge=1)
    max_length: int = setting(128, "tokens per sentence (or per pair when cross-encoded)", ge=1)
    length_buckets: int = setting(
        50, "sort windows of this many batches by length (1: off)", ge=1)
    max_train_examples: int | None = setting(
        None, "per task, a fixed random subset of the training rows", ge=1, unset="all")
    max_eval_examples: int | None = setting(
        None, "per task, the first rows of each dev file", ge=1, unset="all")
    eval_batch_size: int = setting(64, "batch size of evaluation", ge=1)
    # model
    encoder_dropout: float = setting(0.1, "dropout inside the encoder", ge=0, lt=1)
    pooling: str = setting(HeadSettings.pooling, "sentence vector: BERT's [CLS] pooler or the "
                           "masked mean", choices=POOLINGS)
    pair_encoding: str = setting(HeadSettings.pair_encoding, "encode the two sentences of a "
                                 "pair apart or as one sequence", choices=PAIR_ENCODINGS)
    para_head: str = setting(HeadSettings.para_head, "Quora head in separate mode",
                             choices=PAIR_HEADS)
    sts_head: str = setting(HeadSettings.sts_head, "STS head in separate mode",
                            choices=PAIR_HEADS)
    head_dropout: float = setting(HeadSettings.head_dropout, "dropout before the heads",
                                  ge=0, lt=1)
    # SMART (Jiang et al. 2020), the paper's settings
    smart_lambda: float = setting(5.0, "weight of SMART's adversarial term", ge=0)
    smart_epsilon: float = setting(1e-4, "radius of the perturbation ball", gt=0)
    smart_sigma: float = setting(1e-4, "std of the initial perturbation noise", ge=0)
    smart_eta: float = setting(1e-2, "step size of the adversarial ascent", gt=0)
    smart_steps: int = setting(1, "adversarial ascent steps", ge=1)
    bregman_mu: float = setting(1.0, "weight of the Bregman proximal term (0: no teacher)", ge=0)
    # bookkeeping
    seed: int = setting(0, "random seed", ge=0)
    log_every: int = setting(20, "steps per metrics.jsonl record", ge=1)
    # free-form notes (e.g. the ablation row); not a flag
    extra: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "free-form notes", "flag": False, "choices": None,
        "ge": None, "gt": None, "lt": None})

    def __post_init__(self) -> None:
        if self.mode in MODE_ALIASES:
            object.__setattr__(self, "mode", MODE_ALIASES[self.mode])
        for spec in fields(self):
            check_value(spec, getattr(self, spec.name))
        for task in self.tasks:
            get_task(task)
        if not self.tasks:
            raise ValueError("tasks: at least one task is needed")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: {self.tasks} names a task twice")
        if self.aggregator is not None and len(self.tasks) < 2:
            raise ValueError(f"{self.aggregator} needs at least two tasks (it combines their "
                             "gradients)")
        if self.weighting is not None:
            self._check_weighting(self.weighting)
        if self.mnrl_weight > 0:
            # Settings under which MNRL could never produce a gradient are refused.
            if "para" not in self.tasks:
                raise ValueError("mnrl_weight needs the para task (its duplicate pairs)")
            if self.pair_encoding != "separate":
                raise ValueError("mnrl_weight needs pair_encoding 'separate' (it compares the "
                                 "two questions' sentence vectors)")
            if self.batch_para < 2:
                raise ValueError("mnrl_weight needs batch_para >= 2 (a batch of one pair has no "
                                 "in-batch negative)")
            if self.mode == "frozen":  # also 'pretrain', renamed above
                raise ValueError("mnrl_weight needs mode 'finetune' (with a frozen encoder the "
                                 "sentence vectors MNRL trains cannot change)")
        if self.sts_aug and "sts" not in self.tasks:
            raise ValueError("sts_aug needs the sts task")

    def _check_weighting(self, weighting: str) -> None:
        """Refuse --weighting where it cannot act (see bert_demo.training.weighting)."""
        if len(self.tasks) < 2:
            raise ValueError(f"--weighting {weighting} needs at least two tasks (it weighs "
                             f"their losses against each other), got --tasks {self.tasks[0]}")
        refusal = weighting_refusal(weighting, self.aggregator)
        if refusal is not None:
            raise ValueError(refusal)
        if weighting == "famo" and self.smart:
            raise ValueError("--weighting famo cannot be combined with --smart: FAMO compares "
                             "each loss before and after the step on the same batch, and "
                             "SMART's terms draw new noise when recomputed")
        if weighting == "gradnorm" and self.mode == "frozen":
            raise ValueError("--weighting gradnorm needs --mode finetune: it reads the task "
                             "gradients on the encoder's last layer, which --mode frozen "
                             "freezes")

    @property
    def combines_task_gradients(self) -> bool:
        """Whether an aggregator (PCGrad among them) combines per-task gradients."""
        return self.aggregator is not None

    @property
    def pcgrad(self) -> bool:
        """The paper's PCGrad: ``aggregator == "pcgrad"`` (``--pcgrad`` is short for it)."""
        return self.aggregator == "pcgrad"

    def head_settings(self) -> HeadSettings:
        return HeadSettings(
            pooling=self.pooling,  # type: ignore[arg-type]
            pair_encoding=self.pair_encoding,  # type: ignore[arg-type]
            para_head=self.para_head,  # type: ignore[arg-type]
            sts_head=self.sts_head,  # type: ignore[arg-type]
            head_dropout=self.head_dropout,
        )

    def batch_size(self, task: str) -> int:
        value: int = getattr(self, get_task(task).batch_setting)
        return value

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["tasks"] = list(self.tasks)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)} | set(RENAMED)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s): {unknown}")
        values = normalize_settings(values)
        if isinstance(values.get("tasks"), list):
            values["tasks"] = tuple(values["tasks"])
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        return replace(self, **overrides)


# Settings of earlier versions, read from their config.json, checkpoints and weights files.
RENAMED = ("pcgrad",)


def normalize_settings(values: dict[str, Any]) -> dict[str, Any]:
    """Saved settings in today's names: ``pcgrad: true`` (before ``--aggregator`` took
    PCGrad among its values) is ``aggregator: "pcgrad"``, ``pcgrad: false`` nothing; so a
    run saved then and the same run saved now compare equal."""
    values = dict(values)
    if values.pop("pcgrad", False) is True:
        if values.get("aggregator") not in (None, "pcgrad"):
            raise ValueError(f"aggregator {values['aggregator']!r} and pcgrad: give one of "
                             "the two")
        values["aggregator"] = "pcgrad"
    return values


def field_type(spec: Field[Any]) -> tuple[type, bool]:
    """(the value type, whether None is allowed) of a TrainConfig field."""
    hint = _HINTS[spec.name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    origin = typing.get_origin(hint)
    return (origin if origin is not None else hint), False


def bounds_text(spec: Field[Any]) -> str:
    """``> 0``, ``in [0, 1)``, ... for a numeric field ('' when unbounded)."""
    meta = spec.metadata
    low = f"[{meta['ge']:g}" if meta["ge"] is not None else (
        f"({meta['gt']:g}" if meta["gt"] is not None else None)
    if meta["lt"] is not None:
        return f"in {low or '(-inf'}, {meta['lt']:g})"
    if meta["ge"] is not None:
        return f">= {meta['ge']:g}"
    if meta["gt"] is not None:
        return f"> {meta['gt']:g}"
    return ""


def check_value(spec: Field[Any], value: Any) -> None:
    """Raise ValueError naming the field when ``value`` has the wrong type or range."""
    kind, optional = field_type(spec)
    if value is None and optional:
        return
    name = spec.name
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        expected = {float: "a number", int: "an integer", str: "a string", bool: "true or false",
                    tuple: "a list", dict: "a mapping"}.get(kind, kind.__name__)
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    meta = spec.metadata
    choices = meta.get("choices")
    if choices is not None:
        for item in value if kind is tuple else (value,):
            if item not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {item!r}")
    if kind in (int, float):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        too_low = (meta["ge"] is not None and value < meta["ge"]) or (
            meta["gt"] is not None and value <= meta["gt"])
        too_high = meta["lt"] is not None and value >= meta["lt"]
        if too_low or too_high:
            raise ValueError(f"{name} must be {bounds_text(spec)}, got {value!r}")


_HINTS = typing.get_type_hints(TrainConfig)


# The presets run as fast as the machine allows; TrainConfig's own defaults (fp32,
# the for-loop AdamW) are the exact, machine-independent reference.
_FAST: dict[str, Any] = {"precision": "auto", "adamw_impl": "fused"}

# The report's settings: lr 1e-5, dropout 0.1 (encoder) / 0.3 (heads), batch sizes
# 2/20/2 (stsAug doubles STS to 4), 10 epochs, SMART lambda 5, eps 1e-4, sigma 1e-4,
# mu 1, eta 1e-2. An epoch is one pass over the largest task's batches.
PAPER_PRESET: dict[str, Any] = {
    **_FAST,
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

# Sized for a 2-core CPU without bf16 units (fp32) and the packaged MiniLM: one
# epoch of 267 steps (one pass over SST's 8,544 sentences) and one dev evaluation,
# about 10 minutes on two idle cores. Two epochs scored a little higher (README,
# "Scores") but took 20 minutes, and the ablation runs this preset 36 times.
QUICK_PRESET: dict[str, Any] = {
    **_FAST,
    "lr": 1.5e-4,
    "head_lr": 1e-3,
    "encoder_dropout": 0.1,
    "head_dropout": 0.1,
    "batch_sst": 32,
    "batch_para": 16,
    "batch_sts": 8,
    "max_length": 64,
    "epochs": 1,
    "steps_per_epoch": 267,  # one pass over SST's 8,544 sentences
    "pooling": "mean",
    "schedule": "linear",
    "warmup": 0.1,
    "weight_decay": 0.01,
}

# The quick preset at the converged length: results/learning-curve found the finetune
# baseline's overall dev score flat from epoch 2 on (epochs 2-6 within +-0.004), so 3
# epochs (801 steps), one epoch into the plateau, with the linear schedule ending there.
FULL_PRESET: dict[str, Any] = {**QUICK_PRESET, "epochs": 3}

PRESETS: dict[str, dict[str, Any]] = {"paper": PAPER_PRESET, "quick": QUICK_PRESET,
                                      "full": FULL_PRESET}


def preset_config(name: str, **overrides: Any) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return TrainConfig(**{**PRESETS[name], **overrides})
