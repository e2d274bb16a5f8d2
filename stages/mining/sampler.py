"""Training items with offline hard negatives drawn from the candidate files (AOQ).

For caption c of image i (which owns k_i captions: 5 in Flickr30K and COCO, the split's
caption layout says, :mod:`stages.core.layout`), a rank n is drawn uniformly from
{0, ..., h − 1}, fresh for every epoch (a pure function of seed, epoch and c, so resumed
runs and DataLoader workers draw the same), and gives

* T'  = i2t[i][n]          the anchor image's offline negative caption,
* I'  = t2i[c][n // k_i]   the anchor caption's offline negative image,
* T'' = a random caption of I',
* I'' = the image of T'.

(AOQ's reference draw, for k_i = 5; t2i rows need ceil(h / the fewest captions an image
has) candidates.)

With false-negative filters or a curriculum (:mod:`stages.mining.selection`), n indexes
each row's eligible candidates instead, within the window the sampler describes.
"""

import numpy as np
import torch
from torch.utils.data import Dataset

from stages.core.counter_hash import counter_hash, splitmix64
from stages.core.layout import CaptionLayout
from stages.data.dataset import Split, pad_tokens
from stages.data.tokenizers import CaptionTokenizer
from stages.data.vocab import PAD
from stages.mining.selection import Selection, sampling_windows


class OfflineNegativeSampler:
    """Draws (T', I', T'', I'') for captions from each direction's
    :class:`~stages.mining.selection.Selection` (the mined candidates and which of them
    the false-negative filters keep).

    Each row's draw is uniform over a window of its eligible candidates: the first h (i2t)
    or ceil(h / k_i) (t2i, a caption of an image of k_i captions), or, with
    ``curriculum_epochs`` E > 0, a window that starts at the easiest eligible ones in epoch
    0 and slides linearly to the hardest by epoch E. A row with fewer eligible candidates
    than the window samples from those it has; a row with none takes its last (least
    similar) candidate. With no filter and no curriculum this is the reference's draw: one n
    for both directions, T' = i2t[i][n], I' = t2i[c][n // k_i].

    ``layout``: the training split's caption layout, which the selections' rows follow
    (i2t: its N images, t2i: its C captions).

    ``mix``: a second source's (i2t, t2i) selections (another miner's candidates); a caption
    takes both its negatives from it with probability ``mix_share``, drawn as from the first
    (the same rank n, its own rows).
    """

    def __init__(self, i2t: Selection, t2i: Selection, hardest: int, seed: int,
                 curriculum_epochs: int = 0,
                 mix: tuple[Selection, Selection] | None = None, mix_share: float = 0.0, *,
                 layout: CaptionLayout):
        self.hardest = hardest
        self.layout = layout
        self.windows = sampling_windows(layout, hardest)
        for pair in ((i2t, t2i), *((mix,) if mix else ())):
            self._check_k(*pair)
        self.i2t, self.t2i = i2t, t2i
        self.mix, self.mix_share = mix, mix_share if mix else 0.0
        self.seed = seed
        self.curriculum_epochs = curriculum_epochs
        self.epoch = 0

    def _check_k(self, i2t: Selection, t2i: Selection) -> None:
        rows = (len(i2t.indices), len(t2i.indices))
        if rows != (self.layout.num_images, self.layout.num_captions):
            raise ValueError(f"candidates of {rows[0]} images (i2t) and {rows[1]} captions "
                             f"(t2i) for a split of {self.layout!r}")
        need_t2i = int(self.windows["t2i"].max(initial=1))
        if i2t.k < self.hardest or t2i.k < need_t2i:
            raise ValueError(f"need K >= {self.hardest} (i2t) and >= {need_t2i} (t2i), got "
                             f"{i2t.k} and {t2i.k}")

    def set_candidates(self, i2t: Selection, t2i: Selection) -> None:
        """Draw from these selections from now on, in place of the first source's (the
        candidates re-mined inside a run); a second source (``mix``) stays as it is."""
        self._check_k(i2t, t2i)
        self.i2t, self.t2i = i2t, t2i

    def _offset(self, counts: np.ndarray, window: np.ndarray) -> np.ndarray:
        """(B,) where each row's window starts: 0, or under the curriculum the share of the
        row's spare eligible candidates still to cover."""
        if not self.curriculum_epochs:
            return np.zeros_like(counts)
        left = max(self.curriculum_epochs - self.epoch, 0)
        return (counts - window) * left // self.curriculum_epochs

    def _pick(self, selection: Selection, rows: np.ndarray, rank: np.ndarray,
              full: np.ndarray, words: np.ndarray) -> np.ndarray:
        """Candidate ids (B,) of ``rows``: the reference's ``rank`` where a row's window is
        full (``full`` (B,) wide), else uniform by ``words`` over what the row keeps."""
        counts = selection.counts[rows]
        window = np.minimum(counts, full)
        own = (words % np.maximum(window, 1).astype(np.uint64)).astype(np.int64)
        n = np.where(window == full, rank, own) + self._offset(counts, window)
        position = np.where(counts > 0, selection.eligible[rows, n],
                            selection.k - 1)
        return selection.indices[rows, position].astype(np.int64)

    def draw(self, captions: list[int]) -> dict[str, np.ndarray]:
        """(B,) caption ids -> int64 (B,) arrays ``captions`` (T'), ``images`` (I'),
        ``captions2`` (T''), ``images2`` (I'')."""
        c = np.asarray(captions, dtype=np.int64)
        layout = self.layout
        words = counter_hash(self.seed, self.epoch, c)
        rank = (words % np.uint64(self.hardest)).astype(np.int64)
        second = splitmix64(words)
        image = layout.owner[c]
        rank_t2i = rank // layout.counts[image]
        full_i2t, full_t2i = self.windows["i2t"][image], self.windows["t2i"][c]
        third = splitmix64(second)
        t1 = self._pick(self.i2t, image, rank, full_i2t, words)
        i1 = self._pick(self.t2i, c, rank_t2i, full_t2i, third)
        if self.mix_share:  # a caption's negatives both come from the second source
            coin = (splitmix64(third) >> np.uint64(11)).astype(np.float64) / 2.0 ** 53
            other = coin < self.mix_share
            t1 = np.where(other, self._pick(self.mix[0], image, rank, full_i2t, words), t1)
            i1 = np.where(other, self._pick(self.mix[1], c, rank_t2i, full_t2i, third), i1)
        which = (second % layout.counts[i1].astype(np.uint64)).astype(np.int64)
        return {"captions": t1, "images": i1, "captions2": layout.starts[i1] + which,
                "images2": layout.owner[t1]}


class OfflinePairDataset(Dataset):
    """Training pairs with offline negatives; one item per caption.

    An item is a dict of ``images`` ids (3,) [I, I', I''], ``captions`` ids (3,) [T, T', T'']
    and ``features`` (3, R, D) | (3, D), ``regions`` (3,), ``tokens`` (list of 3 (L,)).
    Call :meth:`set_epoch` before each epoch's DataLoader is made.
    """

    def __init__(self, split: Split, tokenizer: CaptionTokenizer,
                 sampler: OfflineNegativeSampler):
        if sampler.layout != split.layout:
            raise ValueError(f"the sampler's candidates follow {sampler.layout!r}, the split "
                             f"{split.layout!r}")
        self.split = split
        self.tokens = split.tokenized(tokenizer)
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, c: int) -> dict:
        return self.__getitems__([c])[0]

    def __getitems__(self, captions: list[int]) -> list[dict]:
        neg = self.sampler.draw(captions)
        anchors = self.split.layout.owner[np.asarray(captions, dtype=np.int64)]
        image_ids = np.stack([anchors, neg["images"], neg["images2"]], axis=1)  # (B, 3)
        caption_ids = np.stack([np.asarray(captions), neg["captions"], neg["captions2"]], 1)
        feats = self.split.features.read_many(image_ids.reshape(-1))
        feats = torch.from_numpy(feats).view(len(captions), 3, *feats.shape[1:])
        regions = self.split.features.regions_many(image_ids.reshape(-1)).reshape(-1, 3)
        return [{"images": image_ids[k], "captions": caption_ids[k], "features": feats[k],
                 "regions": regions[k], "tokens": [self.tokens[int(t)] for t in caption_ids[k]]}
                for k in range(len(captions))]


def collate_offline(batch: list[dict], pad: int = PAD) -> dict[str, torch.Tensor]:
    """Stack items group by group: rows [0, B) are the anchors (I, T), [B, 2B) the offline
    negatives (I', T'), [2B, 3B) the second ones (I'', T''); tokens padded with ``pad``.

    Returns ``images`` (3B, R, D) | (3B, D), ``regions`` (3B,), ``tokens`` (3B, L),
    ``lengths`` (3B,), ``image_ids`` (3B,), ``caption_ids`` (3B,).
    """
    groups = range(3)
    tokens, lengths = pad_tokens([item["tokens"][g] for g in groups for item in batch], pad)
    return {
        "images": torch.stack([item["features"][g] for g in groups for item in batch]),
        "regions": torch.tensor([int(item["regions"][g]) for g in groups for item in batch]),
        "tokens": tokens,
        "lengths": lengths,
        "image_ids": torch.tensor([int(item["images"][g]) for g in groups for item in batch]),
        "caption_ids": torch.tensor([int(item["captions"][g]) for g in groups
                                     for item in batch]),
    }
