"""Raw images of one split, decoded on demand, for models that read pixels (``vse_cnn``).

The split is what ``aoq captions`` writes: ``{split}_images.txt`` (each image's path under
the image root, in caption order) beside ``{split}_caps.txt``; the image root is the
``data.images`` setting. :class:`ImageStore` stands where a
:class:`~stages.data.features.FeatureStore` stands in a :class:`~stages.data.dataset.Split`
(same ``read_many``/``regions_many``), so the datasets, tasks and encoders read either.

Items are normalised float32 tensors (3, S, S), as an :class:`ImagePreprocessing` says (a
model's :meth:`~stages.models.base.EmbeddingModel.image_preprocessing`: ImageNet's mean/std
and resize by default, CLIP's own for ``clip``):

* evaluation (``augment=False``): resize the shorter side (S * 256 / 224 by default), center
  crop S (the transform of ``aoq features cnn``);
* training (``augment=True``): RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) to S and a
  horizontal flip with probability 1/2, drawn from a generator seeded by (seed, epoch,
  image): the same image gets the same crop in the same epoch whichever worker decodes it
  and wherever a run was resumed.

Decoding happens where ``read_many`` is called: in the DataLoader workers. An image that
cannot be read is an :class:`UnreadableImage` naming the file.
"""

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.core.counter_hash import counter_hash
from stages.core.errors import UserError
from stages.data.captions import check_split, read_text_lines

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
# Tells the crops' streams apart from the offline sampler's draws of the same counter hash.
CROP_STREAM = 1
SAMPLE_IMAGES = 16  # evenly spaced images hashed by the fingerprint, plus the ends


@dataclass(frozen=True)
class ImagePreprocessing:
    """How a model's input images are made: the crop ``size`` S, the shorter side ``resize``
    before the evaluation center crop (0: S * 256 / 224), the ``interpolation`` of resizes
    (bilinear | bicubic) and the per-channel ``mean``/``std`` of the normalisation."""

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: int = 0
    interpolation: str = "bilinear"

    @property
    def eval_resize(self) -> int:
        return self.resize or self.size * 256 // 224


class UnreadableImage(UserError):
    """An image file that cannot be decoded (missing, truncated, not an image).

    Raised in a DataLoader worker, torch re-creates the exception in the main process with
    the worker's traceback as its message; the original one line is kept.
    """

    def __init__(self, message: str):
        if "Original Traceback" in message:  # re-created by torch's ExceptionWrapper
            last = message.rstrip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, height, width), drawn from ``rng``: an area of
    ``CROP_SCALE`` of the image at an aspect ratio in ``CROP_RATIO`` (log-uniform), 10 tries,
    else the largest center crop within the ratio range (torchvision's algorithm)."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageStore:
    """The images of a split, by index: ``read_many`` -> (B, 3, S, S) float32 arrays.

    ``path`` is the split's image list, ``root`` the folder its paths are relative to,
    ``size`` the crop S (ImageNet's preprocessing) or an :class:`ImagePreprocessing`;
    ``augment`` picks the training transform, drawn from ``seed`` and the epoch set by
    :meth:`set_epoch`.
    """

    def __init__(self, path: Path, root: Path, files: list[str],
                 size: "int | ImagePreprocessing", augment: bool = False, seed: int = 0):
        self.path = Path(path)
        self.root = Path(root)
        self.files = files
        self.preprocessing = (size if isinstance(size, ImagePreprocessing)
                              else ImagePreprocessing(size))
        self.size = self.preprocessing.size
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    @property
    def num_images(self) -> int:
        return len(self.files)

    @property
    def item_shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    @property
    def feature_dim(self) -> int:
        """The channels (3): what a pixel model's ``img_dim`` is."""
        return 3

    @property
    def has_regions(self) -> bool:
        return False

    def set_epoch(self, epoch: int) -> None:
        """The epoch the training crops are drawn for."""
        self.epoch = epoch

    def head(self, num_images: int) -> "ImageStore":
        """The first ``num_images`` images."""
        store = ImageStore(self.path, self.root, self.files[:num_images],
                           self.preprocessing, self.augment, self.seed)
        store.epoch = self.epoch
        return store

    def image_path(self, index: int) -> Path:
        return self.root / self.files[index]

    def read_many(self, indices) -> np.ndarray:
        """Decoded images: (B,) ints -> (B, 3, S, S) float32, each distinct image decoded
        once (and, training, cropped as drawn for (seed, epoch, image))."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_images):
            raise IndexError(f"image index out of range for {self.num_images} images")
        unique, inverse = np.unique(indices, return_inverse=True)
        words = counter_hash(self.seed, self.epoch, unique) if self.augment else unique
        block = np.stack([self._load(int(i), int(w)) for i, w in zip(unique, words,
                                                                      strict=True)])
        return block[inverse]

    def regions_many(self, indices) -> np.ndarray:
        """(B,) ones: an image is one item, not a set of regions."""
        return np.ones(len(np.asarray(indices)), dtype=np.int64)

    def _load(self, index: int, word: int) -> np.ndarray:
        from PIL import Image
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        path = self.image_path(index)
        try:
            with Image.open(path) as file:
                image = file.convert("RGB")
        except (OSError, ValueError, SyntaxError) as exc:  # missing, truncated, not an image
            raise UnreadableImage(
                f"cannot read image {path} (image {index} of {self.path}): {exc}; replace "
                f"the file, or remove its line from {self.path.name} and its captions (and "
                "ids)") from exc
        pre = self.preprocessing
        mode = InterpolationMode(pre.interpolation)
        if self.augment:
            rng = np.random.default_rng([word, CROP_STREAM])
            top, left, h, w = crop_box(image.width, image.height, rng)
            image = F.resized_crop(image, top, left, h, w, [self.size, self.size],
                                   interpolation=mode, antialias=True)
            if rng.random() < 0.5:
                image = F.hflip(image)
        else:
            image = F.center_crop(F.resize(image, pre.eval_resize, interpolation=mode,
                                           antialias=True), [self.size, self.size])
        tensor = F.normalize(F.to_tensor(image), pre.mean, pre.std)
        return tensor.numpy()

    def fingerprint(self) -> dict:
        """What identifies the split's images wherever the root is: the SHA-256 of the image
        list, the image count and the SHA-256 of the bytes of a sample of image files (the
        first, the last and ``SAMPLE_IMAGES`` evenly spaced)."""
        n = self.num_images
        sample = np.unique(np.linspace(0, n - 1, SAMPLE_IMAGES + 2).round().astype(np.int64))
        digest = hashlib.sha256()
        for index in sample.tolist():
            path = self.image_path(index)
            try:
                digest.update(path.read_bytes())
            except OSError as exc:
                raise UnreadableImage(f"cannot read image {path} (image {index} of "
                                      f"{self.path}): {exc}") from exc
        return {"file": self.path.name, "kind": "images", "num_images": n,
                "list_sha256": hashlib.sha256(self.path.read_bytes()).hexdigest(),
                "sample_images": len(sample), "sample_sha256": digest.hexdigest()}


def open_images(dataset_dir: str | Path, split: str, root: str | Path,
                size: int | ImagePreprocessing, augment: bool = False,
                seed: int = 0) -> ImageStore:
    """The images of ``split`` listed in ``dataset_dir/{split}_images.txt``, under ``root``,
    made as ``size`` says (the crop S with ImageNet's preprocessing, or an
    :class:`ImagePreprocessing`).

    The list and the root are checked up front: a missing root, list or image file is a
    :class:`UserError` naming it (the first few missing files listed), so a bad path stops
    the run before training, not an epoch into it.
    """
    dataset_dir = Path(dataset_dir)
    listing = dataset_dir / f"{split}_images.txt"
    if not str(root):
        raise UserError(f"no image folder given for the raw images of {listing}: set "
                        "data.images=PATH (make ... IMAGES=PATH), the folder the paths in "
                        f"{listing.name} are relative to")
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"image folder {root} (data.images) not found; set data.images "
                        f"(make ... IMAGES=PATH) to the folder the paths in {listing.name} "
                        "are relative to")
    if not listing.is_file():
        check_split(dataset_dir, split)  # no such split at all: say which splits there are
        raise UserError(f"{listing} not found; models that read raw images need the image "
                        "list `aoq captions` writes (make features KARPATHY=... or "
                        "COCO_JSON=...)")
    files = [line.strip() for line in read_text_lines(listing) if line.strip()]
    if not files:
        raise UserError(f"{listing} lists no images; write it again with `aoq captions`")
    missing = [f for f in files if not os.path.isfile(root / f)]
    if missing:
        raise UserError(f"{len(missing)} of the {len(files)} images {listing} lists are not "
                        f"under {root} (first: {', '.join(missing[:3])}); check data.images "
                        "(make ... IMAGES=PATH)")
    return ImageStore(listing, root, files, size, augment, seed)

