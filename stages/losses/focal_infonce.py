"""FocalInfoNCE: InfoNCE whose per-query term is modulated by the focal factor of Lin et al.,
"Focal Loss for Dense Object Detection" (ICCV 2017), applied to the softmax over a query's
positive and negatives.

With p_k the probability of query k's own positive as in :mod:`.infonce`:

    L = reduce_k( −(1 − p_k)^γ log p_k )             per direction (terms ``i2t``, ``t2i``)

Queries whose positive already wins (p_k near 1) are down-weighted; γ = 0 is InfoNCE
exactly. The factor is differentiated, as in Lin et al. It is computed in log space,
(1 − p_k)^γ = exp(γ (log Σ_{j ∈ N_k} exp(τ s(k, j)) − log Z_k)), so it neither underflows
nor gives an infinite gradient for γ < 1 as p_k nears 1; a query without negatives has
p_k = 1 and contributes 0. Temperature options as :class:`.infonce.InfoNCELoss`.
"""

from typing import Annotated

import torch

from stages.core.values import OneOf, Range
from stages.losses.base import LOSSES
from stages.losses.infonce import InfoNCELoss
from stages.losses.negatives import masked_logits, zero_unless


@LOSSES.register("focal_infonce")
class FocalInfoNCELoss(InfoNCELoss):
    """InfoNCE with each query's term weighted by (1 − p_k)^gamma."""

    def __init__(self, gamma: Annotated[float, Range(min=0)] = 2.0,
                 temperature: Annotated[float, Range(min=0.01, max=1.0)] = 0.07,
                 learnable_temperature: bool = False, mask_same_image: bool = False,
                 reduction: Annotated[str, OneOf("sum", "mean")] = "mean"):
        super().__init__(temperature, learnable_temperature, mask_same_image, reduction)
        self.gamma = gamma

    def per_query(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) −(1 − p_k)^γ log p_k from one direction's logits (B, R) and ``mask``."""
        log_z = logits.logsumexp(dim=1)
        neg_log_p = log_z - logits.diagonal()
        log_not_p = masked_logits(logits, ~mask).logsumexp(dim=1) - log_z  # log(1 − p_k)
        return zero_unless(~mask.all(dim=1), (self.gamma * log_not_p).exp() * neg_log_p)
