"""Triplet hinge averaged over each query's k hardest negatives.

For query k with valid negatives N_k and T_k its min(k, |N_k|) most similar ones:

    L = Σ_k (1 / |T_k|) Σ_{j ∈ T_k} [margin + s(k, j) − s(k, k)]+     per direction

It interpolates between the two losses of Faghri et al., "VSE++: Improving Visual-Semantic
Embeddings with Hard Negatives" (BMVC 2018): k = 1 is VSE++'s max violation, k ≥ |N_k| the
mean over all negatives (their sum of violations, VSE0, divided by |N_k|). Averaging rather
than summing keeps the scale of a query's term independent of k.
"""

from typing import Annotated

import torch

from stages.core.values import OneOf, Range
from stages.losses.base import LOSSES, RetrievalLoss, Similarities
from stages.losses.negatives import hinge


@LOSSES.register("triplet_topk")
class TopKTripletLoss(RetrievalLoss):
    """Mean hinge over the ``k`` hardest valid negatives of each query (over all of them
    when it has fewer than ``k``; 0 when it has none). Terms ``i2t`` and ``t2i``."""

    def __init__(self, margin: Annotated[float, Range(min=0)] = 0.2,
                 k: Annotated[int, Range(min=1)] = 5, mask_same_image: bool = False,
                 reduction: Annotated[str, OneOf("sum", "mean")] = "sum"):
        super().__init__(mask_same_image, reduction)
        self.margin = margin
        self.k = k

    def compute(self, sims: Similarities, **context) -> dict[str, torch.Tensor]:
        terms = {}
        for name, scores, mask in sims.directions():
            k = min(self.k, scores.shape[1])
            top, index = scores.masked_fill(mask, float("-inf")).topk(k, dim=1)
            chosen = ~mask.gather(1, index)  # (B, k): a real negative, not a filler
            top = torch.where(chosen, top, torch.zeros_like(top))
            costs = hinge(self.margin, top, sims.positive[:, None]) * chosen
            per_query = costs.sum(dim=1) / chosen.sum(dim=1).clamp(min=1)
            terms[name] = self.reduce(per_query)
        return terms
