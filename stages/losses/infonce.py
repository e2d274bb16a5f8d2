"""InfoNCE: temperature-scaled cross entropy of each query's own positive among its
references, in both directions (van den Oord, Li & Vinyals, "Representation Learning with
Contrastive Predictive Coding", 2018; Radford et al., "Learning Transferable Visual Models
From Natural Language Supervision" (CLIP), ICML 2021).

For query k with valid negatives N_k (every other reference of its image is left out, not
only its own pair) and scale τ = 1/T:

    log p_k = τ s(k, k) − log( exp(τ s(k, k)) + Σ_{j ∈ N_k} exp(τ s(k, j)) )
    L = reduce_k(−log p_k)                           per direction (terms ``i2t``, ``t2i``)

With ``reduction`` mean (the default here, CLIP's convention) the total i2t + t2i is twice
CLIP's loss, which averages the two directions; Adam is insensitive to that factor.

``temperature`` 0.07 is CLIP's initial temperature, so a fixed and a learnable run start
alike. With ``learnable_temperature`` the loss owns CLIP's ``logit_scale = log(1/T)``
(an ``nn.Parameter`` the trainer optimises and checkpoints), clamped to [0, log 100] before
every use (open_clip clamps it after every step): T stays within [0.01, 1]. A model that
has its own (CLIP's) hands it over with :meth:`InfoNCELoss.share_logit_scale`: then that one
parameter is the temperature, optimised and checkpointed with the model.
"""

import math
from typing import Annotated

import torch
from torch import nn

from stages.core.values import OneOf, Range
from stages.losses.base import LOSSES, RetrievalLoss, Similarities

MAX_LOGIT_SCALE = math.log(100.0)


@LOSSES.register("infonce")
class InfoNCELoss(RetrievalLoss):
    """Cross entropy of the positive among [positive, valid negatives] / T, both ways.

    A query without negatives has log p = 0 (a loss of 0, finite gradients).
    """

    def __init__(self, temperature: Annotated[float, Range(min=0.01, max=1.0)] = 0.07,
                 learnable_temperature: bool = False, mask_same_image: bool = False,
                 reduction: Annotated[str, OneOf("sum", "mean")] = "mean"):
        super().__init__(mask_same_image, reduction)
        self.temperature = temperature
        self.learnable_temperature = learnable_temperature
        # A model's logit_scale this loss uses instead of its own (not registered here: the
        # model owns, optimises and saves it).
        self._shared_scale: tuple[nn.Parameter, ...] = ()
        if learnable_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def share_logit_scale(self, logit_scale: nn.Parameter) -> None:
        """Use ``logit_scale`` (log 1/T, a model's parameter, any shape of one element) as
        the learnable temperature, in place of this loss's own, which is dropped: one
        parameter, in the model's optimiser group and state dict."""
        if not self.learnable_temperature:
            raise ValueError("a fixed temperature takes no logit_scale")
        if "logit_scale" in self._parameters:
            del self.logit_scale
        self._shared_scale = (logit_scale,)

    def scale(self) -> torch.Tensor | float:
        """1/T: ``exp(logit_scale)`` (clamped in place first) if learnable, else a float."""
        if not self.learnable_temperature:
            return 1 / self.temperature
        logit_scale = self._shared_scale[0] if self._shared_scale else self.logit_scale
        with torch.no_grad():
            logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return logit_scale.exp().reshape(())

    def logits(self, scores: torch.Tensor, mask: torch.Tensor,
               scale: torch.Tensor | float) -> torch.Tensor:
        """(B, R) ``scale * scores`` with the masked references other than each query's own
        positive (column k of row k) set to -inf."""
        own = torch.eye(*scores.shape, dtype=torch.bool, device=scores.device)
        return (scale * scores).masked_fill(mask & ~own, float("-inf"))

    def per_query(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) −log p_k from one direction's :meth:`logits` (B, R) and ``mask``."""
        return logits.logsumexp(dim=1) - logits.diagonal()

    def compute(self, sims: Similarities, **context) -> dict[str, torch.Tensor]:
        scale = self.scale()
        return {name: self.reduce(self.per_query(self.logits(scores, mask, scale), mask))
                for name, scores, mask in sims.directions()}
