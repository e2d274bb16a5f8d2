"""Tasks: what a training batch holds and how the model's output on it feeds the loss.

One object per kind, so the loop has no ``if offline:`` branches:

Each task gives ``epoch_batches(batch_size, seed, epoch, rank, world_size, drop_last)`` (the
items of each of this rank's batches of an epoch), ``forward(model, batch) -> ModelOutput``
(how the batch goes through the model) and ``loss_inputs(output, batch) -> LossInputs`` (how
its rows feed the loss).

* :class:`PairTask`: batches of (image, caption) pairs; the loss sees in-batch negatives.
* :class:`OfflineTask`: pairs plus each pair's offline hard negatives drawn from the
  candidate files (AOQ); the batch stacks anchors and negatives (see
  :func:`stages.mining.sampler.collate_offline`) and the loss gets them as
  :class:`~stages.losses.base.OfflineNegatives`.
"""

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from stages.data.dataset import PairDataset, Split, collate_pairs
from stages.data.tokenizers import CaptionTokenizer
from stages.losses.base import OfflineNegatives
from stages.mining.sampler import OfflineNegativeSampler, OfflinePairDataset, collate_offline
from stages.models.base import EmbeddingModel, ModelOutput
from stages.training.batches import epoch_batches, grouped_epoch_batches


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

    def __init__(self, split: Split, tokenizer: CaptionTokenizer):
        self.dataset = PairDataset(split, tokenizer)
        self.collate = partial(collate_pairs, pad=tokenizer.pad_id)

    def set_epoch(self, epoch: int) -> None:
        """Pairs are the same every epoch (only their order and, for raw images, their
        crops change)."""
        self.dataset.split.set_epoch(epoch)

    def epoch_batches(self, batch_size: int, seed: int, epoch: int, rank: int = 0,
                      world_size: int = 1, drop_last: bool = False) -> list[list[int]]:
        """Random batches (:func:`~stages.training.batches.epoch_batches`)."""
        return epoch_batches(len(self.dataset), batch_size, seed, epoch, rank, world_size,
                             drop_last)

    def forward(self, model: EmbeddingModel, batch: dict) -> ModelOutput:
        """The model's output on the whole batch, in one forward pass."""
        return model(batch)

    def loss_inputs(self, output: ModelOutput, batch: dict) -> LossInputs:
        return LossInputs(output.img_emb, output.cap_emb, batch["image_ids"])


class OfflineTask:
    """Pairs with offline negatives: rows [0, B) of a batch are the anchors (I, T),
    [B, 2B) the negatives (I', T'), [2B, 3B) the second ones (I'', T'')."""

    name = "offline"

    def __init__(self, split: Split, tokenizer: CaptionTokenizer,
                 sampler: OfflineNegativeSampler, group_size: int = 0):
        self.dataset = OfflinePairDataset(split, tokenizer, sampler)
        self.collate = partial(collate_offline, pad=tokenizer.pad_id)
        self.group_size = group_size
        # (C,) caption -> image, moved to the batches' device once (a lookup there, not a
        # round trip through the CPU every step)
        self.owner = torch.from_numpy(np.array(split.layout.owner))

    def epoch_batches(self, batch_size: int, seed: int, epoch: int, rank: int = 0,
                      world_size: int = 1, drop_last: bool = False) -> list[list[int]]:
        """Random batches, or with ``group_size`` g > 0 batches of groups of g captions
        whose images are each other's offline candidates
        (:func:`~stages.training.batches.grouped_epoch_batches`): a caption's group is drawn
        from its image's eligible i2t candidates in the sampler's window (the top h)."""
        if not self.group_size:
            return epoch_batches(len(self.dataset), batch_size, seed, epoch, rank, world_size,
                             drop_last)
        sampler = self.dataset.sampler
        i2t = sampler.i2t
        window = sampler.hardest  # the sampler holds K >= h
        neighbours = np.take_along_axis(i2t.indices, i2t.eligible[:, :window], axis=1)
        return grouped_epoch_batches(neighbours, np.minimum(i2t.counts, window),
                                     self.group_size, batch_size, seed, epoch, rank,
                                     world_size, drop_last, self.dataset.split.layout)

    def set_epoch(self, epoch: int) -> None:
        """Offline negatives (and raw images' crops) are drawn afresh every epoch."""
        self.dataset.set_epoch(epoch)
        self.dataset.split.set_epoch(epoch)

    def forward(self, model: EmbeddingModel, batch: dict) -> ModelOutput:
        """The model's output on the anchors and on each group of negatives, one forward pass
        per group (B rows each), as the AOQ reference encodes them: a model with batch norm
        (VSRN, VSE-infinity) then normalises each group with its own batch statistics, and
        the anchors' statistics do not depend on the negatives drawn. The model's own
        losses (VSRN's caption generation) are those of the anchors' pass: the negatives
        are only encoded."""
        b = batch["image_ids"].shape[0] // 3
        groups = [{k: v[g * b:(g + 1) * b] for k, v in batch.items()} for g in range(3)]
        outputs = [model(groups[0]), *(
            ModelOutput(model.encode_images(g["images"], g["regions"]),
                        model.encode_captions(g["tokens"], g["lengths"])) for g in groups[1:])]
        return ModelOutput(torch.cat([o.img_emb for o in outputs]),
                           torch.cat([o.cap_emb for o in outputs]), outputs[0].aux_losses)

    def loss_inputs(self, output: ModelOutput, batch: dict) -> LossInputs:
        b = output.img_emb.shape[0] // 3
        img, cap = output.img_emb, output.cap_emb
        image_ids = batch["image_ids"]
        if self.owner.device != image_ids.device:
            self.owner = self.owner.to(image_ids.device)
        caption_images = self.owner[batch["caption_ids"].to(image_ids.device)]
        offline = OfflineNegatives(
            captions=cap[b:2 * b], images=img[b:2 * b], captions2=cap[2 * b:],
            images2=img[2 * b:], caption_ids=caption_images[b:2 * b],
            image_ids=image_ids[b:2 * b], caption2_ids=caption_images[2 * b:],
            image2_ids=image_ids[2 * b:])
        return LossInputs(img[:b], cap[:b], image_ids[:b], offline)
