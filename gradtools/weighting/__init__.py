"""Loss weighting: map the T task losses to one loss with learned, running or random weights.

Each method is a small ``nn.Module`` (see :class:`LossWeighting`): call it on the
losses to get the loss to backpropagate, read ``.weights`` for logging, and keep
it in your checkpoint (``state_dict()``). A different family from the Gram-based
aggregators of :mod:`gradtools.aggregation`: these look at the losses (GradNorm
also at gradient norms on one layer), not at the task gradients' geometry.

- :class:`UncertaintyWeighting` (Kendall et al. 2018), :class:`IMTLL` (Liu et al.
  2021), :class:`GradNorm` (Chen et al. 2018): learnable, stepped by your optimizer;
- :class:`DWA` (Liu et al. 2019), :class:`FAMO` (Liu et al. 2023): running state
  updated by :meth:`DWA.end_epoch` / :meth:`FAMO.update`;
- :class:`RLW` (Lin et al. 2022): random, from a seeded generator.
"""

from gradtools.weighting._base import LossWeighting
from gradtools.weighting._dwa import DWA
from gradtools.weighting._famo import FAMO
from gradtools.weighting._gradnorm import GradNorm
from gradtools.weighting._imtl_l import IMTLL
from gradtools.weighting._rlw import RLW
from gradtools.weighting._uncertainty import UncertaintyWeighting

__all__ = ["DWA", "FAMO", "IMTLL", "RLW", "GradNorm", "LossWeighting", "UncertaintyWeighting"]
