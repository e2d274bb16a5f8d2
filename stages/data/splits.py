"""Split id lists: ``{split}_ids.txt``, one integer image id per line, in caption order.

Image ids are what the feature sources call the images: COCO's ``cocoid``/``image_id``,
Flickr30K's file name stem (``1000092795.jpg`` -> 1000092795), which is also the BUTD TSV
``image_id``. A file lists each image once, or once per caption, each image's lines
consecutive (some SCAN/VSE++ releases list each id 5 times; ``aoq captions`` keeping all of
each image's captions lists their varying counts): the lengths of its runs of equal ids
are then the images' caption counts (:func:`read_id_runs`).
"""

import logging
from pathlib import Path

import numpy as np

from stages.core.errors import UserError
from stages.data.captions import CAPTIONS_PER_IMAGE, read_text_lines

log = logging.getLogger(__name__)


def ids_path(dataset_dir: str | Path, split: str) -> Path:
    return Path(dataset_dir) / f"{split}_ids.txt"


def listed_splits(dataset_dir: str | Path) -> list[str]:
    """Every split with a ``{split}_ids.txt`` in the folder."""
    names = sorted(p.name[:-len("_ids.txt")] for p in Path(dataset_dir).glob("*_ids.txt"))
    if not names:
        raise UserError(f"no *_ids.txt in {dataset_dir}: write the split files first with "
                        "`aoq captions`, or name the splits with --splits")
    return names


def _read_lines(path: Path) -> np.ndarray:
    """(L,) int64: the integers of a file of one per line (blank lines skipped)."""
    if not path.is_file():
        raise UserError(f"image id list {path} not found")
    ids = []
    for line_no, line in enumerate(read_text_lines(path), 1):
        if not line.strip():
            continue
        try:
            ids.append(int(line))
        except ValueError as exc:
            raise UserError(f"{path}:{line_no}: {line.strip()[:40]!r} is not an integer "
                            "image id") from exc
    if not ids:
        raise UserError(f"{path} lists no image ids (one integer per line expected); write "
                        "it again with `aoq captions`")
    return np.asarray(ids, dtype=np.int64)


def read_id_runs(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The images an id file lists: ((N,) int64 image ids, (N,) int64 run lengths or None).

    Consecutive equal lines are one image listed once per caption: when the file has any,
    the run lengths are the images' caption counts (the file lists one id per caption);
    None when every line is another image (one id per image: the file does not say how
    many captions each has). An id in two runs is a :class:`UserError`.
    """
    path = Path(path)
    lines = _read_lines(path)
    starts = np.flatnonzero(np.r_[True, lines[1:] != lines[:-1]])
    ids = lines[starts]
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        repeated = unique[counts > 1]
        raise UserError(f"{path}: {len(repeated)} image ids listed more than once (first: "
                        f"{', '.join(map(str, repeated[:5]))}); each image once, in caption "
                        "order, or once per caption on consecutive lines")
    if len(ids) == len(lines):
        return ids, None
    log.info("%s lists each id once per caption: %d images, %d captions", path, len(ids),
             len(lines))
    return ids, np.diff(np.r_[starts, len(lines)])


def read_ids_file(path: str | Path) -> np.ndarray:
    """(N,) int64 image ids from a file listing images, one integer per line; a file
    listing each id 5 consecutive times (once per caption) is read as one id per image;
    other repeats are errors (a list of images names each once)."""
    path = Path(path)
    ids, runs = read_id_runs(path)
    if runs is None:
        return ids
    if (runs != CAPTIONS_PER_IMAGE).any():
        repeated = ids[runs > 1]
        raise UserError(f"{path}: {len(repeated)} image ids listed more than once (first: "
                        f"{', '.join(map(str, repeated[:5]))}); this is a list of images: "
                        "name each once (or each 5 times, SCAN's per-caption lists); a "
                        "dataset's ids file listing each image once per caption goes beside "
                        "its captions as {split}_ids.txt, and `aoq captions "
                        "--captions-per-image 0` writes one")
    return ids


def read_split_ids(dataset_dir: str | Path, split: str) -> np.ndarray:
    """(N,) int64 image ids of ``split``, checked against ``{split}_caps.txt`` when present."""
    return read_split_runs(dataset_dir, split)[0]


def read_split_runs(dataset_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``split``'s image ids and caption counts (:func:`read_id_runs`), checked against
    ``{split}_caps.txt`` when present: as many captions as the counts add up to, or, for a
    file of one id per image, the same number for every image."""
    path = ids_path(dataset_dir, split)
    if not path.is_file():
        raise UserError(f"split id list {path} not found; write it (with the captions) by "
                        "`aoq captions --karpathy dataset_<data>.json` or `aoq captions "
                        "--coco-json ...`, or put the precomp download's ids file there")
    ids, runs = read_id_runs(path)
    _check_caption_count(Path(dataset_dir) / f"{split}_caps.txt", path, len(ids), runs)
    return ids, runs


def _check_caption_count(captions: Path, ids_file: Path, num_images: int,
                         runs: np.ndarray | None) -> None:
    if not captions.is_file():
        return
    with open(captions, "rb") as f:
        lines = sum(1 for line in f if line.strip())
    if runs is not None and lines != runs.sum():
        raise UserError(f"{captions} has {lines} captions but the ids file lists "
                        f"{num_images} images with {runs.sum()} captions ({ids_file}: one id "
                        "per caption); the two files are from different splits or releases: "
                        "write both again with `aoq captions`")
    if runs is None and (lines < num_images or lines % num_images):
        raise UserError(f"{captions} has {lines} captions but the ids file lists "
                        f"{num_images} images ({ids_file}: one id per image, so every image "
                        "needs the same number of consecutive captions; with other counts it "
                        "lists one id per caption); the two files are from different splits "
                        "or releases: write both again with `aoq captions`")
