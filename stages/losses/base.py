"""Common base of the retrieval losses: shape checks, the similarity matrix, positive masks."""

import torch
from torch import nn


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


OFFLINE_KEYS = ("captions", "images", "captions2", "images2")


class RetrievalLoss(nn.Module):
    """Base of losses over a batch of B matching (image, caption) embedding pairs.

    ``forward(img_emb (B, E), cap_emb (B, E), image_ids (B,), offline=None) -> scalar``
    checks shapes, builds the cosine similarity matrix ``sims[i, j] = <img_i, cap_j>``
    (B, B) and the positive mask, and calls :meth:`compute`. Losses that use offline hard
    negatives set ``requires_offline`` and receive ``offline``: embeddings (B, E) of
    ``captions`` (T', the anchor image's offline negative caption), ``images`` (I', the
    anchor caption's offline negative image), ``captions2`` (T'', a caption of I') and
    ``images2`` (I'', the image of T').
    """

    requires_offline = False

    def __init__(self, mask_same_image: bool = False):
        super().__init__()
        self.mask_same_image = mask_same_image

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of each epoch (curricula, warm-ups)."""

    def forward(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, image_ids: torch.Tensor,
                offline: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if img_emb.dim() != 2 or img_emb.shape != cap_emb.shape:
            raise ValueError(f"expected image and caption embeddings of one shape (B, E), got "
                             f"{tuple(img_emb.shape)} and {tuple(cap_emb.shape)}")
        if image_ids.shape != img_emb.shape[:1]:
            raise ValueError(f"expected image_ids of shape ({img_emb.shape[0]},), "
                             f"got {tuple(image_ids.shape)}")
        if self.requires_offline and (offline is None or any(
                offline.get(k) is None or offline[k].shape != img_emb.shape
                for k in OFFLINE_KEYS)):
            raise ValueError(f"{type(self).__name__} needs offline embeddings "
                                 f"{OFFLINE_KEYS}, each of shape {tuple(img_emb.shape)}")
        sims = img_emb @ cap_emb.t()
        return self.compute(sims, positive_mask(image_ids, self.mask_same_image),
                            img_emb=img_emb, cap_emb=cap_emb, offline=offline)

    def compute(self, sims: torch.Tensor, positives: torch.Tensor, **context) -> torch.Tensor:
        """Loss from the (B, B) similarities; ``positives`` (B, B) bool marks non-negatives.

        ``context`` holds ``img_emb``, ``cap_emb`` (B, E) and ``offline`` (or None).
        """
        raise NotImplementedError
