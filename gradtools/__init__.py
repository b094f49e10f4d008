"""gradtools: fine-tuning tools for PyTorch.

Public API only; each tool lives in its own module.
"""

from gradtools import aggregation, weighting
from gradtools._version import installed_version as _installed_version
from gradtools.adamw import AdamW
from gradtools.divergences import bernoulli_symmetric_kl, divergence, squared_error, symmetric_kl
from gradtools.dropout_policy import capture_rng_state
from gradtools.embedding_tap import EmbeddingTap
from gradtools.multitask import MultiTask
from gradtools.multitask_stats import MultiTaskStats
from gradtools.pcgrad import PCGrad, PCGradStats
from gradtools.smart import SMART
from gradtools.teacher import MomentumTeacher

__version__ = _installed_version()  # from the installed package metadata

__all__ = [
    "SMART",
    "AdamW",
    "EmbeddingTap",
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
    "weighting",
]
