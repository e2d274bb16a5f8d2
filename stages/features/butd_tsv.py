"""Bottom-up-attention (BUTD) region features: TSV files -> one ``{split}.h5`` per split.

The BUTD extractor writes one row per image, tab-separated::

    image_id  image_w  image_h  num_boxes  boxes  features

``boxes`` and ``features`` are base64-encoded float32 arrays of shape (num_boxes, 4) and
(num_boxes, D) (D = 2048). The fixed-36 release has 36 boxes per image, the adaptive one
10 to 100: images are padded to ``max_regions`` and their count stored (``num_regions``).

The TSV is read as a stream, line by line in binary (rows never quote or span lines, and
byte offsets are what a resumed run seeks to), in one pass for every split at once; each
row goes to its position in each split (``{split}_ids.txt`` order) that lists its id. Memory
stays at one row plus a bool per image, whatever the file size.
"""

import base64
import binascii
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.core.errors import NoSpaceError, UserError
from stages.core.progress import Progress
from stages.data.splits import read_split_ids
from stages.features.identity import refuse_other_identity, tsv_identity
from stages.features.writer import SplitWriter
from stages.io.lock import folder_lock

log = logging.getLogger(__name__)

TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
CHECKPOINT_SECONDS = 60.0


@dataclass
class Row:
    """One decoded TSV row: ``boxes`` (r, 4) and ``features`` (r, D) float32."""

    image_id: int
    image_size: tuple[int, int]
    boxes: np.ndarray
    features: np.ndarray


def parse_row(line: bytes, where: str, feature_dim: int) -> Row:
    """Decode one TSV line; errors name ``where`` (file:line) and what is wrong."""
    fields = line.rstrip(b"\r\n").split(b"\t")
    if len(fields) != len(TSV_FIELDS):
        raise UserError(f"{where}: {len(fields)} tab-separated fields, expected "
                        f"{len(TSV_FIELDS)} ({', '.join(TSV_FIELDS)}); the file may be "
                        "truncated or not a BUTD feature TSV")
    try:
        image_id, width, height, num_boxes = (int(v) for v in fields[:4])
    except ValueError as exc:
        raise UserError(f"{where}: image_id, image_w, image_h and num_boxes must be "
                        f"integers ({exc})") from exc
    arrays = {}
    for name, raw, width_ in (("boxes", fields[4], 4), ("features", fields[5], feature_dim)):
        try:
            decoded = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise UserError(f"{where}: field {name!r} of image {image_id} is not valid "
                            f"base64 ({exc}); the row is corrupt or truncated") from exc
        if len(decoded) != num_boxes * width_ * 4:
            raise UserError(f"{where}: image {image_id} has num_boxes={num_boxes}, but its "
                            f"{name} hold {len(decoded) // 4} float32 values, not "
                            f"{num_boxes} x {width_}"
                            + ("; set --feature-dim if the features are not "
                               f"{feature_dim}-d" if name == "features" else ""))
        arrays[name] = np.frombuffer(decoded, dtype=np.float32).reshape(num_boxes, width_)
    return Row(image_id, (width, height), arrays["boxes"], arrays["features"])


def tsv_to_hdf5(tsv_files: list[str | Path], dataset_dir: str | Path, splits: list[str],
                max_regions: int = 36, feature_dim: int = 2048, dtype: str = "float32",
                checkpoint_seconds: float = CHECKPOINT_SECONDS) -> list[Path]:
    """Convert BUTD TSV files into ``dataset_dir/{split}.h5`` for each split.

    Rows whose id no split lists are skipped (counted in the log). An id listed by a split
    but absent from every TSV, a duplicate row, or a row with more than ``max_regions``
    boxes is an error naming the file(s), and removes the partial files. An interrupted
    conversion (killed, disk full) resumes when rerun with the same inputs.
    """
    tsv_files = [Path(p) for p in tsv_files]
    for path in tsv_files:
        if not path.is_file():
            raise UserError(f"TSV file {path} not found")
    dataset_dir = Path(dataset_dir)
    source = tsv_identity(tsv_files, max_regions, feature_dim, dtype)
    with folder_lock(dataset_dir, "aoq features tsv"):
        for split in splits:
            refuse_other_identity(dataset_dir / f"{split}.h5", source)
        return _tsv_to_hdf5(tsv_files, dataset_dir, splits, source, max_regions, feature_dim,
                            dtype, checkpoint_seconds)


def _tsv_to_hdf5(tsv_files: list[Path], dataset_dir: Path, splits: list[str], source: dict,
                 max_regions: int, feature_dim: int, dtype: str,
                 checkpoint_seconds: float) -> list[Path]:
    positions: dict[int, list[tuple[int, int]]] = {}  # image id -> [(split index, row)]
    split_ids = [read_split_ids(dataset_dir, split) for split in splits]
    for s, ids in enumerate(split_ids):
        for row, image_id in enumerate(ids.tolist()):
            positions.setdefault(image_id, []).append((s, row))
    writers = [SplitWriter(dataset_dir / f"{split}.h5", ids, (max_regions, feature_dim),
                           dtype, source, padded=True, with_boxes=True)
               for split, ids in zip(splits, split_ids, strict=True)]
    try:
        start = _common_resume_point(writers)
        stats = _stream(tsv_files, start, positions, writers, max_regions, feature_dim,
                        checkpoint_seconds)
        for split, writer in zip(splits, writers, strict=True):
            missing = writer.missing_ids()
            if len(missing):
                raise UserError(
                    f"{len(missing)} image ids of {dataset_dir / f'{split}_ids.txt'} are in "
                    f"none of {', '.join(map(str, tsv_files))} (first: "
                    f"{', '.join(map(str, missing[:5]))}); pass every TSV file of the release "
                    "(COCO's comes in several), or check the ids file is for this dataset")
        outputs = [writer.finish(**stats) for writer in writers]
    except NoSpaceError:  # free some space and rerun: the partial files resume
        for writer in writers:
            writer.close()
        raise
    except UserError:  # the input must change: nothing to resume
        for writer in writers:
            writer.discard()
        raise
    except BaseException:  # interrupted, disk full...: the partial files resume
        for writer in writers:
            writer.close()
        raise
    for path in outputs:
        log.info("wrote %s", path)
    return outputs


RESUME_KEYS = ("file", "offset", "rows", "skipped")


def _common_resume_point(writers: list[SplitWriter]) -> dict[str, int]:
    """Where every split's partial file stopped: TSV file index, byte offset, rows written
    and skipped so far; all zero when they disagree (a kill between their checkpoints) or
    none has one: then all restart."""
    points = {tuple(int(w.resume_state.get(k, 0)) for k in RESUME_KEYS) for w in writers}
    if len(points) == 1:
        return dict(zip(RESUME_KEYS, points.pop(), strict=True))
    log.warning("the partial split files stopped at different points: starting again")
    for w in writers:
        w.written[:] = False
    return dict.fromkeys(RESUME_KEYS, 0)


def _stream(tsv_files: list[Path], start: dict[str, int], positions: dict,
            writers: list[SplitWriter], max_regions: int, feature_dim: int,
            checkpoint_seconds: float) -> dict:
    """One pass over the TSV rows from ``start``; returns counts for the files' attributes."""
    sizes = [p.stat().st_size for p in tsv_files]
    before = np.concatenate([[0], np.cumsum(sizes)]).tolist()  # bytes before each file
    done = before[start["file"]] + start["offset"]
    rows, skipped = start["rows"], start["skipped"]
    last_checkpoint = time.monotonic()
    t0 = time.perf_counter()
    with Progress(before[-1] >> 20, "BUTD TSV -> HDF5", unit="MB", start=done >> 20) as bar:
        for file_index in range(start["file"], len(tsv_files)):
            path = tsv_files[file_index]
            offset = start["offset"] if file_index == start["file"] else 0
            line_no = None if offset else 0  # line numbers are unknown after a resumed seek
            with open(path, "rb") as f:
                f.seek(offset)
                for line in f:
                    offset += len(line)
                    line_no = line_no + 1 if line_no is not None else None
                    if len(line) < 3 and not line.strip():  # a blank line (cheap test first)
                        continue
                    where = f"{path}:{line_no}" if line_no else f"{path} (byte {offset})"
                    image_id = _peek_id(line, where)
                    targets = positions.get(image_id)
                    if targets is None:
                        skipped += 1
                    else:
                        row = parse_row(line, where, feature_dim)
                        _write_row(row, targets, writers, max_regions, where)
                        rows += 1
                    if time.monotonic() - last_checkpoint > checkpoint_seconds:
                        for w in writers:
                            w.checkpoint(file=file_index, offset=offset, rows=rows,
                                         skipped=skipped)
                        last_checkpoint = time.monotonic()
                    new_done = (before[file_index] + offset) >> 20
                    if new_done > bar.done:
                        bar.update(new_done - bar.done, rows=rows)
    seconds = time.perf_counter() - t0
    log.info("%d rows written, %d rows of ids no split lists skipped; this pass took %.1f s",
             rows, skipped, seconds)
    return {"tsv_rows_written": rows, "tsv_rows_skipped": skipped}


def _peek_id(line: bytes, where: str) -> int:
    """The row's image id, read without decoding the rest (rows of other splits are skipped
    cheaply)."""
    tab = line.find(b"\t")
    head = line[:tab] if tab >= 0 else line
    try:
        return int(head)
    except ValueError as exc:
        raise UserError(f"{where}: the first field (image_id) is {head[:40]!r}, not an "
                        "integer; is this a BUTD feature TSV?") from exc


def _write_row(row: Row, targets: list[tuple[int, int]], writers: list[SplitWriter],
               max_regions: int, where: str) -> None:
    if len(row.features) > max_regions:
        raise UserError(f"{where}: image {row.image_id} has {len(row.features)} boxes, more "
                        f"than --max-regions {max_regions}; the adaptive BUTD release needs "
                        "--max-regions 100")
    for split_index, position in targets:
        writer = writers[split_index]
        if writer.written[position]:
            raise UserError(f"{where}: image {row.image_id} appears twice in the TSV input; "
                            "remove the duplicate row (or the file passed twice)")
        writer.write(position, row.features, row.boxes, row.image_size)
