"""Split id lists: ``{split}_ids.txt``, one integer image id per line, in caption order.

Image ids are what the feature sources call the images: COCO's ``cocoid``/``image_id``,
Flickr30K's file name stem (``1000092795.jpg`` -> 1000092795), which is also the BUTD TSV
``image_id``. Some SCAN/VSE++ releases list each id once per caption (5 consecutive
lines); those are read as one id per image.
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


def read_ids_file(path: str | Path) -> np.ndarray:
    """(N,) int64 image ids from a file of one integer per line; a file listing each id 5
    consecutive times (once per caption) is read as one id per image; repeats are errors."""
    path = Path(path)
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
    ids = np.asarray(ids, dtype=np.int64)
    per_caption = (len(ids) % CAPTIONS_PER_IMAGE == 0 and len(ids) > 0
                   and (ids.reshape(-1, CAPTIONS_PER_IMAGE) == ids[::CAPTIONS_PER_IMAGE, None]
                        ).all())
    if per_caption and len(np.unique(ids)) < len(ids):
        log.info("%s lists each id once per caption: reading one id per image", path)
        ids = ids[::CAPTIONS_PER_IMAGE]
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        repeated = unique[counts > 1]
        raise UserError(f"{path}: {len(repeated)} image ids listed more than once (first: "
                        f"{', '.join(map(str, repeated[:5]))}); each image once, in caption "
                        "order")
    return ids


def read_split_ids(dataset_dir: str | Path, split: str) -> np.ndarray:
    """(N,) int64 image ids of ``split``, checked against ``{split}_caps.txt`` when present."""
    path = ids_path(dataset_dir, split)
    if not path.is_file():
        raise UserError(f"split id list {path} not found; write it (with the captions) by "
                        "`aoq captions --karpathy dataset_<data>.json` or `aoq captions "
                        "--coco-json ...`, or put the precomp download's ids file there")
    ids = read_ids_file(path)
    _check_caption_count(Path(dataset_dir) / f"{split}_caps.txt", len(ids))
    return ids


def _check_caption_count(captions: Path, num_images: int) -> None:
    if not captions.is_file():
        return
    with open(captions, "rb") as f:
        lines = sum(1 for line in f if line.strip())
    if lines != CAPTIONS_PER_IMAGE * num_images:
        raise UserError(f"{captions} has {lines} captions but the ids file lists {num_images} "
                        f"images ({CAPTIONS_PER_IMAGE} x {num_images} = "
                        f"{CAPTIONS_PER_IMAGE * num_images} expected); the two files are from "
                        "different splits or releases")
