"""Write-then-rename, so an interrupted stage never leaves a file that looks complete.

``make`` decides what to redo from the files that exist: a half-written checkpoint, HDF5
or caption file under its final name would be taken as done. Every output goes through
:func:`atomic_path`, which hands out a temporary name in the same folder and renames it
into place only when the block finishes without an exception.
"""

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write ``obj`` as indented JSON to ``path``."""
    write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line; the line is written with a single ``write`` call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def plain_attrs(attrs) -> dict:
    """HDF5 attributes as plain Python values (numpy scalars -> int/float/str/bool)."""
    return {k: v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v
            for k, v in attrs.items()}
