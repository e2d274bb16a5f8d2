"""The Adaptive Offline Quintuplet loss (Chen, Deng & Luo 2020) and its ablations.

Per batch item k, with S the cosine similarity, p_k = S(I_k, T_k), online hardest
negatives Ŝc_k = max_{j≠k} S(I_k, T_j) and Ŝi_k = max_{j≠k} S(I_j, T_k), and the
offline negatives T' (of I_k), I' (of T_k), T'' (a caption of I'), I'' (the image of T'):

    wc_k = β − (S(I_k, T'_k) − Ŝc_k) / α        wi_k = β − (S(I'_k, T_k) − Ŝi_k) / α
    L_adap = Σ_k wc_k [m_on + Ŝc_k − p_k]₊ + wi_k [m_on + Ŝi_k − p_k]₊
    L_quin = Σ_k [m_off + S(I_k, T'_k) − p_k]₊ + [m_off + S(I'_k, T_k) − p_k]₊
               + [m_off + S(I'_k, T'_k) − p_k]₊ + [m_off + S(I''_k, T''_k) − p_k]₊

``aoq`` is L_adap + λ L_quin, λ = ``offline_weight`` (1 in the reference). The reference
neither clamps nor detaches w (it turns negative once an offline negative beats the online
one by more than αβ); ``clamp_weights`` and
``detach_weights`` change that. Ablations from the paper: ``offquin`` (w = 1, all four
offline terms) and ``offtri`` (w = 1, the two offline triplet terms).
"""

from typing import Annotated

import torch

from stages.core.values import OneOf, Range
from stages.losses.base import LOSSES, RetrievalLoss, Similarities

VARIANTS = ("aoq", "offquin", "offtri")


def _hinge(margin: float, negative: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    return (margin + negative - positive).clamp(min=0)


@LOSSES.register("aoq", variant="aoq")
@LOSSES.register("offquin", variant="offquin")
@LOSSES.register("offtri", variant="offtri")
class AOQLoss(RetrievalLoss):
    """Online hardest negatives (adaptively weighted for ``aoq``) plus offline ones.

    The online hardest negative is taken over the whole reference set (the batch, plus a
    memory bank when one is on). A query with no negative at all (a batch of one, or every
    other caption from its own image under ``mask_same_image``) has no online term, as in
    the reference, whose masked cost matrix gives a hinge of 0 there. Terms
    ``online_i2t``, ``online_t2i`` and ``offline``.
    """

    requires_offline = True
    online_counterpart = "vse_max"  # L_adap and the offline terms extend VSE++'s max hinge

    def __init__(self, variant: str = "aoq", margin: Annotated[float, Range(min=0)] = 0.2,
                 offline_margin: Annotated[float, Range(min=0)] = 0.0,
                 alpha: Annotated[float, Range(min=0, min_open=True)] = 0.3,
                 beta: float = 1.5, clamp_weights: bool = False, detach_weights: bool = False,
                 offline_weight: Annotated[float, Range(min=0)] = 1.0,
                 mask_same_image: bool = False,
                 reduction: Annotated[str, OneOf("sum", "mean")] = "sum"):
        super().__init__(mask_same_image, reduction)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        self.margin = margin
        self.offline_margin = offline_margin
        self.alpha = alpha
        self.beta = beta
        self.clamp_weights = clamp_weights
        self.detach_weights = detach_weights
        self.offline_weight = offline_weight

    def adaptive_weights(self, offline_sim: torch.Tensor,
                         online_hardest: torch.Tensor) -> torch.Tensor:
        """β − (offline − online) / α per item, (B,), clamped/detached as configured."""
        weights = self.beta - (offline_sim - online_hardest) / self.alpha
        if self.clamp_weights:
            weights = weights.clamp(min=0)
        return weights.detach() if self.detach_weights else weights

    def _online(self, scores: torch.Tensor, mask: torch.Tensor, positive: torch.Tensor,
                offline_sim: torch.Tensor) -> torch.Tensor:
        """(B,) online term of one direction: the (weighted) hinge on the hardest negative."""
        has_negative = ~mask.all(dim=1)
        hardest = scores.masked_fill(mask, float("-inf")).max(dim=1).values
        # Rows without a negative get a finite stand-in, so no inf reaches the gradient.
        hardest = torch.where(has_negative, hardest, positive.detach())
        online = _hinge(self.margin, hardest, positive)
        if self.variant == "aoq":
            online = self.adaptive_weights(offline_sim, hardest) * online
        return torch.where(has_negative, online, torch.zeros_like(online))

    def compute(self, sims: Similarities, *, img_emb, cap_emb, offline,
                **context) -> dict[str, torch.Tensor]:
        positive = sims.positive  # p_k
        s_img_t1 = (img_emb * offline.captions).sum(1)  # S(I_k, T'_k)
        s_i1_cap = (offline.images * cap_emb).sum(1)  # S(I'_k, T_k)
        online_c = self._online(sims.i2t, sims.i2t_mask, positive, s_img_t1)  # Ŝc_k
        online_i = self._online(sims.t2i, sims.t2i_mask, positive, s_i1_cap)  # Ŝi_k
        m = self.offline_margin
        offline_terms = _hinge(m, s_img_t1, positive) + _hinge(m, s_i1_cap, positive)
        if self.variant != "offtri":
            s_i1_t1 = (offline.images * offline.captions).sum(1)  # S(I'_k, T'_k)
            s_i2_t2 = (offline.images2 * offline.captions2).sum(1)  # S(I''_k, T''_k)
            offline_terms = (offline_terms + _hinge(m, s_i1_t1, positive)
                             + _hinge(m, s_i2_t2, positive))
        return {"online_i2t": self.reduce(online_c), "online_t2i": self.reduce(online_i),
                "offline": self.offline_weight * self.reduce(offline_terms)}
