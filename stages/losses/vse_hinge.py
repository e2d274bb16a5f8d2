"""VSE++'s hinge triplet loss (Faghri et al. 2018): sum of violations or max violation."""

from typing import Annotated

import torch

from stages.core.values import OneOf, Range
from stages.losses.base import LOSSES, RetrievalLoss, Similarities


@LOSSES.register("vse_max", max_violation=True)
@LOSSES.register("vse_sum", max_violation=False)
class VSEHingeLoss(RetrievalLoss):
    """Bidirectional hinge on the negatives of the reference set.

    For image query k and every caption reference j that is a negative:
    ``[margin + s(k, j) - s(k, k)]+``; likewise for caption query k against the image
    references. With max violation only the hardest negative of each query counts (VSE++);
    otherwise all are summed (VSE0). ``warmup_epochs`` epochs of sum-of-violations come
    before the max (VSE-infinity's trick). Terms ``i2t`` and ``t2i``.
    """

    def __init__(self, margin: Annotated[float, Range(min=0)] = 0.2, max_violation: bool = True,
                 warmup_epochs: Annotated[int, Range(min=0)] = 0, mask_same_image: bool = False,
                 reduction: Annotated[str, OneOf("sum", "mean")] = "sum"):
        super().__init__(mask_same_image, reduction)
        self.margin = margin
        self.max_violation = max_violation
        self.warmup_epochs = warmup_epochs
        self.hardest = max_violation and warmup_epochs <= 0

    def set_epoch(self, epoch: int) -> None:
        self.hardest = self.max_violation and epoch >= self.warmup_epochs

    def compute(self, sims: Similarities, **context) -> dict[str, torch.Tensor]:
        terms = {}
        for name, scores, mask in sims.directions():
            cost = (self.margin + scores - sims.positive[:, None]).clamp(min=0)
            cost = cost.masked_fill(mask, 0)
            per_query = cost.max(dim=1).values if self.hardest else cost.sum(dim=1)
            terms[name] = self.reduce(per_query)
        return terms
