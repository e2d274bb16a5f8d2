"""Common base of the retrieval losses: shape checks, the rectangular similarity matrices
against a reference set, positive masks, reduction.

A batch holds B matching pairs (image k, caption k). Each direction compares the B queries
with a *reference set*: the batch's other side first (B columns, column k being query k's
own positive), then whatever else is supplied as :class:`References` (a memory bank,
offline negatives, later other ranks' batches). Every reference that shows the query's own
image is masked as a positive, so it is never taken as a negative; inside the batch the
reference VSE++/AOQ code only masks column k, and ``mask_same_image`` also masks the other
captions of the same image. The square B x B case is the case with no extra references.
"""

from dataclasses import dataclass
from typing import Annotated

import torch
from torch import nn

from stages.core.registry import Registry
from stages.core.values import OneOf

# Every loss class registers itself here by name; the package imports them all.
LOSSES = Registry("loss")


@dataclass
class References:
    """Extra references: ``images`` (M, E) with ``image_ids`` (M,), and ``captions``
    (M', E) with ``caption_image_ids`` (M',) (the image each caption belongs to)."""

    images: torch.Tensor
    image_ids: torch.Tensor
    captions: torch.Tensor
    caption_image_ids: torch.Tensor

    @staticmethod
    def cat(*parts: "References | None") -> "References | None":
        """Concatenate reference sets in order; None parts are skipped (all None: None)."""
        parts = [p for p in parts if p is not None]
        if len(parts) <= 1:
            return parts[0] if parts else None
        return References(torch.cat([p.images for p in parts]),
                          torch.cat([p.image_ids for p in parts]),
                          torch.cat([p.captions for p in parts]),
                          torch.cat([p.caption_image_ids for p in parts]))


@dataclass
class OfflineNegatives:
    """Each anchor's offline negatives (AOQ), row k belonging to batch pair k, each (B, E):
    ``captions`` T' (of anchor image k), ``images`` I' (of anchor caption k), ``captions2``
    T'' (a caption of I'), ``images2`` I'' (the image of T'); ``*_ids`` (B,) give the image
    each one shows."""

    captions: torch.Tensor
    images: torch.Tensor
    captions2: torch.Tensor
    images2: torch.Tensor
    caption_ids: torch.Tensor
    image_ids: torch.Tensor
    caption2_ids: torch.Tensor
    image2_ids: torch.Tensor

    def as_references(self) -> References:
        """All four as extra references: images [I'; I''] and captions [T'; T'']."""
        return References(torch.cat([self.images, self.images2]),
                          torch.cat([self.image_ids, self.image2_ids]),
                          torch.cat([self.captions, self.captions2]),
                          torch.cat([self.caption_ids, self.caption2_ids]))


def positive_mask(image_ids: torch.Tensor, mask_same_image: bool) -> torch.Tensor:
    """(B, B) bool, True where (image row i, caption column j) must not be a negative.

    Always the diagonal (the batch's own pairs). With ``mask_same_image`` also every pair
    whose image and caption belong to the same image: a batch of captions can hold two
    captions of one image, and the reference VSE++/AOQ code takes the other as a negative.
    """
    size = image_ids.shape[0]
    diagonal = torch.eye(size, dtype=torch.bool, device=image_ids.device)
    if not mask_same_image:
        return diagonal
    return diagonal | (image_ids[:, None] == image_ids[None, :])


@dataclass
class Similarities:
    """Cosine similarities of a batch against its reference sets.

    ``positive`` (B,): s(I_k, T_k). ``i2t`` (B, B + M'): image k against the caption
    references; ``t2i`` (B, B + M): caption k against the image references; in both,
    column k is query k's own positive. ``i2t_mask``/``t2i_mask`` (same shapes, bool): True
    where the reference is not a negative of the query (its own pair, or its image).
    """

    positive: torch.Tensor
    i2t: torch.Tensor
    t2i: torch.Tensor
    i2t_mask: torch.Tensor
    t2i_mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.positive.shape[0]

    def directions(self):
        """``(name, sims, mask)`` for i2t then t2i: every loss treats both alike."""
        return (("i2t", self.i2t, self.i2t_mask), ("t2i", self.t2i, self.t2i_mask))


def similarities(img_emb: torch.Tensor, cap_emb: torch.Tensor, image_ids: torch.Tensor,
                 extra: References | None, mask_same_image: bool) -> Similarities:
    """The batch's :class:`Similarities`; without ``extra`` the square (B, B) matrix and
    its transpose (a view: no second product)."""
    mask = positive_mask(image_ids, mask_same_image)
    if extra is None:
        sims = img_emb @ cap_emb.t()
        return Similarities(sims.diag(), sims, sims.t(), mask, mask.t())
    i2t = img_emb @ torch.cat([cap_emb, extra.captions]).t()
    t2i = cap_emb @ torch.cat([img_emb, extra.images]).t()
    i2t_mask = torch.cat([mask, image_ids[:, None] == extra.caption_image_ids[None, :]], 1)
    t2i_mask = torch.cat([mask.t(), image_ids[:, None] == extra.image_ids[None, :]], 1)
    return Similarities(i2t.diagonal(), i2t, t2i, i2t_mask, t2i_mask)


class RetrievalLoss(nn.Module):
    """Base of the losses: ``forward(img_emb (B, E), cap_emb (B, E), image_ids (B,),
    extra=None, offline=None) -> {term name: scalar}``; the trainer sums the terms.

    Subclasses implement :meth:`compute`. A loss with ``requires_offline`` (AOQ) has terms
    of its own over :class:`OfflineNegatives`; every other loss given offline negatives
    takes them as extra references (so any loss trains with offline hard negatives).
    ``reduction`` (an option of every loss): per-anchor terms are summed (VSE++, AOQ) or
    averaged over the batch (InfoNCE's convention). A loss may own parameters (a learnable
    temperature); the trainer optimises and checkpoints them.
    """

    requires_offline = False
    # A loss that needs offline negatives names the loss it adds its offline terms to: the
    # matched control it is compared with (`make table`).
    online_counterpart: str | None = None

    def __init__(self, mask_same_image: bool = False,
                 reduction: Annotated[str, OneOf("sum", "mean")] = "sum"):
        super().__init__()
        self.mask_same_image = mask_same_image
        self.reduction = reduction

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of each epoch (curricula, warm-ups)."""

    def reduce(self, per_anchor: torch.Tensor) -> torch.Tensor:
        """(B,) per-anchor values -> scalar, by ``reduction``."""
        return per_anchor.sum() if self.reduction == "sum" else per_anchor.mean()

    def forward(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, image_ids: torch.Tensor,
                extra: References | None = None,
                offline: OfflineNegatives | None = None) -> dict[str, torch.Tensor]:
        if img_emb.dim() != 2 or img_emb.shape != cap_emb.shape:
            raise ValueError(f"expected image and caption embeddings of one shape (B, E), got "
                             f"{tuple(img_emb.shape)} and {tuple(cap_emb.shape)}")
        if image_ids.shape != img_emb.shape[:1]:
            raise ValueError(f"expected image_ids of shape ({img_emb.shape[0]},), "
                             f"got {tuple(image_ids.shape)}")
        if extra is not None and (extra.images.shape[1:] != img_emb.shape[1:]
                                  or extra.captions.shape[1:] != img_emb.shape[1:]):
            raise ValueError(f"extra references must be (M, {img_emb.shape[1]}), got "
                             f"{tuple(extra.images.shape)} and {tuple(extra.captions.shape)}")
        if self.requires_offline:
            if offline is None or offline.captions.shape != img_emb.shape:
                raise ValueError(f"{type(self).__name__} needs offline negatives, each of "
                                 f"shape {tuple(img_emb.shape)}")
        elif offline is not None:
            extra = References.cat(extra, offline.as_references())
            offline = None
        sims = similarities(img_emb, cap_emb, image_ids, extra, self.mask_same_image)
        return self.compute(sims, img_emb=img_emb, cap_emb=cap_emb, offline=offline)

    def compute(self, sims: Similarities, **context) -> dict[str, torch.Tensor]:
        """Named loss terms from the similarities; ``context`` holds ``img_emb``,
        ``cap_emb`` (B, E) and ``offline`` (:class:`OfflineNegatives` or None)."""
        raise NotImplementedError
