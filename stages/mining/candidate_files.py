"""Offline candidate files: for every training image its K hardest captions of *other*
images (i2t), for every caption its K hardest *other* images (t2i), hardest first.

``offcandi/<DATA>/{i2t,t2i}.h5``: datasets ``indices`` int32 (Q, K) (caption ids for
i2t, Q = N; image ids for t2i, Q = 5N), ``scores`` float32 (Q, K) and ``positive_scores``
float32 (Q,) (both absent for imported files); attributes ``format="aoq-offcandi"``,
``version``, ``direction``, ``dataset``, ``split``, ``num_images``, ``weights`` (hash of
the model that mined them), ``checkpoint``, ``index``, ``k``, and for approximate indexes
``recall_at_k`` against exact search.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from stages.core.errors import UserError
from stages.io.atomic import atomic_path, plain_attrs

log = logging.getLogger(__name__)

CANDIDATES_FORMAT = "aoq-offcandi"
CANDIDATES_VERSION = 2  # 2: positive_scores added
CAPTIONS_PER_IMAGE = 5
DIRECTIONS = ("i2t", "t2i")


@dataclass
class Candidates:
    """A loaded candidate file: ``indices`` (Q, K) int32, its attributes and, when asked
    for, ``scores`` (Q, K) and ``positive_scores`` (Q,) float32."""

    path: Path
    indices: np.ndarray
    attrs: dict
    scores: np.ndarray | None = None
    positive_scores: np.ndarray | None = None

    @property
    def k(self) -> int:
        return self.indices.shape[1]


def candidate_path(folder: str | Path, direction: str) -> Path:
    return Path(folder) / f"{direction}.h5"


def is_positive(direction: str, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(b, k) bool: candidate ``candidates[r, j]`` is a positive of query ``queries[r]``
    (i2t: a caption of the image; t2i: the caption's own image)."""
    queries = np.asarray(queries)[:, None]
    if direction == "i2t":
        return candidates // CAPTIONS_PER_IMAGE == queries
    return candidates == queries // CAPTIONS_PER_IMAGE


def positives_present(direction: str, indices: np.ndarray) -> np.ndarray:
    """(Q, K) bool: True where a candidate is a positive of its query (must never be)."""
    return is_positive(direction, np.arange(indices.shape[0]), indices)


def write_candidates(path: str | Path, indices: np.ndarray, scores: np.ndarray | None,
                     attrs: dict) -> None:
    """Write a candidate file atomically (temporary name, then rename)."""
    need = indices.shape[0] * indices.shape[1] * (4 if scores is None else 8) + (1 << 20)
    with (atomic_path(path, need_bytes=need, what="candidates") as tmp,
          h5py.File(tmp, "w") as f):
        f.create_dataset("indices", data=indices.astype(np.int32))
        if scores is not None:
            f.create_dataset("scores", data=scores.astype(np.float32))
        f.attrs.update({"format": CANDIDATES_FORMAT, "version": CANDIDATES_VERSION,
                        **attrs})


def load_candidates(folder: str | Path, direction: str, dataset: str, split: str,
                    num_images: int, min_k: int, weights: str = "",
                    with_scores: bool = False) -> Candidates:
    """Load and check one candidate file against the run that will use it.

    Refuses (naming the file and the fix) a file from another dataset, split, image count
    or model (``weights``, when given), with fewer than ``min_k`` candidates, with indices
    out of range, or listing a query's own positives. ``with_scores`` also loads the
    candidate and positive scores (an error for files that have none).
    """
    path = candidate_path(folder, direction)
    remake = f"rebuild it with `make offcandi DATA={dataset}` (or `aoq offcandi`)"
    if not path.is_file():
        raise UserError(f"candidate file {path} not found; {remake}")
    try:
        with h5py.File(path, "r") as f:
            attrs = plain_attrs(f.attrs)
            if attrs.get("format") != CANDIDATES_FORMAT:
                raise UserError(f"{path}: not a candidate file of this project; {remake}")
            if not isinstance(f.get("indices"), h5py.Dataset):
                raise UserError(f"{path}: no 'indices' dataset; {remake}")
            indices = np.asarray(f["indices"])
            if not np.issubdtype(indices.dtype, np.integer):
                raise UserError(f"{path}: indices of dtype {indices.dtype}, not integer; "
                                f"{remake}")
            scores = positive = None
            if with_scores:
                if "scores" not in f or "positive_scores" not in f:
                    raise UserError(f"{path} has no candidate or positive scores (imported, "
                                    "or mined before version 2), which the false-negative "
                                    "filters need; mine again with `make offcandi` or turn "
                                    "offcandi.false_negative_ratio / false_negative_margin "
                                    "off")
                scores = np.asarray(f["scores"], dtype=np.float32)
                positive = np.asarray(f["positive_scores"], dtype=np.float32)
    except OSError as exc:
        raise UserError(f"{path}: cannot be read as HDF5 ({exc}); {remake}") from exc
    for key, want in (("direction", direction), ("dataset", dataset), ("split", split),
                      ("num_images", num_images)):
        if attrs.get(key) != want:
            raise UserError(f"{path} was built for {key}={attrs.get(key)!r}, but this run "
                            f"uses {key}={want!r}; {remake}")
    if weights and attrs.get("weights") != weights:
        raise UserError(f"{path} was mined with model weights {attrs.get('weights')} "
                        f"({attrs.get('checkpoint')}), not with the expected miner "
                        f"(weights {weights}); {remake}")
    queries = num_images * (CAPTIONS_PER_IMAGE if direction == "t2i" else 1)
    if indices.ndim != 2 or indices.shape[0] != queries:
        raise UserError(f"{path}: indices of shape {indices.shape}, expected ({queries}, K)")
    if indices.shape[1] < min_k or indices.shape[1] == 0:
        raise UserError(f"{path} holds K={indices.shape[1]} candidates per query but the run "
                        f"samples from the top {min_k}; lower offcandi.hardest or mine "
                        f"again with a larger K")
    limit = num_images * (CAPTIONS_PER_IMAGE if direction == "i2t" else 1)
    if indices.min() < 0 or indices.max() >= limit:
        raise UserError(f"{path}: indices out of range [0, {limit}); {remake}")
    if positives_present(direction, indices).any():
        raise UserError(f"{path}: lists queries' own positives as negatives (built for "
                        f"another caption order?); {remake}")
    return Candidates(path, indices, attrs, scores, positive)
