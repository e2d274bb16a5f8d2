"""Embeddings files (``embeddings_<split>.h5``), read without torch: the offcandi stage
loads them in a process that needs only numpy, h5py and FAISS.

Datasets ``images`` float32 (N, E) and ``captions`` float32 (5N, E), caption c belonging
to image c // 5; attributes ``format="aoq-embeddings"``, ``checkpoint`` (path), ``weights``
(hash of the model weights), ``dataset``, ``split``, ``num_images``,
``train_captions_sha256``, ``dataset_dir``; the miners add theirs (``miner``, ...).
"""

from pathlib import Path

import h5py
import numpy as np

from stages.core.errors import UserError
from stages.io.atomic import atomic_path, plain_attrs

EMBEDDINGS_FORMAT = "aoq-embeddings"
REQUIRED_ATTRS = ("checkpoint", "weights", "dataset", "split", "num_images")


def write_embeddings(out: str | Path, images: np.ndarray, captions: np.ndarray,
                     attrs: dict) -> None:
    """Write an embeddings file atomically: ``images`` (N, E) and ``captions`` (5N, E)
    float32, ``attrs`` (at least :data:`REQUIRED_ATTRS`; ``format`` is added)."""
    need = images.nbytes + captions.nbytes + (1 << 20)
    with (atomic_path(out, need_bytes=need, what="the embeddings") as tmp,
          h5py.File(tmp, "w") as f):
        f.create_dataset("images", data=images)
        f.create_dataset("captions", data=captions)
        f.attrs.update({"format": EMBEDDINGS_FORMAT, **attrs})


class Embeddings:
    """An embeddings file: ``images`` (N, E) float32 in memory, ``captions`` (5N, E) read
    lazily (an open HDF5 dataset, sliced block by block), ``attrs``. Use as a context
    manager, or call :meth:`close`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"embeddings {self.path} not found; make them with `aoq embed` "
                            "(or `make embed DATA=...`)")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise UserError(f"{self.path}: cannot be read as HDF5 ({exc}); rerun "
                            "`aoq embed`") from exc
        try:
            self._check()
        except BaseException:
            self._file.close()
            raise

    def _check(self) -> None:
        """Format, attributes, datasets and shapes; the images are loaded and must be finite."""
        remake = "rerun `aoq embed` (or `make embed`)"
        try:
            self.attrs = plain_attrs(self._file.attrs)
            if self.attrs.get("format") != EMBEDDINGS_FORMAT:
                raise UserError(f"{self.path}: not an embeddings file of this project (no "
                                f"format={EMBEDDINGS_FORMAT!r}); {remake}")
            missing = [k for k in REQUIRED_ATTRS if k not in self.attrs]
            if missing:
                raise UserError(f"{self.path}: lacks attribute {', '.join(missing)}; {remake}")
            for name in ("images", "captions"):
                if not isinstance(self._file.get(name), h5py.Dataset):
                    raise UserError(f"{self.path}: no {name!r} dataset; {remake}")
            images, self.captions = self._file["images"], self._file["captions"]
            if images.ndim != 2 or images.shape[0] == 0:
                raise UserError(f"{self.path}: images of shape {images.shape}; expected "
                                f"(N, E) with N > 0; {remake}")
            self.images = np.asarray(images, dtype=np.float32)
        except OSError as exc:
            raise UserError(f"{self.path}: cannot be read as HDF5 ({exc}); {remake}") from exc
        if self.captions.shape != (5 * self.images.shape[0], self.images.shape[1]):
            raise UserError(f"{self.path}: captions of shape {self.captions.shape} for "
                            f"images of shape {self.images.shape}; expected 5 per image")
        bad = ~np.isfinite(self.images).all(axis=1)
        if bad.any():
            raise UserError(f"{self.path}: {int(bad.sum())} image embeddings hold NaN or inf "
                            f"(first: image {int(np.flatnonzero(bad)[0])}); the model or its "
                            f"features are broken: check them, then {remake}")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Embeddings":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def made_with(path: str | Path, identity: dict) -> bool:
    """Whether ``path`` is an embeddings file whose attributes hold ``identity`` (what made
    it: the model, the captions, ...); a missing or unreadable file is not."""
    try:
        with Embeddings(path) as existing:
            return all(existing.attrs.get(k) == v for k, v in identity.items())
    except UserError:
        return False
