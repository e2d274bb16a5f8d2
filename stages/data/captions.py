"""Caption files: ``{split}_caps.txt``, one caption per line, each image's captions on
consecutive lines (5 per image in the standard benchmarks; the split's caption layout,
:func:`stages.data.dataset.open_split`, says which image owns which)."""

from pathlib import Path

from stages.core.errors import UserError

# The standard benchmarks' captions per image (Flickr30K, COCO as released for retrieval).
CAPTIONS_PER_IMAGE = 5


def split_names(dataset_dir: Path) -> list[str]:
    """The splits of a dataset folder: the names of its ``{split}_caps.txt`` files."""
    return sorted(p.name[: -len("_caps.txt")] for p in Path(dataset_dir).glob("*_caps.txt"))


def check_split(dataset_dir: Path, split: str) -> Path:
    """``dataset_dir/{split}_caps.txt``; a missing folder, or a split the folder does not
    have, is a :class:`UserError` (the latter naming the splits it has)."""
    if not Path(dataset_dir).is_dir():
        raise UserError(f"dataset folder {dataset_dir} not found; set DATA_PATH to the folder "
                        "holding it (make ... DATA_PATH=/datasets) or run the features stage")
    path = Path(dataset_dir) / f"{split}_caps.txt"
    if not path.is_file():
        raise UserError(f"{dataset_dir} has no split {split!r} (no {path.name}; its splits: "
                        f"{', '.join(split_names(dataset_dir)) or 'none'}); a split is a "
                        "{split}_caps.txt file beside that split's features or image list")
    return path


def read_text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (without their newline; no empty last line for a
    final newline). Bytes that are not UTF-8 are a :class:`UserError` naming the line."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = raw[: exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line_no}: not UTF-8 ({exc.reason} at byte {exc.start}); "
                        "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from exc
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_captions(path: str | Path) -> list[str]:
    """All captions of a caption file, stripped, in order.

    Raises :class:`UserError` naming the file and line for a missing file, bytes that are
    not UTF-8, or an empty line (which would silently shift every later caption to the
    wrong image).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"caption file {path} not found")
    lines = read_text_lines(path)
    captions = []
    for i, line in enumerate(lines, 1):
        caption = line.strip()
        if not caption:
            raise UserError(f"{path}:{i}: empty caption line; every caption is one "
                            "non-empty line, an image's captions on consecutive lines: write "
                            "the missing caption there, or the file again")
        captions.append(caption)
    return captions
