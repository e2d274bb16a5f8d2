"""Embeddings files (``embeddings_<split>.h5``), read without torch: the offcandi stage
loads them in a process that needs only numpy, h5py and FAISS.

Datasets ``images`` float32 (N, E) and ``captions`` float32 (5N, E), caption c belonging
to image c // 5; attributes ``format="aoq-embeddings"``, ``checkpoint`` (path), ``weights``
(hash of the model weights), ``dataset``, ``split``, ``num_images``,
``train_captions_sha256``.
"""

from pathlib import Path

import h5py
import numpy as np

from .errors import UserError
from .io.atomic import plain_attrs

EMBEDDINGS_FORMAT = "aoq-embeddings"


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
            self.attrs = plain_attrs(self._file.attrs)
            if self.attrs.get("format") != EMBEDDINGS_FORMAT:
                raise UserError(f"{self.path}: not an embeddings file of this project")
            self.images = np.asarray(self._file["images"], dtype=np.float32)
            self.captions = self._file["captions"]
        except OSError as exc:
            raise UserError(f"{self.path}: cannot be read as HDF5 ({exc}); rerun "
                            "`aoq embed`") from exc
        if self.captions.shape != (5 * self.images.shape[0], self.images.shape[1]):
            raise UserError(f"{self.path}: captions of shape {self.captions.shape} for "
                            f"images of shape {self.images.shape}; expected 5 per image")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Embeddings":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
