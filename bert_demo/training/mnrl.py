r"""Multiple negatives ranking loss (Henderson et al. 2017), on Quora's duplicate pairs.

For a batch of question pairs :math:`(a_i, b_i)` with sentence vectors
:math:`u_i, v_i`, every *duplicate* pair i is a retrieval problem: among all the
second questions of the batch, :math:`b_i` should be the closest to :math:`a_i`;
the other :math:`b_j` are in-batch negatives. With the scaled cosine logits
:math:`s_{ij} = \text{scale} \cdot \cos(u_i, v_j)`,

.. math::
    L = \frac{1}{|P|} \sum_{i \in P} -\log \frac{e^{s_{ii}}}{\sum_j e^{s_{ij}}}

over the duplicate pairs P. ``scale`` is an inverse temperature: cosines lie in
[-1, 1], so without it the softmax stays nearly flat (20 is the value
Sentence-BERT's implementation of this loss uses). Non-duplicate pairs are no
anchors, but their second questions still serve as negatives.

In the demo it is an auxiliary term of the Quora loss (``--mnrl-weight``), on the
same sentence vectors the Quora head reads; the report listed it as future work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MNRL_TASK = "para"  # the task whose duplicate pairs are the positives


def multiple_negatives_ranking_loss(
    anchors: Tensor, candidates: Tensor, is_positive: Tensor, scale: float
) -> Tensor:
    """Mean MNRL over the positive pairs; a zero without gradient when the batch has none.

    Args:
        anchors: ``[B, H]`` vectors of the first sentences.
        candidates: ``[B, H]`` vectors of the second sentences (row i pairs with anchor i).
        is_positive: ``[B]`` 0/1 labels; 1 marks a pair whose sentences match.
        scale: logits are ``scale * cos``; must be > 0.
    """
    if anchors.ndim != 2 or anchors.shape != candidates.shape:
        raise ValueError(f"anchors and candidates must both be [B, H], got "
                         f"{tuple(anchors.shape)} and {tuple(candidates.shape)}")
    if is_positive.shape != anchors.shape[:1]:
        raise ValueError(f"is_positive must be [B] = [{anchors.shape[0]}], "
                         f"got {tuple(is_positive.shape)}")
    if anchors.shape[0] < 2:
        raise ValueError("MNRL needs at least 2 pairs per batch (one pair has no negative)")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    positive = is_positive > 0.5
    if not bool(positive.any()):
        return anchors.new_zeros(())
    logits = scale * F.normalize(anchors[positive], dim=-1) @ F.normalize(candidates, dim=-1).T
    targets = torch.nonzero(positive).squeeze(1)
    return F.cross_entropy(logits, targets)
