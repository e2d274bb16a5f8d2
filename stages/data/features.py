"""Image features of one split, read lazily item by item.

Two layouts are read:

* SCAN/VSE++ precomp: ``{split}_ims.npy``, (N, R, D) region features or (N, D) global
  features, opened memory-mapped. Some VSE++ releases repeat each image's row once per
  caption (5N rows); those are read as N images (each image's first caption's row) once
  the split's ids or rows confirm it (:func:`stages.data.dataset.open_split`).
* The project's HDF5: ``{split}.h5`` with dataset ``features`` (N, R, D) or (N, D), float32
  or float16, chunked one image per chunk; optional ``num_regions`` (N,) for padded
  adaptive region sets, ``boxes`` (N, R, 4), ``image_size`` (N, 2), ``image_ids`` (N,).
  The file is opened on first access in each process (DataLoader workers included).

Neither is ever loaded whole: COCO's train regions are 31 GiB.
"""

import hashlib
import logging
import os
from pathlib import Path

import h5py
import numpy as np

from stages.core.errors import UserError

log = logging.getLogger(__name__)

HDF5_FORMAT = "aoq-features"


class FeatureStore:
    """Random access to ``num_images`` feature arrays of shape ``item_shape``.

    ``store[i]`` is a float32 array (R, D) or (D,); ``store.num_regions(i)`` the number of
    valid (unpadded) regions of image i (R for fixed region sets, 1 for global features).
    Image i is stored row ``i * row_step`` of the file's ``num_rows``, or with
    ``image_rows`` (N,) int64 (SCAN's one row per caption, images owning different numbers
    of captions) row ``image_rows[i]``; ``row_step`` is then None.
    """

    def __init__(self, path: Path, num_rows: int, item_shape: tuple[int, ...],
                 row_step: int = 1, image_rows: np.ndarray | None = None):
        self.path = Path(path)
        self.item_shape = tuple(item_shape)
        if image_rows is not None:
            self._rows = np.asarray(image_rows, dtype=np.int64)
            self.row_step = None
            self.num_images = len(self._rows)
        else:
            self._rows = None
            self.row_step = row_step
            self.num_images = num_rows // row_step
        self._array = None
        self._counts = None
        self._pid = None

    @classmethod
    def one_row_per_caption(cls, store: "FeatureStore", first_caption: np.ndarray,
                            per_image: int | None) -> "FeatureStore":
        """``store``'s file read as SCAN's layout, each image's row repeated once per
        caption: image i is the row of its first caption ``first_caption[i]`` ((N,) int64);
        ``per_image``: the common number of captions (every ``per_image``-th row), or None."""
        if per_image is not None:
            return cls(store.path, store.num_images, store.item_shape, per_image)
        return cls(store.path, store.num_images, store.item_shape, image_rows=first_caption)

    def stored_rows(self, images: np.ndarray) -> np.ndarray:
        """The file's rows of images ``images`` (B,) int64 -> (B,) int64."""
        return images * self.row_step if self._rows is None else self._rows[images]

    def __len__(self) -> int:
        return self.num_images

    @property
    def feature_dim(self) -> int:
        return self.item_shape[-1]

    @property
    def has_regions(self) -> bool:
        return len(self.item_shape) == 2

    def head(self, num_images: int) -> "FeatureStore":
        """The first ``num_images`` images."""
        if self._rows is not None:
            return FeatureStore(self.path, 0, self.item_shape,
                                image_rows=self._rows[:num_images])
        return FeatureStore(self.path, num_images * self.row_step, self.item_shape,
                            self.row_step)

    def set_epoch(self, epoch: int) -> None:
        """Features are the same every epoch."""

    def fingerprint(self) -> dict:
        """:func:`features_fingerprint` of this store."""
        return features_fingerprint(self)

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
        return self.read_many([index])[0]

    def read_many(self, indices) -> np.ndarray:
        """Features of several images in one read: (B,) ints -> (B, R, D) | (B, D) float32.

        Reads each distinct image once, in increasing order (what HDF5 needs to read fast).
        """
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_images):
            raise IndexError(f"image index out of range for {self.num_images} images")
        self._open()
        unique, inverse = np.unique(indices, return_inverse=True)
        try:
            block = np.asarray(self._array[self.stored_rows(unique)], dtype=np.float32)
        except OSError as exc:  # a chunk past the end of a truncated HDF5 file
            raise UserError(f"{self.path}: reading images {unique[0]}..{unique[-1]} failed "
                            f"({str(exc).splitlines()[0][:160]}); the file is truncated or "
                            "corrupt: write the features again") from exc
        return block[inverse]

    def regions_many(self, indices) -> np.ndarray:
        """Valid region counts of several images: (B,) ints -> (B,) int64."""
        indices = np.asarray(indices, dtype=np.int64)
        if not self.has_regions:
            return np.ones(len(indices), dtype=np.int64)
        self._open()
        if self._counts is None:
            return np.full(len(indices), self.item_shape[0], dtype=np.int64)
        return self._counts[self.stored_rows(indices)].astype(np.int64)

    def num_regions(self, index: int) -> int:
        if not self.has_regions:
            return 1
        self._open()
        if self._counts is None:
            return self.item_shape[0]
        return int(self._counts[int(self.stored_rows(np.int64(index)))])

    def __getstate__(self):
        # DataLoader workers reopen the file themselves; never pickle an open handle.
        state = dict(self.__dict__)
        state.update(_array=None, _counts=None, _pid=None)
        return state


SAMPLE_ROWS = 16  # evenly spaced sample rows hashed by features_fingerprint, plus the ends


def features_fingerprint(store: FeatureStore) -> dict:
    """What identifies a split's feature file, cheaply and whatever its path or mtime.

    File kind (``npy`` | ``hdf5``), stored shape and dtype, file size, the HDF5 attributes
    the features stage wrote (none for ``.npy``), and the SHA-256 of the stored bytes of a
    deterministic sample of image rows: the first, the last and ``SAMPLE_ROWS`` evenly
    spaced ones (rows as stored: each image's first of a one-row-per-caption file; its
    ``row_step`` is None when images own different numbers of rows). Reads about 18
    rows, so it costs milliseconds on COCO's 31 GiB. A copy of the file has the same
    fingerprint; features recomputed with other values almost surely do not.
    """
    path = store.path
    digest = hashlib.sha256()
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r")
        kind, attrs = "npy", {}
        shape, dtype = array.shape, array.dtype
        rows = _sample_rows(store)
        for row in rows:
            digest.update(np.ascontiguousarray(array[row]).tobytes())
    else:
        with h5py.File(path, "r") as f:
            data = f["features"]
            kind = "hdf5"
            attrs = {k: _json_value(v) for k, v in sorted(f.attrs.items())}
            shape, dtype = data.shape, data.dtype
            rows = _sample_rows(store)
            block = np.ascontiguousarray(data[rows.tolist()])
            digest.update(block.tobytes())
            if "num_regions" in f:
                digest.update(np.ascontiguousarray(f["num_regions"][rows.tolist()]).tobytes())
    return {"file": path.name, "kind": kind, "shape": list(shape), "dtype": str(dtype),
            "bytes": path.stat().st_size, "attrs": attrs, "row_step": store.row_step,
            "sample_rows": len(rows), "sample_sha256": digest.hexdigest()}


def _sample_rows(store: FeatureStore) -> np.ndarray:
    """Sorted distinct stored row numbers: first, last and SAMPLE_ROWS evenly spaced."""
    n = store.num_images
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    images = np.unique(np.linspace(0, n - 1, SAMPLE_ROWS + 2).round().astype(np.int64))
    return store.stored_rows(images)


def _json_value(value):
    """An HDF5 attribute as a JSON-able value (arrays -> lists, bytes -> str)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        return [_json_value(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def _check_array(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Shape (N, D) or (N, R, D) with N > 0, and real numbers (what float32 can hold)."""
    if len(shape) not in (2, 3):
        raise UserError(f"{path}: features have shape {shape}; expected (N, D) global "
                        "features or (N, R, D) region features")
    if shape[0] == 0 or 0 in shape[1:]:
        raise UserError(f"{path}: features of shape {shape} hold no images (or no values); "
                        "write the features again")
    if not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise UserError(f"{path}: features of dtype {dtype} are not numbers a model can read "
                        "(expected float32 or float16); write the features again")


def _open_hdf5(h5_path: Path) -> tuple[int, ...]:
    """Check the project's HDF5 layout without reading the features; returns their shape."""
    try:
        with h5py.File(h5_path, "r") as f:
            fmt = f.attrs.get("format")
            if isinstance(fmt, bytes):
                fmt = fmt.decode(errors="replace")
            if fmt is not None and fmt != HDF5_FORMAT:
                raise UserError(f"{h5_path}: an HDF5 file with format={fmt!r}, not "
                                f"{HDF5_FORMAT!r} features; is it another kind of file (an "
                                "embeddings or candidate file) under the features' name?")
            data = f.get("features")
            if data is None:
                raise UserError(f"{h5_path}: no 'features' dataset; expected the project's "
                                "HDF5 layout (see docs/file-formats.md)")
            if not isinstance(data, h5py.Dataset):
                raise UserError(f"{h5_path}: 'features' is an HDF5 group, not an array; "
                                "expected the project's HDF5 layout (see "
                                "docs/file-formats.md)")
            shape = tuple(data.shape)
            _check_array(h5_path, shape, data.dtype)
            counts = f.get("num_regions")
            if counts is not None:
                _check_counts(h5_path, counts, shape)
    except OSError as exc:
        raise UserError(f"{h5_path}: cannot be read as HDF5 ({exc}); it may be truncated, "
                        "rerun the features stage") from exc
    return shape


def _check_counts(path: Path, counts, shape: tuple[int, ...]) -> None:
    """``num_regions``: (N,) integers in [1, R] for region features."""
    counts_shape = tuple(getattr(counts, "shape", ()))
    if len(shape) != 3 or counts_shape != shape[:1]:
        raise UserError(f"{path}: num_regions of shape {counts_shape} for features of shape "
                        f"{shape}; expected ({shape[0]},) with region features")
    values = np.asarray(counts)
    if (not np.issubdtype(values.dtype, np.integer) or values.min() < 1
            or values.max() > shape[1]):
        raise UserError(f"{path}: num_regions must be integers in [1, {shape[1]}] (found "
                        f"{values.min()}..{values.max()}, dtype {values.dtype}); write the "
                        "features again")


def refuse_object_npy(path: Path, fix: str) -> None:
    """Raise a :class:`UserError` saying what ``path`` is when its .npy header declares
    Python objects (np.save of a list of arrays, or of an object array), which np.load
    refuses to memory-map: the file is whole, so "it may be truncated" would mislead.
    Returns when the header is unreadable or declares anything else."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, _, dtype = header(f)
    except (OSError, ValueError, EOFError):
        return
    if dtype.hasobject:
        raise UserError(f"{path}: an array of Python objects (dtype {dtype}, shape {shape}), "
                        f"not numbers; {fix}")


def open_features(dataset_dir: Path, split: str) -> FeatureStore:
    """Open the features of ``split``: ``{split}.h5`` if present, else ``{split}_ims.npy``.

    The layout is checked up front (shape, dtype, the HDF5 attributes and datasets), so bad
    files are a :class:`UserError` naming them, not a failure in the middle of training.
    """
    h5_path = dataset_dir / f"{split}.h5"
    npy_path = dataset_dir / f"{split}_ims.npy"
    if h5_path.is_file():
        if npy_path.is_file():
            log.info("%s and %s both exist; reading the HDF5 file", h5_path, npy_path.name)
        shape = _open_hdf5(h5_path)
        return FeatureStore(h5_path, shape[0], shape[1:])
    if npy_path.is_file():
        try:
            array = np.load(npy_path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as exc:
            refuse_object_npy(npy_path, "save the features as float32 with np.save")
            raise UserError(f"{npy_path}: cannot be read as .npy ({exc}); the file may be "
                            "truncated, download or convert it again") from exc
        if not isinstance(array, np.ndarray):  # np.load gives an NpzFile for archives
            raise UserError(f"{npy_path}: an .npz archive, not one .npy array; save the "
                            "features with np.save")
        _check_array(npy_path, array.shape, array.dtype)
        return FeatureStore(npy_path, array.shape[0], array.shape[1:])
    raise UserError(f"no features for split {split!r} in {dataset_dir}: expected {h5_path.name} "
                    f"(features stage) or {npy_path.name} (SCAN/VSE++ precomp download); "
                    "check DATA_PATH and DATA")
