"""Triplet hinge with one uniformly random negative per query.

For query k (an image in i2t, a caption in t2i) with valid negatives N_k and one negative
j_k drawn uniformly from N_k:

    L = Σ_k [margin + s(k, j_k) − s(k, k)]+          per direction (terms ``i2t``, ``t2i``)

The triplet loss of Schroff et al., "FaceNet" (CVPR 2015) with random negatives, the
baseline that VSE++ (Faghri et al. 2018) compares hard negatives against.
"""

from typing import Annotated

import torch

from stages.core.values import OneOf, Range
from stages.losses.base import LOSSES, RetrievalLoss, Similarities
from stages.losses.negatives import hinge, zero_unless


@LOSSES.register("triplet_random")
class RandomTripletLoss(RetrievalLoss):
    """Hinge on one random valid negative per query; a query without one contributes 0.

    The draws are reproducible and leave the global RNG alone: call n (counted from 0 in the
    ``draws`` buffer, which the checkpoint holds, so a resumed run draws what an
    uninterrupted one would) uses a generator seeded with ``(seed * 0x9E3779B1 + n) % 2**32``
    (a CPU generator keeps only 32 bits of its seed; the odd multiplier keeps the streams of
    different seeds apart). It draws ``u`` (B, R) uniform in [0, 1) for i2t, then for t2i,
    and each query takes its valid negative with the largest ``u`` (the first on a tie): a
    uniform choice among its valid negatives.
    """

    def __init__(self, margin: Annotated[float, Range(min=0)] = 0.2,
                 seed: Annotated[int, Range(min=0, max=2**31 - 1)] = 0,
                 mask_same_image: bool = False,
                 reduction: Annotated[str, OneOf("sum", "mean")] = "sum"):
        super().__init__(mask_same_image, reduction)
        self.margin = margin
        self.seed = seed
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator of the next call, on ``device``; advances the ``draws`` count."""
        generator = torch.Generator(device=device)
        generator.manual_seed((self.seed * 0x9E3779B1 + int(self.draws)) % 2**32)
        self.draws += 1
        return generator

    def compute(self, sims: Similarities, **context) -> dict[str, torch.Tensor]:
        generator = self.generator(sims.i2t.device)
        terms = {}
        for name, scores, mask in sims.directions():
            u = torch.rand(scores.shape, generator=generator, device=scores.device)
            choice = u.masked_fill(mask, -1.0).argmax(dim=1, keepdim=True)
            negative = scores.gather(1, choice).squeeze(1)
            per_query = hinge(self.margin, negative, sims.positive)
            terms[name] = self.reduce(zero_unless(~mask.all(dim=1), per_query))
        return terms
