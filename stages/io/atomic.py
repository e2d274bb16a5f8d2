"""Write-then-rename, so an interrupted stage never leaves a file that looks complete.

``make`` decides what to redo from the files that exist: a half-written checkpoint, HDF5
or caption file under its final name would be taken as done. Every output goes through
:func:`atomic_path`, which hands out a temporary name in the same folder and renames it
into place only when the block finishes without an exception.

Also here: what keeps a folder of outputs sound when things go wrong around the writes.

* Several files that must change together (a split's features, ids and captions) go
  through :func:`replace_together`: all are written under temporary names, a journal lists
  the renames, then they are renamed; a run killed midway is completed by the next one
  (:func:`finish_replacements`), so readers see the old set or the new one.
* A killed process leaves its temporary file (``.NAME.tmp-PID-HOST``, as large as a
  checkpoint); the next atomic write into the folder removes those of dead processes of
  this host (:func:`remove_stale_temp_files`).
* A full disk (or quota) is a :class:`NoSpaceError` naming the path and the space needed,
  checked before writes of known size (:func:`check_free_space`) and turned from the
  ``OSError`` (``ENOSPC``, ``EDQUOT``) of a write that fails midway.
"""

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from stages.core.errors import NoSpaceError, UserError

log = logging.getLogger(__name__)

HOST = socket.gethostname()
TEMP_PATTERN = re.compile(r"^\..+\.tmp-(\d+)(?:-(.+))?$")
JOURNAL_SUFFIX = ".journal.json"
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How disk-full failures read when a library reports them only as text (HDF5's errors).
DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "errno = 28",
                  "errno = 122")


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name of ``path`` for this process: ``.NAME.tmp-PID-HOST`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{HOST}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, need_bytes: int = 0, what: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left untouched. Stale
    temporary files of dead processes in the folder are removed first. ``need_bytes``
    (when known): the free space checked before the block runs; a disk-full error in the
    block becomes a :class:`NoSpaceError` (``what`` names the file in it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    what = what or path.name
    if need_bytes:
        check_free_space(path, need_bytes, what)
    tmp = temp_path(path)
    try:
        with no_space_as_user_error(path, need_bytes, what):
            yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = False,
                  check_old: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; rename it to ``path`` on success.

    An existing ``path`` is a :class:`UserError` unless ``replace``: it is then moved aside
    under a temporary name, the new folder renamed into place, and the old one removed (a
    kill in between leaves no ``path``, so make redoes it, and the old folder is removed
    as a stale temporary). ``check_old(path)``, called just before, raises to keep a
    ``path`` that is not the caller's to delete. On an exception the temporary folder is
    removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    tmp = temp_path(path)
    with no_space_as_user_error(path):
        tmp.mkdir()
    try:
        with no_space_as_user_error(path):
            yield tmp
        if path.exists() or path.is_symlink():
            if not replace:
                raise UserError(f"{path} already exists; remove it or ask to replace it")
            if check_old is not None:
                check_old(path)
            old = path.with_name(f".{path.name}.old.tmp-{os.getpid()}-{HOST}")
            os.replace(path, old)
            os.replace(tmp, path)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    data = text.encode("utf-8")
    with atomic_path(path, need_bytes=len(data)) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write ``obj`` as indented JSON to ``path``."""
    write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line; the line is written with a single ``write`` call."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record) + "\n"
    with no_space_as_user_error(path, len(line), path.name), open(path, "a", encoding="utf-8") as f:
        f.write(line)


def plain_attrs(attrs) -> dict:
    """HDF5 attributes as plain Python values (numpy scalars -> int/float/str/bool)."""
    return {k: v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v
            for k, v in attrs.items()}


# --- several files as one unit ------------------------------------------------------------
@contextlib.contextmanager
def replace_together(journal: str | os.PathLike) -> Iterator[Callable[[Path], Path]]:
    """Replace several files of one folder as a unit.

    Yields ``stage(final_path, tmp=None) -> temporary_path``: write each new file at the
    temporary path it hands out (or at ``tmp``, a name of the caller's in the same folder).
    When the block succeeds, ``journal`` (a JSON file in the same folder) records the
    renames, they are done in the order staged, the last file gets the newest modification
    time (``make`` compares them), and the journal is removed. An exception in the block
    removes the temporary files (the old set stays); a kill after the journal is written
    is completed by :func:`finish_replacements` on the next run.
    """
    journal = Path(journal)
    staged: list[tuple[Path, Path]] = []

    def stage(final: Path, tmp: Path | None = None) -> Path:
        final = Path(final)
        tmp = Path(tmp) if tmp is not None else temp_path(final)
        if final.parent != journal.parent or tmp.parent != journal.parent:
            raise ValueError(f"{final} is not in the journal's folder {journal.parent}")
        staged.append((tmp, final))
        return tmp

    try:
        with no_space_as_user_error(journal.parent):
            yield stage
        write_json(journal, {"renames": [[tmp.name, final.name] for tmp, final in staged]})
    except BaseException:  # the journal is not written: the old set stays
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    finish_replacements(journal)


def finish_replacements(journal: str | os.PathLike) -> bool:
    """Complete the renames of an interrupted :func:`replace_together`; False if none."""
    journal = Path(journal)
    if not journal.is_file():
        return False
    renames = _journal_renames(journal)
    folder = journal.parent
    for tmp, final in renames:
        if (folder / tmp).exists():
            os.replace(folder / tmp, folder / final)
    if renames:
        os.utime(folder / renames[-1][1])
    journal.unlink()
    return True


def _journal_renames(journal: Path) -> list[tuple[str, str]]:
    try:
        return [(str(a), str(b)) for a, b in json.loads(journal.read_text())["renames"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{journal}: unreadable journal of an interrupted write ({exc}); "
                           "delete it and the files it names, and rerun") from exc


# --- stale temporary files ------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host. A zombie (a process that has ended but
    that its parent has not reaped yet, e.g. one killed under a parent that never waits)
    does not: it writes nothing more, though ``kill(pid, 0)`` still finds it."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether ``/proc`` says process ``pid`` is a zombie (state Z; False without /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "pid (command) state ...": the command may hold spaces and parentheses.
    return stat[stat.rfind(")") + 1:].split()[:1] == ["Z"]


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files (and folders) that killed atomic writes of this host left
    in ``folder``; returns what was removed.

    A temporary name is ``.NAME.tmp-PID[-HOST]``; it is stale when PID is not a live
    process here (one of another host, on a shared file system, is left alone) and no
    pending journal of :func:`replace_together` still needs it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pending: set[str] = set()
    removed = []
    for entry in folder.iterdir():
        if entry.name.endswith(JOURNAL_SUFFIX):
            with contextlib.suppress(UserError):
                pending.update(tmp for tmp, _ in _journal_renames(entry))
    for entry in folder.iterdir():
        match = TEMP_PATTERN.match(entry.name)
        if not match or entry.name in pending:
            continue
        pid, host = int(match.group(1)), match.group(2)
        if (host is not None and host != HOST) or pid_alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            log.info("removed %s, left by process %d that no longer runs", entry, pid)
            removed.append(entry)
    return removed


# --- disk space -----------------------------------------------------------------------------
def format_bytes(size: float) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def _existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_free_space(path: str | os.PathLike, need_bytes: int, what: str) -> None:
    """Raise :class:`NoSpaceError` unless the file system of ``path`` (a file or folder,
    existing or to be made) has ``need_bytes`` free for ``what``."""
    path = Path(path)
    free = shutil.disk_usage(_existing(path)).free
    if need_bytes > free:
        raise NoSpaceError(f"no space left on {path}, need about {format_bytes(need_bytes)} "
                           f"for {what} ({format_bytes(free)} free); free some space or "
                           "write elsewhere, then rerun")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write failing for lack of space or quota (``OSError`` with
    ``ENOSPC``/``EDQUOT``, or HDF5's text for it)."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    if isinstance(exc, (OSError, RuntimeError)):
        text = str(exc).lower()
        return any(t in text for t in DISK_FULL_TEXT)
    return False


@contextlib.contextmanager
def no_space_as_user_error(path: str | os.PathLike, need_bytes: int = 0,
                           what: str = "") -> Iterator[None]:
    """Turn a disk-full error raised in the block into a :class:`NoSpaceError` naming
    ``path`` and, when known, the space needed."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not is_disk_full(exc):
            raise
        path = Path(path)
        free = shutil.disk_usage(_existing(path)).free
        need = f", need about {format_bytes(need_bytes)}" if need_bytes else ""
        raise NoSpaceError(f"no space left on {path}{need} for {what or path.name} "
                           f"({format_bytes(free)} free; {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:160]}); free some space and rerun"
                           ) from exc
