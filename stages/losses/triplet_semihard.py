"""Triplet hinge with semi-hard negatives (Schroff, Kalenichenko & Philbin, "FaceNet: A
Unified Embedding for Face Recognition and Clustering", CVPR 2015), in similarities.

For query k with valid negatives N_k, the semi-hard ones are those ranked below the positive
but inside the margin, S_k = {j ∈ N_k : s(k, k) − margin < s(k, j) < s(k, k)} (FaceNet's
d(a, p) < d(a, n) < d(a, p) + margin). The query takes the hardest of them, or the hardest
negative of N_k when S_k is empty:

    n_k = argmax_{j ∈ S_k} s(k, j)   if S_k ≠ ∅,   else argmax_{j ∈ N_k} s(k, j)
    L = Σ_k [margin + s(k, n_k) − s(k, k)]+          per direction (terms ``i2t``, ``t2i``)

FaceNet asks for a semi-hard negative; this takes the hardest of them, so the choice is
deterministic. The fallback is harmless: when no negative is semi-hard, the hardest either
ranks above the positive (VSE++'s max violation) or, with every other negative, clears the
margin (a hinge of 0).
"""

from typing import Annotated

import torch

from stages.core.values import OneOf, Range
from stages.losses.base import LOSSES, RetrievalLoss, Similarities
from stages.losses.negatives import hinge, masked_max, zero_unless


@LOSSES.register("triplet_semihard")
class SemiHardTripletLoss(RetrievalLoss):
    """Hinge on each query's hardest semi-hard negative (else its hardest negative); a query
    without negatives contributes 0. Which negative is chosen carries no gradient."""

    def __init__(self, margin: Annotated[float, Range(min=0)] = 0.2,
                 mask_same_image: bool = False,
                 reduction: Annotated[str, OneOf("sum", "mean")] = "sum"):
        super().__init__(mask_same_image, reduction)
        self.margin = margin

    def compute(self, sims: Similarities, **context) -> dict[str, torch.Tensor]:
        positive = sims.positive[:, None]
        terms = {}
        for name, scores, mask in sims.directions():
            semihard = ~mask & (scores < positive) & (scores > positive - self.margin)
            semihard_value, has_semihard = masked_max(scores, semihard)
            hardest_value, found = masked_max(scores, ~mask)
            negative = torch.where(has_semihard, semihard_value, hardest_value)
            per_query = hinge(self.margin, negative, sims.positive)
            terms[name] = self.reduce(zero_unless(found, per_query))
        return terms
