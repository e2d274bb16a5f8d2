"""Focal triplet loss with a softmax factor: each query's hinges over its negatives,
weighted by a softmax over those negatives' similarities, and the query's term modulated by
the focal factor (1 − p)^γ of Lin et al., "Focal Loss for Dense Object Detection" (ICCV
2017).

The idea of a focal triplet loss, weakening easy triplets and focusing on hard ones, is
Wang et al.'s ("Discriminative Patch Descriptor Learning with Focal Triplet Loss Function",
ICIP 2021, which also applies it to visual-semantic embeddings); the form below is ours.
For query k with valid negatives N_k, hinges h_kj = [margin + s(k, j) − s(k, k)]+ and
temperature T:

    w_kj = exp(s(k, j)/T) / Σ_{l ∈ N_k} exp(s(k, l)/T)              (which negatives)
    p_k  = exp(s(k, k)/T) / (exp(s(k, k)/T) + Σ_{l ∈ N_k} exp(s(k, l)/T))   (how easy k is)
    L    = Σ_k (1 − p_k)^γ Σ_{j ∈ N_k} w_kj h_kj          per direction (terms ``i2t``, ``t2i``)

γ = 0 leaves the softmax-weighted hinge, which goes from VSE++'s max violation (T → 0) to
the mean hinge over the negatives (T → ∞). Weights and factor are differentiated (as Lin et
al. do); (1 − p_k)^γ is computed in log space. A query without negatives contributes 0.
"""

from typing import Annotated

import torch

from stages.core.values import OneOf, Range
from stages.losses.base import LOSSES, RetrievalLoss, Similarities
from stages.losses.negatives import hinge, masked_logits, zero_unless


@LOSSES.register("focal_triplet")
class FocalTripletLoss(RetrievalLoss):
    """Softmax(s_neg / T)-weighted hinge per query, times (1 − p_positive)^gamma."""

    def __init__(self, margin: Annotated[float, Range(min=0)] = 0.2,
                 temperature: Annotated[float, Range(min=0.001)] = 0.1,
                 gamma: Annotated[float, Range(min=0)] = 2.0, mask_same_image: bool = False,
                 reduction: Annotated[str, OneOf("sum", "mean")] = "sum"):
        super().__init__(mask_same_image, reduction)
        self.margin = margin
        self.temperature = temperature
        self.gamma = gamma

    def compute(self, sims: Similarities, **context) -> dict[str, torch.Tensor]:
        positive = sims.positive
        terms = {}
        for name, scores, mask in sims.directions():
            negatives = masked_logits(scores / self.temperature, ~mask)  # (B, R)
            weights = negatives.softmax(dim=1)
            costs = hinge(self.margin, scores, positive[:, None]).masked_fill(mask, 0)
            weighted = (weights * costs).sum(dim=1)
            log_negatives = negatives.logsumexp(dim=1)
            log_not_p = log_negatives - torch.logaddexp(positive / self.temperature,
                                                        log_negatives)  # log(1 − p_k)
            per_query = (self.gamma * log_not_p).exp() * weighted
            terms[name] = self.reduce(zero_unless(~mask.all(dim=1), per_query))
        return terms
