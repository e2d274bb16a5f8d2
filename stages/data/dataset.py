"""Torch datasets over one split: (image, caption) pairs for training, and images and
captions separately for embedding. Caption ``c`` belongs to image ``c // 5``.
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
from stages.core.layout import CaptionLayout
from stages.data.captions import CAPTIONS_PER_IMAGE, check_split, read_captions
from stages.data.features import FeatureStore, open_features
from stages.data.splits import read_ids_file
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
    """One split of a dataset folder: features of N images and their 5N captions.

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
    """Open ``split`` of a dataset folder and check that captions match images 5 to 1.

    ``images``: the split's raw images (:func:`~stages.data.images.open_images`), read
    instead of its features.
    """
    dataset_dir = Path(dataset_dir)
    caps_path = check_split(dataset_dir, split)
    features = images if images is not None else open_features(dataset_dir, split)
    captions = read_captions(caps_path)
    n_caps, rows = len(captions), features.num_images
    if n_caps == CAPTIONS_PER_IMAGE * rows:
        pass
    elif images is None and n_caps == rows and rows % CAPTIONS_PER_IMAGE == 0:
        _check_repeated_rows(dataset_dir, split, features, caps_path)
        log.info("%s: %d feature rows for %d captions: one row per caption, reading every "
                 "%dth row as the image", features.path, rows, n_caps, CAPTIONS_PER_IMAGE)
        features = FeatureStore(features.path, rows, features.item_shape, CAPTIONS_PER_IMAGE)
    else:
        raise UserError(f"{caps_path} has {n_caps} captions but {features.path} has {rows} "
                        f"images; expected exactly {CAPTIONS_PER_IMAGE} consecutive captions "
                        "per image: check that both files come from the same split and release")
    return Split(split, features, captions,
                 CaptionLayout.uniform(len(captions) // CAPTIONS_PER_IMAGE))


def _check_repeated_rows(dataset_dir: Path, split: str, store: FeatureStore,
                         caps_path: Path) -> None:
    """As many feature rows as captions is either SCAN's layout (each image's row repeated
    for its 5 captions) or one caption per image. The split's ids file tells them apart
    (one id per image, or per caption in runs of 5), else the rows themselves (an image's 5
    rows are equal): what neither confirms is a :class:`UserError`, never a guess that
    would pair captions with the wrong images."""
    rows = store.num_images
    ids_file = dataset_dir / f"{split}_ids.txt"
    if ids_file.is_file():
        ids = read_ids_file(ids_file)
        if len(ids) * CAPTIONS_PER_IMAGE == rows:
            return
        problem = f"{ids_file} lists {len(ids)} images"
    else:
        ends = [*range(CAPTIONS_PER_IMAGE), *range(rows - CAPTIONS_PER_IMAGE, rows)]
        groups = store.read_many(ends).reshape(2, CAPTIONS_PER_IMAGE, -1)
        if (groups == groups[:, :1]).all():
            return
        problem = (f"rows 0-{CAPTIONS_PER_IMAGE - 1} or the last {CAPTIONS_PER_IMAGE} of "
                   f"{store.path.name} differ (there is no {ids_file.name} to say more)")
    raise UserError(f"{caps_path} has {rows} captions for the {rows} feature rows of "
                    f"{store.path}, which would be {rows // CAPTIONS_PER_IMAGE} images with "
                    f"their row repeated for each of {CAPTIONS_PER_IMAGE} captions (SCAN's "
                    f"layout), but {problem}: one caption per image cannot be trained on yet "
                    f"(this tool needs {CAPTIONS_PER_IMAGE} consecutive captions per image); "
                    "otherwise check that the files come from the same split and release")


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
    """Training pairs, one item per caption c: ``(image, regions, tokens, c, c // 5)``.

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
        images = [c // CAPTIONS_PER_IMAGE for c in captions]
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

