"""Which image each caption belongs to: a split's caption layout.

Captions are stored image by image: image ``i`` owns the consecutive captions
``starts[i]:starts[i + 1]``. Flickr30K and COCO (as released for retrieval) have 5 per
image, web data one, and a COCO split keeping all its captions 5 to 7: the layout says
which, so no code assumes ``c // 5``.

In HDF5 files (embeddings, candidates) a layout is stored as the attribute
``captions_per_image`` when every image has the same number, else as the dataset
``caption_counts`` (N,) int32. Files written before layouts were stored hold 5 per image.
"""

import hashlib

import numpy as np

from stages.core.errors import UserError

# What files and folders written before layouts were stored hold (SCAN, VSE++, AOQ).
LEGACY_CAPTIONS_PER_IMAGE = 5


class CaptionLayout:
    """The owner of every caption of a split of N images and C captions.

    ``starts`` (N + 1,) int64: image i owns captions ``starts[i]:starts[i + 1]``; every
    image owns at least one.
    """

    def __init__(self, starts):
        starts = np.asarray(starts, dtype=np.int64)
        if starts.ndim != 1 or len(starts) < 1 or starts[0] != 0:
            raise ValueError("caption layout: starts must be a 1-d array from 0")
        counts = np.diff(starts)
        if (counts < 1).any():
            raise ValueError(f"caption layout: image {int(np.argmax(counts < 1))} owns no "
                             "caption")
        self.starts = starts
        self.starts.flags.writeable = False
        self.counts = counts
        self.counts.flags.writeable = False
        self._owner = None

    @classmethod
    def uniform(cls, num_images: int, per_image: int = LEGACY_CAPTIONS_PER_IMAGE
                ) -> "CaptionLayout":
        """``per_image`` captions for each of ``num_images`` images."""
        return cls(np.arange(num_images + 1, dtype=np.int64) * per_image)

    @classmethod
    def from_counts(cls, counts) -> "CaptionLayout":
        """Image i owns ``counts[i]`` captions, in image order."""
        counts = np.asarray(counts, dtype=np.int64)
        starts = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        return cls(starts)

    @classmethod
    def from_owner(cls, owner) -> "CaptionLayout":
        """The layout whose caption c belongs to image ``owner[c]``; owners must be 0, 1, ...
        in runs (each image's captions consecutive, images in order)."""
        owner = np.asarray(owner, dtype=np.int64)
        if len(owner) and (owner[0] != 0 or not np.isin(np.diff(owner), (0, 1)).all()):
            raise ValueError("caption layout: caption owners must run 0, 0, 1, 1, 1, 2, ... "
                             "(each image's captions consecutive, images in order)")
        counts = np.bincount(owner) if len(owner) else np.zeros(0, dtype=np.int64)
        return cls.from_counts(counts)

    @property
    def num_images(self) -> int:
        return len(self.starts) - 1

    @property
    def num_captions(self) -> int:
        return int(self.starts[-1])

    @property
    def per_image(self) -> int | None:
        """The number of captions every image has, or None when they differ."""
        if self.num_images == 0:
            return LEGACY_CAPTIONS_PER_IMAGE
        first = int(self.counts[0])
        return first if (self.counts == first).all() else None

    @property
    def owner(self) -> np.ndarray:
        """(C,) int64: the image of each caption (read-only)."""
        if self._owner is None:
            self._owner = np.repeat(np.arange(self.num_images, dtype=np.int64), self.counts)
            self._owner.flags.writeable = False
        return self._owner

    @property
    def first_caption(self) -> np.ndarray:
        """(N,) int64: each image's first caption."""
        return self.starts[:-1]

    @property
    def max_per_image(self) -> int:
        return int(self.counts.max()) if self.num_images else LEGACY_CAPTIONS_PER_IMAGE

    @property
    def min_per_image(self) -> int:
        return int(self.counts.min()) if self.num_images else LEGACY_CAPTIONS_PER_IMAGE

    def captions_of(self, image: int) -> range:
        return range(int(self.starts[image]), int(self.starts[image + 1]))

    def caption_range(self, start: int, stop: int) -> tuple[int, int]:
        """The captions ``[c0, c1)`` of images ``start:stop``."""
        return int(self.starts[start]), int(self.starts[stop])

    def images(self, start: int, stop: int) -> "CaptionLayout":
        """The layout of images ``start:stop`` alone (their captions renumbered from 0)."""
        return CaptionLayout(self.starts[start:stop + 1] - self.starts[start])

    def head(self, num_images: int) -> "CaptionLayout":
        return self.images(0, num_images)

    def identity(self) -> int | str:
        """What stamps record: the common count, or a digest of the counts."""
        per_image = self.per_image
        if per_image is not None:
            return per_image
        return "counts:" + hashlib.sha256(self.counts.astype("<i8").tobytes()).hexdigest()[:16]

    def __eq__(self, other) -> bool:
        return isinstance(other, CaptionLayout) and np.array_equal(self.starts, other.starts)

    def __repr__(self) -> str:
        shape = (f"{self.per_image} per image" if self.per_image is not None
                 else f"{self.min_per_image}-{self.max_per_image} per image")
        return f"CaptionLayout({self.num_images} images, {self.num_captions} captions, {shape})"

    # --- HDF5 (h5py File or Group) ---------------------------------------------------------

    def write_h5(self, group) -> None:
        """Store the layout in an open HDF5 group (see the module docstring)."""
        per_image = self.per_image
        if per_image is not None:
            group.attrs["captions_per_image"] = per_image
        else:
            group.create_dataset("caption_counts", data=self.counts.astype(np.int32))

    @classmethod
    def read_h5(cls, group, num_images: int, num_captions: int, path) -> "CaptionLayout":
        """The layout stored in an HDF5 group of a file holding ``num_images`` images and
        ``num_captions`` captions (5 per image for files that store none); a layout that
        does not add up is a :class:`UserError` naming ``path``."""
        if "caption_counts" in group:
            layout = cls.from_counts(np.asarray(group["caption_counts"][...]))
        else:
            per_image = int(group.attrs.get("captions_per_image", LEGACY_CAPTIONS_PER_IMAGE))
            layout = cls.uniform(num_images, per_image)
        if layout.num_images != num_images or layout.num_captions != num_captions:
            raise UserError(f"{path}: {num_images} images and {num_captions} captions do not "
                            f"match its caption layout ({layout!r}); the file is damaged or "
                            "was written by another tool: make it again")
        return layout
