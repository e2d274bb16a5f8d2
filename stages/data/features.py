"""Image features of one split, read lazily item by item.

Two layouts are read:

* SCAN/VSE++ precomp: ``{split}_ims.npy``, (N, R, D) region features or (N, D) global
  features, opened memory-mapped. Some VSE++ releases repeat each image's row once per
  caption (5N rows); those are read as N images (every 5th row).
* The project's HDF5: ``{split}.h5`` with dataset ``features`` (N, R, D) or (N, D), float32
  or float16, chunked one image per chunk; optional ``num_regions`` (N,) for padded
  adaptive region sets, ``boxes`` (N, R, 4), ``image_size`` (N, 2), ``image_ids`` (N,).
  The file is opened on first access in each process (DataLoader workers included).

Neither is ever loaded whole: COCO's train regions are 31 GiB.
"""

import logging
import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import UserError

log = logging.getLogger(__name__)

HDF5_FORMAT = "aoq-features"


class FeatureStore:
    """Random access to ``num_images`` feature arrays of shape ``item_shape``.

    ``store[i]`` is a float32 array (R, D) or (D,); ``store.num_regions(i)`` the number of
    valid (unpadded) regions of image i (R for fixed region sets, 1 for global features).
    """

    def __init__(self, path: Path, num_rows: int, item_shape: tuple[int, ...],
                 row_step: int = 1):
        self.path = Path(path)
        self.item_shape = tuple(item_shape)
        self.row_step = row_step
        self.num_images = num_rows // row_step
        self._array = None
        self._counts = None
        self._pid = None

    def __len__(self) -> int:
        return self.num_images

    @property
    def feature_dim(self) -> int:
        return self.item_shape[-1]

    @property
    def has_regions(self) -> bool:
        return len(self.item_shape) == 2

    def _open(self) -> None:
        if self._pid == os.getpid():
            return
        if self.path.suffix == ".npy":
            self._array = np.load(self.path, mmap_mode="r")
            self._counts = None
        else:
            handle = h5py.File(self.path, "r")
            self._array = handle["features"]
            self._counts = handle["num_regions"][:] if "num_regions" in handle else None
        self._pid = os.getpid()

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self.num_images:
            raise IndexError(f"image {index} out of range for {self.num_images} images")
        self._open()
        return np.array(self._array[index * self.row_step], dtype=np.float32)

    def read_many(self, indices) -> np.ndarray:
        """Features of several images in one read: (B,) ints -> (B, R, D) | (B, D) float32.

        Reads each distinct image once, in increasing order (what HDF5 needs to read fast).
        """
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_images):
            raise IndexError(f"image index out of range for {self.num_images} images")
        self._open()
        unique, inverse = np.unique(indices, return_inverse=True)
        block = np.asarray(self._array[unique * self.row_step], dtype=np.float32)
        return block[inverse]

    def regions_many(self, indices) -> np.ndarray:
        """Valid region counts of several images: (B,) ints -> (B,) int64."""
        indices = np.asarray(indices, dtype=np.int64)
        if not self.has_regions:
            return np.ones(len(indices), dtype=np.int64)
        self._open()
        if self._counts is None:
            return np.full(len(indices), self.item_shape[0], dtype=np.int64)
        return self._counts[indices].astype(np.int64)

    def num_regions(self, index: int) -> int:
        if not self.has_regions:
            return 1
        self._open()
        return int(self._counts[index]) if self._counts is not None else self.item_shape[0]

    def __getstate__(self):
        # DataLoader workers reopen the file themselves; never pickle an open handle.
        state = dict(self.__dict__)
        state.update(_array=None, _counts=None, _pid=None)
        return state


def _check_rank(path: Path, shape: tuple[int, ...]) -> None:
    if len(shape) not in (2, 3):
        raise UserError(f"{path}: features have shape {shape}; expected (N, D) global "
                        "features or (N, R, D) region features")


def open_features(dataset_dir: Path, split: str) -> FeatureStore:
    """Open the features of ``split``: ``{split}.h5`` if present, else ``{split}_ims.npy``."""
    h5_path = dataset_dir / f"{split}.h5"
    npy_path = dataset_dir / f"{split}_ims.npy"
    if h5_path.is_file():
        if npy_path.is_file():
            log.info("%s and %s both exist; reading the HDF5 file", h5_path, npy_path.name)
        try:
            with h5py.File(h5_path, "r") as f:
                if "features" not in f:
                    raise UserError(f"{h5_path}: no 'features' dataset; expected the project's "
                                    "HDF5 layout (see README 'File formats')")
                shape = tuple(f["features"].shape)
        except OSError as exc:
            raise UserError(f"{h5_path}: cannot be read as HDF5 ({exc}); it may be truncated, "
                            "rerun the features stage") from exc
        _check_rank(h5_path, shape)
        return FeatureStore(h5_path, shape[0], shape[1:])
    if npy_path.is_file():
        try:
            array = np.load(npy_path, mmap_mode="r")
        except ValueError as exc:
            raise UserError(f"{npy_path}: cannot be read as .npy ({exc}); the file may be "
                            "truncated, download or convert it again") from exc
        _check_rank(npy_path, array.shape)
        return FeatureStore(npy_path, array.shape[0], array.shape[1:])
    raise UserError(f"no features for split {split!r} in {dataset_dir}: expected {h5_path.name} "
                    f"(features stage) or {npy_path.name} (SCAN/VSE++ precomp download); "
                    "check DATA_PATH and DATA")
