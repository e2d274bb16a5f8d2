"""Pairwise contrastive loss (Hadsell, Chopra & LeCun, "Dimensionality Reduction by
Learning an Invariant Mapping", CVPR 2006), in cosine similarity.

Hadsell et al. pull a similar pair together by ½D² and push a dissimilar one out to a
margin by ½[m − D]+². For unit vectors ½D² = ½‖a − b‖² = 1 − s, so the pull is exactly
1 − s(k, k); the push is taken linear in the similarity, as pytorch-metric-learning's
``ContrastiveLoss`` does with a cosine similarity: [s(k, j) − margin]+. Each query k, with
valid negatives N_k, pairs its positive with the mean push of its negatives:

    L = Σ_k (1 − s(k, k)) + (1 / |N_k|) Σ_{j ∈ N_k} [s(k, j) − margin]+     per direction

Averaging the pushes gives one positive and one (averaged) negative unit per query whatever
the reference set's size (a memory bank of thousands would otherwise drown the positive). A
query without negatives contributes its pull only. Each direction (terms ``i2t``, ``t2i``)
is such a loss over its queries' pairs, so a positive pair is pulled in both.
"""

from typing import Annotated

import torch

from stages.core.values import OneOf, Range
from stages.losses.base import LOSSES, RetrievalLoss, Similarities


@LOSSES.register("contrastive")
class ContrastiveLoss(RetrievalLoss):
    """Pull each positive to similarity 1, push each negative below ``margin`` (mean over
    the query's negatives)."""

    def __init__(self, margin: Annotated[float, Range(min=-1, max=1)] = 0.2,
                 mask_same_image: bool = False,
                 reduction: Annotated[str, OneOf("sum", "mean")] = "sum"):
        super().__init__(mask_same_image, reduction)
        self.margin = margin

    def compute(self, sims: Similarities, **context) -> dict[str, torch.Tensor]:
        pull = 1 - sims.positive
        terms = {}
        for name, scores, mask in sims.directions():
            push = (scores - self.margin).clamp(min=0).masked_fill(mask, 0).sum(dim=1)
            push = push / (~mask).sum(dim=1).clamp(min=1)
            terms[name] = self.reduce(pull + push)
        return terms
