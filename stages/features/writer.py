"""Writing one split's features in the project's HDF5 layout, resumably.

``{split}.h5`` holds ``features`` (N, R, D) or (N, D) (float32, or float16 on request),
chunked one image per chunk and uncompressed (random item reads stay at about 0.1 ms;
lzf/gzip made them 10-700x slower), and optionally ``num_regions`` (N,) for padded
adaptive region sets, ``boxes`` (N, R, 4), ``image_size`` (N, 2) (width, height) and
``image_ids`` (N,). Attributes: ``format`` ("aoq-features"), ``version``, ``kind``
(``regions``, ``global``, or ``grid`` for CNN conv maps), ``dtype``, ``source`` and the
options that made the file.

While it is written the file is called ``{split}.h5.partial``: a later ``make`` never
takes it as done. Every :meth:`SplitWriter.checkpoint` saves which images are written
and the caller's position in its input, so a killed conversion resumes from there; when
the partial file cannot be reopened (HDF5 files killed mid-write can be unreadable) or
was made from other inputs, the conversion restarts from the beginning. The free space the
file needs is checked before it is started or resumed, and a disk that fills up while
writing is a :class:`~stages.core.errors.NoSpaceError` (the partial file is kept: a rerun after
freeing space resumes).
"""

import logging
import os
from pathlib import Path

import h5py
import numpy as np

from stages.core.errors import NoSpaceError, UserError
from stages.data.features import HDF5_FORMAT
from stages.io.atomic import check_free_space, no_space_as_user_error, plain_attrs

log = logging.getLogger(__name__)

FEATURE_DTYPES = ("float32", "float16")
FEATURES_VERSION = 1


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


class SplitWriter:
    """Writes images at their positions in a split, in any order.

    ``item_shape`` is (R, D) for region features, (D,) for global ones. ``padded``: images
    may have fewer than R regions (``num_regions`` is stored); ``with_boxes``: ``boxes``
    and ``image_size`` are stored too.
    """

    def __init__(self, path: str | Path, image_ids: np.ndarray, item_shape: tuple[int, ...],
                 dtype: str = "float32", source: dict | None = None, padded: bool = False,
                 with_boxes: bool = False):
        if dtype not in FEATURE_DTYPES:
            raise UserError(f"feature dtype {dtype!r}: choose one of {', '.join(FEATURE_DTYPES)}")
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.image_ids = np.asarray(image_ids, dtype=np.int64)
        self.item_shape = tuple(item_shape)
        kind = "global" if len(self.item_shape) == 1 else "regions"
        self.identity = {"format": HDF5_FORMAT, "version": FEATURES_VERSION, "kind": kind,
                         "dtype": dtype, "item_shape": list(self.item_shape),
                         "padded": padded, "with_boxes": with_boxes, **(source or {})}
        self.resume_state: dict = {}
        n, per_image = len(self.image_ids), int(np.prod(self.item_shape))
        # The finished file's size, about: features, boxes, the per-image scalars.
        self.total_bytes = n * (per_image * np.dtype(dtype).itemsize
                                + (self.item_shape[0] * 16 if with_boxes else 0) + 32) + (1 << 20)
        self._file = self._reopen() or self._create(dtype, padded, with_boxes)
        self.written = np.asarray(self._file["written"], dtype=bool)
        # Dataset handles looked up once; per-image scalars kept in memory (a few bytes per
        # image, like ``written``) and stored at each checkpoint.
        self._features = self._file["features"]
        self._boxes = self._file["boxes"] if with_boxes else None
        self._num_regions = (np.asarray(self._file["num_regions"]) if padded else None)
        self._image_size = (np.asarray(self._file["image_size"]) if with_boxes else None)

    # --- opening ---------------------------------------------------------------------------
    def _reopen(self) -> h5py.File | None:
        """The partial file of an interrupted run with the same inputs, or None."""
        if not self.partial.exists():
            return None
        try:
            f = h5py.File(self.partial, "r+")
        except OSError as exc:
            log.warning("%s cannot be reopened (%s): starting it again", self.partial, exc)
            self.partial.unlink()
            return None
        attrs = plain_attrs(f.attrs)
        same = (all(_same(attrs.get(k), v) for k, v in self.identity.items())
                and all(name in f for name in self._datasets())
                and np.array_equal(f["image_ids"][:], self.image_ids))
        if not same:  # or killed while finishing it (its bookkeeping already removed)
            log.warning("%s was started from other inputs or options, or is incomplete: "
                        "starting it again", self.partial)
            f.close()
            self.partial.unlink()
            return None
        remaining = self.total_bytes - self.partial.stat().st_size
        try:
            check_free_space(self.partial, remaining, f"the rest of {self.path.name}")
        except NoSpaceError:
            f.close()
            raise
        self.resume_state = {k[len("resume_"):]: v for k, v in attrs.items()
                             if k.startswith("resume_")}
        log.info("%s: resuming, %d of %d images already written", self.partial,
                 int(f["written"][:].sum()), len(self.image_ids))
        return f

    def _datasets(self) -> list[str]:
        """The datasets a partial file of this writer holds."""
        return ["features", "image_ids", "written",
                *(["num_regions"] if self.identity["padded"] else []),
                *(["boxes", "image_size"] if self.identity["with_boxes"] else [])]

    def _create(self, dtype: str, padded: bool, with_boxes: bool) -> h5py.File:
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        check_free_space(self.partial, self.total_bytes, f"the features of {self.path.name}")
        n = len(self.image_ids)
        f = h5py.File(self.partial, "w")
        f.create_dataset("features", (n, *self.item_shape), dtype=dtype,
                         chunks=(1, *self.item_shape))
        f.create_dataset("image_ids", data=self.image_ids)
        f.create_dataset("written", (n,), dtype=bool)
        if padded:
            f.create_dataset("num_regions", (n,), dtype=np.int32)
        if with_boxes:
            f.create_dataset("boxes", (n, self.item_shape[0], 4), dtype=np.float32,
                             chunks=(min(n, 64), self.item_shape[0], 4))
            f.create_dataset("image_size", (n, 2), dtype=np.int32)
        f.attrs.update(self.identity)
        return f

    # --- writing ---------------------------------------------------------------------------
    def write(self, position: int, features: np.ndarray, boxes: np.ndarray | None = None,
              image_size: tuple[int, int] | None = None) -> None:
        """Store image ``position``'s features (r, D) with r <= R (padded with zeros) or (D,)."""
        with self._no_space():
            self._write(position, features, boxes, image_size)

    def _write(self, position, features, boxes, image_size) -> None:
        if self._num_regions is not None:
            r = features.shape[0]
            padded = np.zeros(self.item_shape, dtype=np.float32)
            padded[:r] = features
            self._num_regions[position] = r
            features = padded
        self._features[position] = features
        if boxes is not None:
            padded_boxes = np.zeros((self.item_shape[0], 4), dtype=np.float32)
            padded_boxes[:len(boxes)] = boxes
            self._boxes[position] = padded_boxes
            self._image_size[position] = image_size
        self.written[position] = True

    def read(self, position: int) -> np.ndarray:
        """The stored features of image ``position`` (padded, as written)."""
        return np.asarray(self._file["features"][position])

    def checkpoint(self, **state) -> None:
        """Persist which images are written and the caller's input position ``state``."""
        with self._no_space():
            self._store_scalars()
            self._file.attrs.update({f"resume_{k}": v for k, v in state.items()})
            self._file.flush()

    def _no_space(self):
        """Disk full while writing: a NoSpaceError; the partial file stays for a rerun."""
        remaining = self.total_bytes * float((~self.written).mean() if len(self.written) else 0)
        return no_space_as_user_error(self.partial, int(remaining) + (1 << 20),
                                      f"the features of {self.path.name}")

    def _store_scalars(self) -> None:
        self._file["written"][:] = self.written
        if self._num_regions is not None:
            self._file["num_regions"][:] = self._num_regions
        if self._image_size is not None:
            self._file["image_size"][:] = self._image_size

    def missing_ids(self) -> np.ndarray:
        return self.image_ids[~self.written]

    def finish(self, **attrs) -> Path:
        """Check every image is written, drop the bookkeeping, rename into place."""
        missing = self.missing_ids()
        if len(missing):
            raise UserError(f"{self.path}: {len(missing)} images never written "
                            f"(first: {', '.join(map(str, missing[:5]))})")
        f = self._file
        with self._no_space():
            self._store_scalars()
            del f["written"]
            for key in [k for k in f.attrs if k.startswith("resume_")]:
                del f.attrs[key]
            f.attrs.update(attrs)
            f.close()
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close without finishing: the partial file stays for a later resume (an error
        closing it, after a failed write, is logged: the next run checks the file)."""
        if self._file.id.valid:
            try:
                self._file.close()
            except (OSError, RuntimeError) as exc:
                log.warning("%s: closing after an error failed (%s); the next run checks it",
                            self.partial, exc)

    def discard(self) -> None:
        self.close()
        self.partial.unlink(missing_ok=True)


def _same(stored, wanted) -> bool:
    if isinstance(wanted, (list, tuple)):
        return stored is not None and list(np.asarray(stored).tolist()) == list(wanted)
    return stored == wanted
