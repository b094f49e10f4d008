"""gradtools: fine-tuning tools for PyTorch.

Public API only; each tool lives in its own module.
"""

from gradtools import aggregation
from gradtools.adamw import AdamW
from gradtools.divergences import bernoulli_symmetric_kl, divergence, squared_error, symmetric_kl
from gradtools.dropout_policy import capture_rng_state
from gradtools.multitask import MultiTask
from gradtools.multitask_stats import MultiTaskStats
from gradtools.pcgrad import PCGrad, PCGradStats
from gradtools.smart import SMART
from gradtools.teacher import MomentumTeacher

__all__ = [
    "SMART",
    "AdamW",
    "MomentumTeacher",
    "MultiTask",
    "MultiTaskStats",
    "PCGrad",
    "PCGradStats",
    "aggregation",
    "bernoulli_symmetric_kl",
    "capture_rng_state",
    "divergence",
    "squared_error",
    "symmetric_kl",
]
