"""Multi-task gradient aggregation: pure math on the Gram matrix of task gradients.

Every aggregator maps a batch of T x T Gram matrices ``G[i, j] = <g_i, g_j>``
(and, for random or stateful methods, a per-step draw or its own state) to
combination weights w, so that the combined gradient is ``sum_t w[t] g_t``.
Nothing here knows about autograd, parameters or devices. See
:class:`Aggregator` for the interface and :func:`from_name` for the registry.
What each method guarantees, and to what precision, is one table:
:mod:`gradtools.aggregation.guarantees` (``markdown_table()`` renders it).
"""

from gradtools.aggregation._aligned_mtl import AlignedMTL
from gradtools.aggregation._bargaining import FairGrad, NashMTL
from gradtools.aggregation._base import (
    Aggregation,
    Aggregator,
    BlockAggregator,
    aggregate_with,
    available,
    checked_gram,
    from_name,
    gram_precision,
    register,
)
from gradtools.aggregation._cagrad import CAGrad
from gradtools.aggregation._constant import Mean, Sum
from gradtools.aggregation._equal_angle import IMTLG, ConFIG
from gradtools.aggregation._gradvac import GradVac
from gradtools.aggregation._mgda import MGDA
from gradtools.aggregation._pcgrad import (
    PCGrad,
    PCGradResult,
    Reduction,
    draw_orders,
    pcgrad,
    pcgrad_weights,
    validate_orders,
)
from gradtools.aggregation._random import Random
from gradtools.aggregation._similarity import cosine_similarity, magnitude_similarity
from gradtools.aggregation._upgrad import DualProj, UPGrad

__all__ = [
    "IMTLG",
    "MGDA",
    "Aggregation",
    "Aggregator",
    "AlignedMTL",
    "BlockAggregator",
    "CAGrad",
    "ConFIG",
    "DualProj",
    "FairGrad",
    "GradVac",
    "Mean",
    "NashMTL",
    "PCGrad",
    "PCGradResult",
    "Random",
    "Reduction",
    "Sum",
    "UPGrad",
    "aggregate_with",
    "available",
    "checked_gram",
    "cosine_similarity",
    "draw_orders",
    "from_name",
    "gram_precision",
    "magnitude_similarity",
    "pcgrad",
    "pcgrad_weights",
    "register",
    "validate_orders",
]
