"""Multi-task gradient aggregation: pure math on the Gram matrix of task gradients.

Every aggregator maps a batch of T x T Gram matrices ``G[i, j] = <g_i, g_j>``
(and, for random or stateful methods, a per-step draw or its own state) to
combination weights w, so that the combined gradient is ``sum_t w[t] g_t``.
Nothing here knows about autograd, parameters or devices. See
:class:`Aggregator` for the interface and :func:`from_name` for the registry.
"""

from gradtools.aggregation._base import (
    Aggregation,
    Aggregator,
    available,
    checked_gram,
    from_name,
    register,
)
from gradtools.aggregation._pcgrad import (
    PCGrad,
    PCGradResult,
    Reduction,
    draw_orders,
    pcgrad,
    pcgrad_weights,
    validate_orders,
)
from gradtools.aggregation._similarity import cosine_similarity, magnitude_similarity

__all__ = [
    "Aggregation",
    "Aggregator",
    "PCGrad",
    "PCGradResult",
    "Reduction",
    "available",
    "checked_gram",
    "cosine_similarity",
    "draw_orders",
    "from_name",
    "magnitude_similarity",
    "pcgrad",
    "pcgrad_weights",
    "register",
    "validate_orders",
]
