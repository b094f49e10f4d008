"""``--weighting NAME``: a :mod:`gradtools.weighting` method combining the task losses.

The names, what each is called in a table, which ``--aggregator`` each one makes
no sense with (and why), and how the Trainer builds one for its model. The
Trainer calls the module on the T task losses (with SMART's and MNRL's terms, as
the aggregators see them) and logs its weights as ``weight_<task>``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch import Tensor

from gradtools import weighting as wt

if TYPE_CHECKING:
    from bert_demo.model import Layer
    from bert_demo.model.multitask import MultitaskBert

# --weighting's values -> the gradtools.weighting class and the method's name in tables.
WEIGHTINGS: dict[str, tuple[type[wt.LossWeighting], str]] = {
    "uncertainty": (wt.UncertaintyWeighting, "Uncertainty weighting"),
    "dwa": (wt.DWA, "DWA"),
    "gradnorm": (wt.GradNorm, "GradNorm"),
    "rlw": (wt.RLW, "RLW"),
    "famo": (wt.FAMO, "FAMO"),
    "imtll": (wt.IMTLL, "IMTL-L"),
}

# Weightings whose own update assumes the model's step is the gradient of their weighted
# loss (FAMO: the loss change that step makes; GradNorm: its gradient norms on the shared
# layer): an aggregator replaces that step, so they take none.
OWN_STEP = ("famo", "gradnorm")
# Aggregators whose update direction does not change when one task's gradient is scaled
# (tests/test_train_weighting.py checks it for every registered aggregator as the demo
# builds it, FairGrad at its default alpha = 1): a loss weighting in front of them could
# change only the step's length, not which way it goes.
SCALE_FREE_AGGREGATORS = ("config", "fairgrad", "imtlg", "nashmtl")


def weighting_refusal(weighting: str, aggregator: str | None) -> str | None:
    """Why ``--weighting weighting`` cannot go with ``--aggregator aggregator`` (None: it can)."""
    if aggregator is None:
        return None
    if weighting in OWN_STEP:
        return (f"--weighting {weighting} cannot be combined with --aggregator {aggregator}: "
                f"{WEIGHTINGS[weighting][1]} updates its weights from the step its own "
                "weighted loss takes, and an aggregator takes another step")
    if aggregator in SCALE_FREE_AGGREGATORS:
        return (f"--weighting {weighting} cannot be combined with --aggregator {aggregator}: "
                f"{aggregator}'s update direction does not depend on each task's gradient "
                "scale, so the loss weights would change nothing but the step length")
    return None


HELP = (
    "gradtools loss weighting combining the task losses: " + ", ".join(
        f"{name} ({title})" for name, (_, title) in WEIGHTINGS.items())
    + ". Needs two tasks or more. With --aggregator the weighted task losses go to the "
    "aggregator, except for " + " and ".join(OWN_STEP) + " (their own update assumes "
    "the step is their weighted loss's gradient) and with the aggregators "
    + ", ".join(SCALE_FREE_AGGREGATORS) + " (their direction ignores each task's scale, "
    "so the weights would change only the step length). famo recomputes the losses after each step, so "
    "not with --smart; gradnorm reads gradient norms on the last shared layer, so not "
    "with --mode frozen")


def shared_layer(model: MultitaskBert, pooling: str) -> list[Tensor]:
    """GradNorm's ``W``: the last layer with weights that every task's output goes through
    (the pooler with [CLS] pooling, else the last encoder layer's output projection)."""
    encoder = model.encoder
    if pooling == "cls":
        return [encoder.pooler.weight]
    last: Layer = encoder.layers[-1]  # type: ignore[assignment]
    return [last.ffn_out.weight]


def build_weighting(
    name: str,
    num_tasks: int,
    *,
    seed: int,
    shared: Callable[[], list[Tensor]],
    process_group: dist.ProcessGroup | None = None,
) -> wt.LossWeighting:
    """The method ``name`` for ``num_tasks`` losses with the paper defaults (RLW seeded by the
    run's seed; GradNorm on the tensors ``shared()`` returns)."""
    if name not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {tuple(WEIGHTINGS)}, got {name!r}")
    if name == "uncertainty":
        return wt.UncertaintyWeighting(num_tasks, process_group=process_group)
    if name == "dwa":
        return wt.DWA(num_tasks, process_group=process_group)
    if name == "gradnorm":
        return wt.GradNorm(num_tasks, shared(), process_group=process_group)
    if name == "rlw":
        return wt.RLW(num_tasks, seed=seed, process_group=process_group)
    if name == "famo":
        return wt.FAMO(num_tasks, process_group=process_group)
    return wt.IMTLL(num_tasks, process_group=process_group)
