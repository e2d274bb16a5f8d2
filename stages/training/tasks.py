"""Tasks: what a training batch holds and how the model's output on it feeds the loss.

One object per kind, so the loop has no ``if offline:`` branches:

* :class:`PairTask`: batches of (image, caption) pairs; the loss sees in-batch negatives.
* :class:`OfflineTask`: pairs plus each pair's offline hard negatives drawn from the
  candidate files (AOQ); the batch stacks anchors and negatives (see
  :func:`stages.data.offline.collate_offline`) and the loss gets them as
  :class:`~stages.losses.base.OfflineNegatives`.
"""

from dataclasses import dataclass

import torch

from ..data.captions import CAPTIONS_PER_IMAGE
from ..data.dataset import PairDataset, Split, collate_pairs
from ..data.offline import OfflineNegativeSampler, OfflinePairDataset, collate_offline
from ..data.vocab import Vocab
from ..losses.base import OfflineNegatives
from ..models.base import ModelOutput


@dataclass
class LossInputs:
    """What the loss takes from a batch: the anchors' ``img_emb``, ``cap_emb`` (B, E), their
    ``image_ids`` (B,), and offline negatives (or None)."""

    img_emb: torch.Tensor
    cap_emb: torch.Tensor
    image_ids: torch.Tensor
    offline: OfflineNegatives | None = None


class PairTask:
    """Batches of B matching pairs, one item per caption (``collate_pairs``)."""

    name = "pairs"

    def __init__(self, split: Split, vocab: Vocab):
        self.dataset = PairDataset(split, vocab)
        self.collate = collate_pairs

    def set_epoch(self, epoch: int) -> None:
        """Pairs are the same every epoch (only their order and, for raw images, their
        crops change)."""
        self.dataset.split.set_epoch(epoch)

    def loss_inputs(self, output: ModelOutput, batch: dict) -> LossInputs:
        return LossInputs(output.img_emb, output.cap_emb, batch["image_ids"])


class OfflineTask:
    """Pairs with offline negatives: rows [0, B) of a batch are the anchors (I, T),
    [B, 2B) the negatives (I', T'), [2B, 3B) the second ones (I'', T'')."""

    name = "offline"

    def __init__(self, split: Split, vocab: Vocab, sampler: OfflineNegativeSampler):
        self.dataset = OfflinePairDataset(split, vocab, sampler)
        self.collate = collate_offline

    def set_epoch(self, epoch: int) -> None:
        """Offline negatives (and raw images' crops) are drawn afresh every epoch."""
        self.dataset.set_epoch(epoch)
        self.dataset.split.set_epoch(epoch)

    def loss_inputs(self, output: ModelOutput, batch: dict) -> LossInputs:
        b = output.img_emb.shape[0] // 3
        img, cap = output.img_emb, output.cap_emb
        image_ids = batch["image_ids"]
        caption_images = batch["caption_ids"] // CAPTIONS_PER_IMAGE
        offline = OfflineNegatives(
            captions=cap[b:2 * b], images=img[b:2 * b], captions2=cap[2 * b:],
            images2=img[2 * b:], caption_ids=caption_images[b:2 * b],
            image_ids=image_ids[b:2 * b], caption2_ids=caption_images[2 * b:],
            image2_ids=image_ids[2 * b:])
        return LossInputs(img[:b], cap[:b], image_ids[:b], offline)
