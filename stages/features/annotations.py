"""Captions and splits from the usual sources, written as the dataset folder's text files.

For each split: ``{split}_caps.txt`` (each image's captions on consecutive lines, raw
sentences), ``{split}_ids.txt`` (one image id per image, or per caption when images keep
different numbers of captions: see :mod:`stages.data.splits`) and ``{split}_images.txt``
(each image's path relative to the image root, for CNN features).

Sources:

* Karpathy's split files (``dataset_coco.json``, ``dataset_flickr30k.json``,
  ``dataset_flickr8k.json``): splits train / val -> ``dev`` / test, and COCO's restval
  folded into train (as SCAN's COCO train, 113,287 images) unless asked to keep it apart.
* COCO caption JSON (``captions_train2014.json`` ...) through pycocotools, with split id
  lists, or one split per JSON file (train / val -> dev / test by its name).

How many captions each image keeps is ``captions_per_image`` (``aoq captions
--captions-per-image``): k keeps the first k non-empty ones, an image with fewer being an
error naming it (5 by default, the benchmarks' protocol: some of COCO's images have 6 or 7,
and the log says how many were cut); 0 keeps all of them (at least one per image).
"""

import contextlib
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import UserError
from stages.data.captions import CAPTIONS_PER_IMAGE
from stages.data.splits import read_ids_file
from stages.io.atomic import write_text
from stages.io.lock import folder_lock

log = logging.getLogger(__name__)

KARPATHY_SPLITS = {"train": "train", "val": "dev", "test": "test", "restval": "restval"}


@dataclass
class ImageRecord:
    """One image of a split: its id, its path under the image root, its captions."""

    image_id: int
    file: str
    captions: list[str]


def clean_caption(text: str) -> str:
    """One line of text: inner newlines and tabs become spaces, ends stripped."""
    return re.sub(r"\s+", " ", text).strip()


def kept_captions(captions: list[str], image: str, source: Path,
                  per_image: int = CAPTIONS_PER_IMAGE) -> tuple[list[str], bool]:
    """The first ``per_image`` non-empty captions (0: all of them), and whether any were
    dropped; fewer (none, for 0) is a :class:`UserError` naming the image."""
    if not all(isinstance(t, str) for t in captions):
        raise UserError(f"{source}: a caption of image {image} is not text")
    kept = [c for c in (clean_caption(t) for t in captions) if c]
    if len(kept) < max(per_image, 1):
        raise UserError(f"{source}: image {image} has {len(kept)} non-empty captions; every "
                        f"image needs at least {max(per_image, 1)} (--captions-per-image "
                        f"{per_image}{'' if per_image else ': all of them'})")
    if not per_image:
        return kept, False
    return kept[:per_image], len(kept) > per_image


def _check_per_image(per_image: int) -> None:
    if per_image < 0:
        raise UserError(f"--captions-per-image {per_image}: give the number of captions each "
                        "image keeps (5: the benchmarks' protocol), or 0 to keep all")


def read_json(path: Path, what: str):
    """The content of a UTF-8 JSON file; anything else is a UserError naming ``what``."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not {what} (not UTF-8 JSON: {exc})") from exc


def karpathy_splits(path: str | Path, restval_into_train: bool = True,
                    captions_per_image: int = CAPTIONS_PER_IMAGE
                    ) -> dict[str, list[ImageRecord]]:
    """Read a Karpathy split file: {split: [ImageRecord]} in the file's order, each image
    keeping ``captions_per_image`` captions (see the module docstring)."""
    _check_per_image(captions_per_image)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Karpathy split file {path} not found (dataset_coco.json, "
                        "dataset_flickr30k.json or dataset_flickr8k.json)")
    content = read_json(path, "a Karpathy split file")
    images = content.get("images") if isinstance(content, dict) else None
    if not isinstance(images, list) or not all(isinstance(e, dict) for e in images):
        raise UserError(f"{path}: not a Karpathy split file (expected JSON with an 'images' "
                        "list of objects)")
    splits: dict[str, list[ImageRecord]] = {}
    trimmed = 0
    for entry in images:
        try:
            name = KARPATHY_SPLITS[entry["split"]]
            filename = str(entry["filename"])
            raw = [s["raw"] for s in entry["sentences"]]
        except (KeyError, TypeError) as exc:
            raise UserError(f"{path}: image entry {entry.get('imgid', '?')} lacks {exc} or "
                            f"has an unknown split; expected splits "
                            f"{', '.join(KARPATHY_SPLITS)}") from exc
        if name == "restval" and restval_into_train:
            name = "train"
        captions, dropped = kept_captions(raw, filename, path, captions_per_image)
        trimmed += dropped
        file = f"{entry['filepath']}/{filename}" if entry.get("filepath") else filename
        splits.setdefault(name, []).append(ImageRecord(_image_id(entry, path), file, captions))
    if trimmed:
        log.info("%s: %d images have more than %d captions; their first %d are kept", path,
                 trimmed, captions_per_image, captions_per_image)
    return splits


def _image_id(entry: dict, path: Path) -> int:
    """COCO's ``cocoid``; else the numeric file name stem (Flickr30K's ids, which its BUTD
    TSVs use); else (Flickr8K's ``2513260012_03d33305cf.jpg``) Karpathy's ``imgid``."""
    stem = Path(entry["filename"]).stem
    if "cocoid" in entry:
        key = "cocoid"
    elif stem.isdigit():
        return int(stem)
    elif "imgid" in entry:
        key = "imgid"
    else:
        raise UserError(f"{path}: cannot tell the image id of {entry['filename']!r} (no "
                        "cocoid or imgid, and the file name is not a number)")
    try:
        return int(entry[key])
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: image {entry['filename']!r} has {key}={entry[key]!r}, not "
                        "an integer image id") from exc


def coco_splits(json_files: list[str | Path], split_ids: dict[str, str | Path] | None = None,
                captions_per_image: int = CAPTIONS_PER_IMAGE) -> dict[str, list[ImageRecord]]:
    """Read COCO caption JSON files through pycocotools, each image keeping
    ``captions_per_image`` captions (see the module docstring).

    ``split_ids`` maps a split name to a file of COCO image ids (one per line), looked up
    across all the JSON files; without it each file is one split named from the file
    (``captions_train2017.json`` -> train, ``*val*`` -> dev, ``*test*`` -> test). An image's
    path is ``<folder>/<file_name>``, the folder being the file's suffix (``train2017``).
    """
    from pycocotools.coco import COCO

    _check_per_image(captions_per_image)
    images: dict[int, tuple[str, list[str], Path]] = {}  # id -> (file, captions, source)
    default_splits: dict[str, list[int]] = {}
    for json_file in map(Path, json_files):
        if not json_file.is_file():
            raise UserError(f"COCO caption file {json_file} not found")
        content = read_json(json_file, "a COCO annotation file")
        if not (isinstance(content, dict) and isinstance(content.get("images"), list)
                and isinstance(content.get("annotations", []), list)):
            raise UserError(f"{json_file}: not a COCO annotation file (expected JSON with "
                            "'images' and 'annotations' lists)")
        coco = COCO()
        coco.dataset = content
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints timings
            try:
                coco.createIndex()
            except (KeyError, TypeError) as exc:
                raise UserError(f"{json_file}: not a COCO annotation file: {exc!r}") from exc
        folder = json_file.stem.split("_")[-1]
        ids = sorted(coco.getImgIds())
        for image_id in ids:
            info = coco.imgs[image_id]
            if "file_name" not in info:
                raise UserError(f"{json_file}: image {image_id} has no file_name; not a COCO "
                                "annotation file?")
            captions = [a["caption"] for a in coco.imgToAnns.get(image_id, [])
                        if "caption" in a]
            images[image_id] = (f"{folder}/{info['file_name']}", captions, json_file)
        if not split_ids:
            name = _split_name(json_file)
            if name in default_splits:
                raise UserError(f"two caption files map to split {name!r}; name the splits "
                                "with --split NAME=IDS_FILE")
            default_splits[name] = [i for i in ids if coco.imgToAnns.get(i)]
    wanted = ({name: read_ids_file(p).tolist() for name, p in split_ids.items()} if split_ids
              else default_splits)
    splits: dict[str, list[ImageRecord]] = {}
    for name, ids in wanted.items():
        missing = [i for i in ids if i not in images]
        if missing:
            raise UserError(f"split {name}: {len(missing)} image ids are in none of the "
                            f"caption files (first: {', '.join(map(str, missing[:5]))})")
        records, trimmed = [], 0
        for image_id in ids:
            file, captions, source = images[image_id]
            kept, dropped = kept_captions(captions, str(image_id), source,
                                          captions_per_image)
            trimmed += dropped
            records.append(ImageRecord(image_id, file, kept))
        if trimmed:
            log.info("split %s: %d images have more than %d captions; their first %d are "
                     "kept", name, trimmed, captions_per_image, captions_per_image)
        splits[name] = records
    return splits


def _split_name(json_file: Path) -> str:
    suffix = json_file.stem.split("_")[-1]
    for key, name in (("train", "train"), ("val", "dev"), ("test", "test")):
        if key in suffix:
            return name
    raise UserError(f"cannot tell which split {json_file} is; name it with "
                    "--split NAME=IDS_FILE")


def write_splits(splits: dict[str, list[ImageRecord]], dataset_dir: str | Path) -> list[Path]:
    """Write ``{split}_caps.txt``, ``{split}_ids.txt``, ``{split}_images.txt`` atomically.

    The ids file lists each image once when every image of the split has the same number
    of captions, else once per caption (its runs say how many each has)."""
    dataset_dir = Path(dataset_dir)
    with folder_lock(dataset_dir, "aoq captions"):
        return _write_splits(splits, dataset_dir)


def _write_splits(splits: dict[str, list[ImageRecord]], dataset_dir: Path) -> list[Path]:
    written = []
    # train last: make takes train_caps.txt as the sign that every split is written.
    for name in sorted(splits, key=lambda split: split == "train"):
        records = splits[name]
        per_caption = len({len(r.captions) for r in records}) > 1
        files = {
            "caps": "".join(f"{c}\n" for r in records for c in r.captions),
            "ids": "".join(f"{r.image_id}\n" * (len(r.captions) if per_caption else 1)
                           for r in records),
            "images": "".join(f"{r.file}\n" for r in records),
        }
        for kind in ("ids", "images", "caps"):
            path = dataset_dir / f"{name}_{kind}.txt"
            write_text(path, files[kind])
            written.append(path)
        log.info("split %s: %d images, %d captions -> %s", name, len(records),
                 sum(len(r.captions) for r in records), dataset_dir / f"{name}_caps.txt")
    return written
