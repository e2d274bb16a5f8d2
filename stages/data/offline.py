"""Training items with offline hard negatives drawn from the candidate files (AOQ).

For caption c of image i = c // 5, a rank n is drawn uniformly from {0, ..., h − 1},
fresh for every epoch (a pure function of seed, epoch and c, so resumed runs and
DataLoader workers draw the same), and gives

* T'  = i2t[i][n]          the anchor image's offline negative caption,
* I'  = t2i[c][n // 5]     the anchor caption's offline negative image,
* T'' = a random caption of I',
* I'' = the image of T'.

With the false-negative filter on, each query's row starts after its skipped suspects:
T' = i2t[i][skip_i2t[i] + n] and I' = t2i[c][skip_t2i[c] + n // 5].
"""

import numpy as np
import torch
from torch.utils.data import Dataset

from .captions import CAPTIONS_PER_IMAGE
from .dataset import Split, pad_tokens
from .tokenizers import CaptionTokenizer
from .vocab import PAD


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays: a cheap, well-mixed counter-based hash."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_hash(seed: int, epoch: int, items: np.ndarray) -> np.ndarray:
    """(B,) uint64 pseudo-random words, a pure function of (seed, epoch, item)."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(epoch))
        return _splitmix64(key + np.asarray(items, dtype=np.uint64))


class OfflineNegativeSampler:
    """Draws (T', I', T'', I'') for captions from i2t (N, K) and t2i (5N, K') indices,
    optionally skipping the first ``skip_i2t`` (N,) / ``skip_t2i`` (5N,) of each row."""

    def __init__(self, i2t: np.ndarray, t2i: np.ndarray, hardest: int, seed: int,
                 skip_i2t: np.ndarray | None = None, skip_t2i: np.ndarray | None = None):
        need_t2i = -(-hardest // CAPTIONS_PER_IMAGE)
        self.skip_i2t = np.zeros(len(i2t), np.int64) if skip_i2t is None else skip_i2t
        self.skip_t2i = np.zeros(len(t2i), np.int64) if skip_t2i is None else skip_t2i
        if (i2t.shape[1] < hardest + self.skip_i2t.max(initial=0)
                or t2i.shape[1] < need_t2i + self.skip_t2i.max(initial=0)):
            raise ValueError(f"need K >= {hardest} (i2t) and >= {need_t2i} (t2i) after the "
                             f"skipped candidates, got {i2t.shape[1]} and {t2i.shape[1]}")
        self.i2t, self.t2i = i2t, t2i
        self.hardest = hardest
        self.seed = seed
        self.epoch = 0

    def draw(self, captions: list[int]) -> dict[str, np.ndarray]:
        """(B,) caption ids -> int64 (B,) arrays ``captions`` (T'), ``images`` (I'),
        ``captions2`` (T''), ``images2`` (I'')."""
        c = np.asarray(captions, dtype=np.int64)
        words = counter_hash(self.seed, self.epoch, c)
        rank = (words % np.uint64(self.hardest)).astype(np.int64)
        which = (_splitmix64(words) % np.uint64(CAPTIONS_PER_IMAGE)).astype(np.int64)
        image = c // CAPTIONS_PER_IMAGE
        t1 = self.i2t[image, self.skip_i2t[image] + rank].astype(np.int64)
        i1 = self.t2i[c, self.skip_t2i[c] + rank // CAPTIONS_PER_IMAGE].astype(np.int64)
        return {"captions": t1, "images": i1, "captions2": i1 * CAPTIONS_PER_IMAGE + which,
                "images2": t1 // CAPTIONS_PER_IMAGE}


class OfflinePairDataset(Dataset):
    """Training pairs with offline negatives; one item per caption.

    An item is a dict of ``images`` ids (3,) [I, I', I''], ``captions`` ids (3,) [T, T', T'']
    and ``features`` (3, R, D) | (3, D), ``regions`` (3,), ``tokens`` (list of 3 (L,)).
    Call :meth:`set_epoch` before each epoch's DataLoader is made.
    """

    def __init__(self, split: Split, tokenizer: CaptionTokenizer,
                 sampler: OfflineNegativeSampler):
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
        anchors = np.asarray(captions, dtype=np.int64) // CAPTIONS_PER_IMAGE
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
