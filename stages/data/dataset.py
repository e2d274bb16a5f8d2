"""Torch datasets over one split: (image, caption) pairs for training, and images and
captions separately for embedding. Caption ``c`` belongs to image ``split.layout.owner[c]``.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from stages.core.errors import UserError
from stages.core.layout import LEGACY_CAPTIONS_PER_IMAGE, CaptionLayout
from stages.data.captions import check_split, read_captions
from stages.data.features import FeatureStore, open_features
from stages.data.splits import ids_path, read_id_runs
from stages.data.tokenizers import CaptionTokenizer
from stages.data.vocab import PAD

if TYPE_CHECKING:  # images.py imports offline.py, which imports this module
    from stages.data.images import ImageStore

log = logging.getLogger(__name__)

# The dataset folder's sub-folder of frozen text towers' outputs (data.text_cache_dir's default).
TEXT_CACHE_FOLDER = "cache"


class TokenizedCaptions:
    """Every caption of a split encoded once: token ids in one flat int64 array.

    ``tokens[c]`` is caption c's ids (with the tokenizer's special tokens) as a (L,) long
    tensor, a view of the flat array (not to be modified in place). Tokenizing once up front
    instead of per item keeps it out of the training loop.
    """

    def __init__(self, captions: list[str], tokenizer: CaptionTokenizer):
        encoded = tokenizer.encode_many(captions)
        lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.flat = np.fromiter((t for e in encoded for t in e), dtype=np.int64,
                                count=int(self.offsets[-1]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, c: int) -> torch.Tensor:
        return torch.from_numpy(self.flat[self.offsets[c]:self.offsets[c + 1]])


@dataclass
class Split:
    """One split of a dataset folder: features of N images and their C captions, image i
    owning captions ``layout.captions_of(i)``.

    ``features`` is a :class:`FeatureStore`, or for models that read pixels an
    :class:`~stages.data.images.ImageStore` (decoded images, same interface).
    """

    name: str
    features: "FeatureStore | ImageStore"
    captions: list[str]
    layout: CaptionLayout

    @property
    def num_images(self) -> int:
        return len(self.features)

    def tokenized(self, tokenizer: CaptionTokenizer) -> TokenizedCaptions:
        """The captions encoded with ``tokenizer``, computed once per (split, tokenizer)."""
        cache = self.__dict__.setdefault("_tokenized", {})
        if id(tokenizer) not in cache:
            cache[id(tokenizer)] = (tokenizer, TokenizedCaptions(self.captions, tokenizer))
        return cache[id(tokenizer)][1]

    def limit(self, num_images: int) -> "Split":
        """The first ``num_images`` images and their captions (COCO validates on 1000)."""
        if num_images <= 0 or num_images >= self.num_images:
            return self
        layout = self.layout.head(num_images)
        return Split(self.name, self.features.head(num_images),
                     self.captions[: layout.num_captions], layout)

    def set_epoch(self, epoch: int) -> None:
        """The training epoch (raw images draw their crops for it)."""
        self.features.set_epoch(epoch)


def open_split(dataset_dir: str | Path, split: str, images: "ImageStore | None" = None) -> Split:
    """Open ``split`` of a dataset folder and tell which image owns each caption.

    The caption layout (:class:`~stages.core.layout.CaptionLayout`) comes from the data: a
    ``{split}_ids.txt`` listing one id per caption gives each image's count (its runs); else
    every image has the same number, captions / images. A file of one feature row per
    caption (SCAN's layout, each image's row repeated) is read as one row per image once
    the ids or the rows confirm it. What the files do not determine is a
    :class:`UserError` naming them, never a guess that pairs captions with the wrong
    images.

    ``images``: the split's raw images (:func:`~stages.data.images.open_images`), read
    instead of its features.
    """
    dataset_dir = Path(dataset_dir)
    caps_path = check_split(dataset_dir, split)
    features = images if images is not None else open_features(dataset_dir, split)
    captions = read_captions(caps_path)
    ids_file = ids_path(dataset_dir, split)
    if ids_file.is_file():
        layout, repeated = _listed_layout(ids_file, features, len(captions), caps_path,
                                          images is None)
    else:
        layout, repeated = _data_layout(features, len(captions), caps_path, ids_file,
                                        images is None)
    if repeated:
        log.info("%s: %d feature rows for %d captions: one row per caption, reading each "
                 "image's first", features.path, features.num_images, len(captions))
        features = FeatureStore.one_row_per_caption(features, layout.first_caption,
                                                    layout.per_image)
    return Split(split, features, captions, layout)


def _listed_layout(ids_file: Path, features: "FeatureStore | ImageStore", num_captions: int,
                   caps_path: Path, rows_may_repeat: bool) -> tuple[CaptionLayout, bool]:
    """The layout the ids file gives, and whether the features hold one row per caption."""
    ids, runs = read_id_runs(ids_file)
    rows = features.num_images
    if runs is not None:
        if runs.sum() != num_captions:
            raise UserError(f"{caps_path} has {num_captions} captions but {ids_file} lists "
                            f"one id per caption for {runs.sum()}: check that both files come "
                            "from the same split and release (`aoq captions` writes both)")
        layout = CaptionLayout.from_counts(runs)
        shape = "one id per caption, its runs each image's captions"
    elif num_captions >= len(ids) and num_captions % len(ids) == 0:
        layout = CaptionLayout.uniform(len(ids), num_captions // len(ids))
        shape = "one id per image"
    else:
        raise UserError(f"{caps_path} has {num_captions} captions but {ids_file} lists "
                        f"{len(ids)} images once each, which needs the same number of "
                        "consecutive captions for every image: check that both files come "
                        "from the same split and release, or list each image's id once per "
                        "caption in the ids file")
    if rows == layout.num_images:
        return layout, False
    if rows_may_repeat and rows == num_captions:
        return layout, True
    raise UserError(f"{features.path} has {rows} images but {ids_file} lists "
                    f"{layout.num_images} ({shape}) for the {num_captions} captions of "
                    f"{caps_path.name}: check that the features and the ids file come from "
                    "the same split and release")


# Feature rows compared at each end of a file of as many rows as captions (no ids file).
CHECKED_ROWS = 16


def _data_layout(features: "FeatureStore | ImageStore", num_captions: int, caps_path: Path,
                 ids_file: Path, rows_may_repeat: bool) -> tuple[CaptionLayout, bool]:
    """The layout captions and features give without an ids file (and whether the features
    hold one row per caption): the same number of captions for every image. As many
    feature rows as captions is SCAN's layout when both ends' groups of 5 rows are each one
    row repeated (as before layouts), one caption per image when no two consecutive rows
    of the first and last ``CHECKED_ROWS`` are equal, and a :class:`UserError` otherwise."""
    rows = features.num_images
    if num_captions < rows or num_captions % rows:
        raise UserError(f"{caps_path} has {num_captions} captions but {features.path} has "
                        f"{rows} images; expected the same number of consecutive captions "
                        f"for every image, or a {ids_file.name} listing each image's id once "
                        "per caption: check that both files come from the same split and "
                        "release")
    if num_captions > rows or not rows_may_repeat:
        log.info("%s: %d captions for %d images and no %s: reading %d captions per image "
                 "(an ids file listing each id once per caption gives images different "
                 "numbers)", caps_path, num_captions, rows, ids_file.name, num_captions // rows)
        return CaptionLayout.uniform(rows, num_captions // rows), False
    per = LEGACY_CAPTIONS_PER_IMAGE
    if rows % per == 0 and _runs_of_exactly(per, features):
        return CaptionLayout.uniform(rows // per, per), True
    ends = np.unique(np.r_[np.arange(min(rows, CHECKED_ROWS)),
                           np.arange(max(rows - CHECKED_ROWS, 0), rows)])
    block = features.read_many(ends).reshape(len(ends), -1)
    if not ((block[1:] == block[:-1]).all(axis=1) & (np.diff(ends) == 1)).any():
        return CaptionLayout.uniform(rows, 1), False
    raise UserError(f"{caps_path} has {rows} captions for the {rows} feature rows of "
                    f"{features.path}, some consecutive rows equal but not in groups of "
                    f"{per} at both ends (SCAN's layout, each image's row repeated once per "
                    "caption): the files do not say which image owns which caption; write "
                    f"{ids_file} listing each image's id once per caption (its captions' "
                    "lines consecutive)")


def _runs_of_exactly(per: int, features: "FeatureStore | ImageStore") -> bool:
    """Whether the first and the last ``per`` feature rows are each one row repeated, and
    the rows next to them (when there are more) differ: runs of exactly ``per`` at both ends
    (6 or 10 repeated rows per image would pass a check of the first ``per`` alone)."""
    rows = features.num_images
    for first, stop in ((0, min(per + 1, rows)), (max(rows - per - 1, 0), rows)):
        block = features.read_many(list(range(first, stop))).reshape(stop - first, -1)
        run, neighbour = (block[:per], block[per:]) if first == 0 else (block[-per:],
                                                                         block[:-per])
        if not (run == run[:1]).all() or (neighbour == run[:1]).all(axis=1).any():
            return False
    return True


def check_compatible(train_split: Split, other_split: Split) -> None:
    """Refuse a split whose image features a model trained on ``train_split`` cannot read:
    another feature dimension D (a matmul error after a whole epoch otherwise), or global
    (N, D) features against regions (N, R, D) or the reverse (another extractor)."""
    a, b = train_split.features, other_split.features
    if a.feature_dim != b.feature_dim or a.has_regions != b.has_regions:
        raise UserError(
            f"{b.path} ({other_split.name}) holds features of shape {_shape(b)} but "
            f"{a.path} ({train_split.name}) {_shape(a)}: the splits come from different "
            "feature extractors; make both with the same features stage (or the same "
            "precomp release)")


def check_feature_dim(split: Split, img_dim: int, checkpoint: str | Path) -> None:
    """Refuse a split whose feature dimension differs from a model's ``img_dim`` (the
    checkpoint's ``model.args.img_dim``)."""
    store = split.features
    if store.feature_dim != img_dim:
        raise UserError(
            f"{store.path} ({split.name}) holds {store.feature_dim}-d features, shape "
            f"{_shape(store)}, but {checkpoint} was trained on {img_dim}-d features: "
            "evaluate it on the dataset it was trained on (data.name / data.path), or "
            "train a model on this one")


def _shape(store: FeatureStore) -> str:
    return str((store.num_images, *store.item_shape))


class PairDataset(Dataset):
    """Training pairs, one item per caption c: ``(image, regions, tokens, c, i)``, ``i`` the
    image owning caption c (``split.layout.owner[c]``).

    ``image`` is (R, D) or (D,) float32. ``__getitems__`` fetches a whole batch with one
    feature read (DataLoader uses it when present).
    """

    def __init__(self, split: Split, tokenizer: CaptionTokenizer):
        self.split = split
        self.tokens = split.tokenized(tokenizer)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, c: int):
        return self.__getitems__([c])[0]

    def __getitems__(self, captions: list[int]) -> list[tuple]:
        images = self.split.layout.owner[np.asarray(captions, dtype=np.int64)].tolist()
        feats = torch.from_numpy(self.split.features.read_many(images))
        regions = self.split.features.regions_many(images)
        return [(feats[k], int(regions[k]), self.tokens[c], c, i)
                for k, (c, i) in enumerate(zip(captions, images, strict=True))]


class ImageDataset(Dataset):
    """Unique images of a split: ``(image, regions, i)``."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return self.split.num_images

    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, images: list[int]) -> list[tuple]:
        feats = torch.from_numpy(self.split.features.read_many(images))
        regions = self.split.features.regions_many(images)
        return [(feats[k], int(regions[k]), i) for k, i in enumerate(images)]


class CaptionDataset(Dataset):
    """All captions of a split: ``(tokens, c)``."""

    def __init__(self, split: Split, tokenizer: CaptionTokenizer):
        self.tokens = split.tokenized(tokenizer)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, c: int):
        return self.tokens[c], c


def pad_tokens(token_lists: list[torch.Tensor],
               pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad variable-length token id sequences with ``pad`` (the tokenizer's ``pad_id``):
    ((B, L) long, lengths (B,) long)."""
    lengths = torch.tensor([t.shape[0] for t in token_lists], dtype=torch.long)
    return pad_sequence(token_lists, batch_first=True, padding_value=pad), lengths


def collate_pairs(batch, pad: int = PAD) -> dict[str, torch.Tensor]:
    """Stack a list of :class:`PairDataset` items, tokens padded with ``pad``.

    Returns ``images`` (B, R, D) or (B, D) float, ``regions`` (B,) long, ``tokens`` (B, L)
    long, ``lengths`` (B,) long, ``caption_ids`` (B,) long, ``image_ids`` (B,) long.
    """
    images, regions, tokens, caption_ids, image_ids = zip(*batch, strict=True)
    tokens, lengths = pad_tokens(list(tokens), pad)
    return {
        "images": torch.stack(images),
        "regions": torch.tensor(regions, dtype=torch.long),
        "tokens": tokens,
        "lengths": lengths,
        "caption_ids": torch.tensor(caption_ids, dtype=torch.long),
        "image_ids": torch.tensor(image_ids, dtype=torch.long),
    }


def collate_images(batch) -> dict[str, torch.Tensor]:
    """``images`` (B, R, D) | (B, D), ``regions`` (B,), ``image_ids`` (B,)."""
    images, regions, image_ids = zip(*batch, strict=True)
    return {"images": torch.stack(images), "regions": torch.tensor(regions, dtype=torch.long),
            "image_ids": torch.tensor(image_ids, dtype=torch.long)}


def collate_captions(batch, pad: int = PAD) -> dict[str, torch.Tensor]:
    """``tokens`` (B, L) padded with ``pad``, ``lengths`` (B,), ``caption_ids`` (B,)."""
    tokens, caption_ids = zip(*batch, strict=True)
    tokens, lengths = pad_tokens(list(tokens), pad)
    return {"tokens": tokens, "lengths": lengths,
            "caption_ids": torch.tensor(caption_ids, dtype=torch.long)}

