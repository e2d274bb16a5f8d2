"""Offline candidate files: for every training image its K hardest captions of *other*
images (i2t), for every caption its K hardest *other* images (t2i), hardest first.

``offcandi/<DATA>/{i2t,t2i}.h5``: datasets ``indices`` int32 (Q, K) (caption ids for
i2t, Q = N; image ids for t2i, Q = C), ``scores`` float32 (Q, K) and ``positive_scores``
float32 (Q,) (both absent for imported files); attributes ``format="aoq-offcandi"``,
``version``, ``direction``, ``dataset``, ``split``, ``num_images``, ``num_captions``,
``weights`` (hash of the model that mined them), ``checkpoint``, ``index``, ``k``, and for
approximate indexes ``recall_at_k`` against exact search. The split's caption layout (which
image owns each of its C captions, :mod:`stages.core.layout`) is stored as there: the
attribute ``captions_per_image`` or the dataset ``caption_counts``; files without one (and
without ``num_captions``) hold 5 captions per image.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from stages.core.errors import UserError
from stages.core.layout import LEGACY_CAPTIONS_PER_IMAGE, CaptionLayout
from stages.io.atomic import atomic_path, plain_attrs

log = logging.getLogger(__name__)

CANDIDATES_FORMAT = "aoq-offcandi"
CANDIDATES_VERSION = 2  # 2: positive_scores added
DIRECTIONS = ("i2t", "t2i")


@dataclass
class Candidates:
    """A loaded candidate file: ``indices`` (Q, K) int32, its attributes, the caption
    layout of the split it indexes and, when asked for, ``scores`` (Q, K) and
    ``positive_scores`` (Q,) float32."""

    path: Path
    indices: np.ndarray
    attrs: dict
    layout: CaptionLayout
    scores: np.ndarray | None = None
    positive_scores: np.ndarray | None = None

    @property
    def k(self) -> int:
        return self.indices.shape[1]


def candidate_path(folder: str | Path, direction: str) -> Path:
    return Path(folder) / f"{direction}.h5"


def is_positive(direction: str, queries: np.ndarray, candidates: np.ndarray,
                layout: CaptionLayout) -> np.ndarray:
    """(b, k) bool: candidate ``candidates[r, j]`` is a positive of query ``queries[r]``
    (i2t: a caption of the image; t2i: the caption's own image), captions owned as
    ``layout`` says. Candidate ids must be valid ids of their side."""
    queries = np.asarray(queries)[:, None]
    if direction == "i2t":
        return layout.owner[candidates] == queries
    return candidates == layout.owner[queries]


def positives_present(direction: str, indices: np.ndarray, layout: CaptionLayout
                      ) -> np.ndarray:
    """(Q, K) bool: True where a candidate is a positive of its query (must never be)."""
    return is_positive(direction, np.arange(indices.shape[0]), indices, layout)


def padded_captions(layout: CaptionLayout, images: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The captions of ``images`` (b,) as a grid: ``ids`` (b, m) int64, m the most captions
    any of them owns, each row the image's captions in order, then its last caption
    repeated; ``real`` (b, m) bool, False on the repeats. (A maximum over a row needs no
    mask: a repeat scores as its original.) For 5 per image row i is 5i, ..., 5i + 4."""
    images = np.asarray(images, dtype=np.int64)
    counts = layout.counts[images]
    width = int(counts.max(initial=1))
    offsets = np.arange(width)
    ids = layout.starts[images][:, None] + np.minimum(offsets, counts[:, None] - 1)
    return ids, offsets < counts[:, None]


def queries_and_items(direction: str, layout: CaptionLayout) -> tuple[int, int]:
    """How many queries (rows) a ``direction`` candidate file of ``layout`` has, and how
    many items its indices range over: i2t (N, C), t2i (C, N)."""
    n, c = layout.num_images, layout.num_captions
    return (n, c) if direction == "i2t" else (c, n)


def file_layout(f: h5py.File, attrs: dict, path: Path) -> CaptionLayout:
    """The caption layout a candidate file stores (5 per image for files before layouts
    were stored); pops its attribute from ``attrs``."""
    num_images = int(attrs["num_images"])
    num_captions = int(attrs.get("num_captions", LEGACY_CAPTIONS_PER_IMAGE * num_images))
    attrs.pop("captions_per_image", None)  # the layout's, not the file's
    return CaptionLayout.read_h5(f, num_images, num_captions, path)


def write_candidates(path: str | Path, indices: np.ndarray, scores: np.ndarray | None,
                     attrs: dict, layout: CaptionLayout) -> None:
    """Write a candidate file of a split of caption ``layout`` atomically (temporary name,
    then rename)."""
    need = indices.shape[0] * indices.shape[1] * (4 if scores is None else 8) + (1 << 20)
    with (atomic_path(path, need_bytes=need, what="candidates") as tmp,
          h5py.File(tmp, "w") as f):
        f.create_dataset("indices", data=indices.astype(np.int32))
        if scores is not None:
            f.create_dataset("scores", data=scores.astype(np.float32))
        f.attrs.update({"format": CANDIDATES_FORMAT, "version": CANDIDATES_VERSION,
                        **attrs, "num_captions": layout.num_captions})
        layout.write_h5(f)


def load_candidates(folder: str | Path, direction: str, dataset: str, split: str,
                    num_images: int, min_k: int, weights: str = "",
                    with_scores: bool = False, layout: CaptionLayout | None = None
                    ) -> Candidates:
    """Load and check one candidate file against the run that will use it.

    Refuses (naming the file and the fix) a file from another dataset, split, image count,
    caption layout (``layout``, the run's split's, when given) or model (``weights``, when
    given), with fewer than ``min_k`` candidates, with indices out of range, or listing a
    query's own positives. ``with_scores`` also loads the candidate and positive scores (an
    error for files that have none).
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
            stored = file_layout(f, attrs, path) if "num_images" in attrs else None
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
    if layout is not None and stored != layout:
        raise UserError(f"{path} was mined on other data: its captions are laid out as "
                        f"{stored!r}, the {split} split this run uses as {layout!r}; "
                        f"re-mine: {remake}")
    queries, limit = queries_and_items(direction, stored)
    if indices.ndim != 2 or indices.shape[0] != queries:
        raise UserError(f"{path}: indices of shape {indices.shape}, expected ({queries}, K)")
    if indices.shape[1] < min_k or indices.shape[1] == 0:
        raise UserError(f"{path} holds K={indices.shape[1]} candidates per query but the run "
                        f"samples from the top {min_k}; lower offcandi.hardest or mine "
                        f"again with a larger K (SET=offcandi.k_{direction}={min_k})")
    if indices.min() < 0 or indices.max() >= limit:
        raise UserError(f"{path}: indices out of range [0, {limit}); {remake}")
    if positives_present(direction, indices, stored).any():
        raise UserError(f"{path}: lists queries' own positives as negatives (built for "
                        f"another caption order?); {remake}")
    return Candidates(path, indices, attrs, stored, scores, positive)
