"""VSE++'s hinge triplet loss (Faghri et al. 2018): sum of violations or max violation."""

import torch

from . import LOSSES
from .base import RetrievalLoss


@LOSSES.register("vse_max", max_violation=True)
@LOSSES.register("vse_sum", max_violation=False)
class VSEHingeLoss(RetrievalLoss):
    """Bidirectional hinge on the batch's negatives.

    For image i and caption j != i (not masked as positive):
    caption negatives ``[margin + s(i, j) - s(i, i)]+`` and image negatives
    ``[margin + s(j, i) - s(i, i)]+`` for caption i. With max violation only the hardest
    negative of each anchor counts; otherwise all are summed. Summed over the batch.
    ``warmup_epochs`` epochs of sum-of-violations come before the max (VSE-infinity's trick).
    """

    def __init__(self, margin: float = 0.2, max_violation: bool = True, warmup_epochs: int = 0,
                 mask_same_image: bool = False):
        super().__init__(mask_same_image)
        self.margin = margin
        self.max_violation = max_violation
        self.warmup_epochs = warmup_epochs
        self.hardest = max_violation and warmup_epochs <= 0

    def set_epoch(self, epoch: int) -> None:
        self.hardest = self.max_violation and epoch >= self.warmup_epochs

    def compute(self, sims: torch.Tensor, positives: torch.Tensor, **context) -> torch.Tensor:
        diagonal = sims.diag()
        cost_captions = (self.margin + sims - diagonal[:, None]).clamp(min=0)
        cost_images = (self.margin + sims - diagonal[None, :]).clamp(min=0)
        cost_captions = cost_captions.masked_fill(positives, 0)
        cost_images = cost_images.masked_fill(positives, 0)
        if self.hardest:
            return cost_captions.max(dim=1).values.sum() + cost_images.max(dim=0).values.sum()
        return cost_captions.sum() + cost_images.sum()
