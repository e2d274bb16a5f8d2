"""``aoq import``: AOQ's published candidate arrays (``i2t_<data>.npy`` (N, K) and
``t2i_<data>.npy`` (5N, K'), int32; for a split of another caption layout, (N, K) and
(C, K')) as this project's candidate files, after checks that they belong to the dataset's
training split and its caption layout."""

import hashlib
import logging
from pathlib import Path

import numpy as np

from stages.core.errors import UserError
from stages.data.dataset import open_split
from stages.data.features import refuse_object_npy
from stages.data.vocab import file_sha256
from stages.io.lock import folder_lock
from stages.mining.candidate_files import (
    candidate_path,
    positives_present,
    queries_and_items,
    write_candidates,
)
from stages.pipeline.stamps import clear_record

log = logging.getLogger(__name__)


def import_published(i2t_file: str | Path, t2i_file: str | Path, config, out_dir: str | Path
                     ) -> list[Path]:
    """Convert AOQ's published ``i2t_<data>.npy`` (N, K) / ``t2i_<data>.npy`` (C, K') int32
    files (C = 5N for AOQ's) into candidate files for ``config``'s dataset, after checking
    shapes, ranges and that no query lists its own positive (which would mean another
    caption order)."""
    split = open_split(config.dataset_dir(), config.data.train_split)
    for path in (Path(i2t_file), Path(t2i_file)):
        if not path.is_file():
            raise UserError(f"{path} not found")
    # One tag for the pair, so a run can tell both files come from the same release.
    tag = "imported:" + hashlib.sha256(
        (file_sha256(i2t_file) + file_sha256(t2i_file)).encode()).hexdigest()[:16]
    with folder_lock(out_dir, "aoq offcandi-import"):
        # Not mined: no mining settings stand for these files (make mines its folder again).
        clear_record(candidate_path(out_dir, "t2i"))
        return [_import_direction(direction, path, split, config.data.name, tag, out_dir)
                for direction, path in (("i2t", Path(i2t_file)), ("t2i", Path(t2i_file)))]


def _import_direction(direction: str, path: Path, split, dataset: str, tag: str,
                      out_dir: str | Path) -> Path:
    """Check one published candidate array against ``split`` and write its candidate file."""
    n = split.num_images
    queries, limit = queries_and_items(direction, split.layout)
    indices = _load_published(path, direction)
    if indices.ndim != 2 or indices.shape[0] != queries:
        raise UserError(f"{path}: shape {indices.shape}, but {dataset} {split.name} needs "
                        f"({queries}, K) for {direction}: is it the file of another dataset?")
    if indices.shape[1] == 0:
        raise UserError(f"{path}: no candidates per query (shape {indices.shape})")
    indices = np.asarray(indices, dtype=np.int64)
    if indices.min() < 0 or indices.max() >= limit:
        raise UserError(f"{path}: indices outside [0, {limit}) for {dataset}")
    if positives_present(direction, indices, split.layout).any():
        raise UserError(f"{path}: some queries list their own positives; it does not "
                        f"follow the caption order of {split.name}_caps.txt")
    out = candidate_path(out_dir, direction)
    write_candidates(out, indices, None, {
        "direction": direction, "dataset": dataset, "split": split.name,
        "num_images": n, "weights": tag,
        "checkpoint": str(path), "index": "imported", "k": indices.shape[1]}, split.layout)
    log.info("imported %s %s -> %s", path, indices.shape, out)
    return out


def _load_published(path: Path, direction: str) -> np.ndarray:
    """A published candidate array, memory-mapped: integers of any width, never floats."""
    try:
        indices = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        refuse_object_npy(path, f"is it AOQ's {direction}_<data>.npy?")
        raise UserError(f"{path}: cannot be read as a .npy array ({exc}); it may be "
                        f"truncated: download AOQ's {direction}_<data>.npy again") from exc
    if not isinstance(indices, np.ndarray) or not np.issubdtype(indices.dtype, np.integer):
        raise UserError(f"{path}: holds {getattr(indices, 'dtype', type(indices).__name__)}, "
                        f"not integer candidate indices; is it AOQ's {direction}_<data>.npy?")
    return indices
