"""Focal triplet loss with a learned factor: a small MLP over (positive, negative)
similarities weights each query's hinges over its negatives.

For query k with valid negatives N_k and hinges h_kj = [margin + s(k, j) − s(k, k)]+:

    a_kj = softplus(MLP(s(k, k), s(k, j)))                 (> 0; inputs detached)
    w_kj = |N_k| a_kj / Σ_{l ∈ N_k} a_kl                   (mean 1 over N_k)
    L    = Σ_k Σ_{j ∈ N_k} w_kj h_kj                       per direction (terms ``i2t``, ``t2i``)

Why the factor cannot collapse the loss. The trainer minimises the loss over the MLP too, and
a learned weight minimised with the loss has two ways to zero it: shrink every weight
(prevented by the normalisation: the weights of a query always sum to |N_k|), or move the
weight onto negatives that already clear the margin (h = 0), which the normalisation alone
does not prevent. So the MLP plays the adversary, as in adversarially reweighted learning
(Lahoti et al., "Fairness without Demographics through Adversarially Reweighted Learning",
NeurIPS 2020, whose learner weights are also an MLP's normalised outputs): its gradient is
reversed (Ganin & Lempitsky, ICML 2015), so its optimiser step *raises* the loss, moving
weight onto the violating negatives; the embeddings see the weights as constants (the MLP's
inputs are detached) and lower the weighted hinges. The adversary's best is bounded, all the
weight on the hardest negative: L ≤ Σ_k |N_k| max_j h_kj. The last layer starts at zero, so
training starts from uniform weights (VSE0's sum of violations) and learns its focal curve.
"""

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from stages.core.values import OneOf, Range
from stages.losses.base import LOSSES, RetrievalLoss, Similarities
from stages.losses.negatives import hinge


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient's sign flipped backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


@LOSSES.register("focal_triplet_mlp")
class MLPFocalTripletLoss(RetrievalLoss):
    """Hinges weighted by an adversarial MLP factor normalised to mean 1 per query.

    ``mlp``: Linear(2, hidden), tanh, Linear(hidden, 1); initialised from a fixed seed without
    touching the global RNG, so building the loss changes no other draw.
    """

    def __init__(self, margin: Annotated[float, Range(min=0)] = 0.2,
                 hidden: Annotated[int, Range(min=1)] = 16, mask_same_image: bool = False,
                 reduction: Annotated[str, OneOf("sum", "mean")] = "sum"):
        super().__init__(mask_same_image, reduction)
        self.margin = margin
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def factor(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """a = softplus(MLP(positive, negative)), elementwise over same-shaped tensors; the
        gradient reaches the MLP's parameters only."""
        pairs = torch.stack([positive, negative], dim=-1).detach()
        return F.softplus(self.mlp(pairs.to(self.mlp[0].weight.dtype))).squeeze(-1)

    def compute(self, sims: Similarities, **context) -> dict[str, torch.Tensor]:
        positive = sims.positive
        terms = {}
        for name, scores, mask in sims.directions():
            factor = self.factor(positive[:, None].expand_as(scores), scores)  # (B, R)
            factor = _ReverseGradient.apply(factor).to(scores.dtype).masked_fill(mask, 0)
            found = ~mask.all(dim=1, keepdim=True)
            total = torch.where(found, factor.sum(dim=1, keepdim=True), 1.0)  # no 0/0
            weights = factor / total * (~mask).sum(dim=1, keepdim=True)
            costs = hinge(self.margin, scores, positive[:, None]).masked_fill(mask, 0)
            terms[name] = self.reduce((weights * costs).sum(dim=1))
        return terms
