"""One writer per output folder: an exclusive, non-blocking lock on ``<folder>/.lock``.

Two stages writing the same folder at once (two ``make`` runs, a forgotten job in another
terminal) would interleave their files into a mix neither made. :func:`folder_lock` takes
``fcntl.flock`` on ``<folder>/.lock`` and writes the holder's pid into it; a second process
gets a :class:`UserError` naming the folder and that pid. The operating system releases a
flock when its process ends, killed or not, so a ``.lock`` file left by a crash never
blocks the next run. A disk too full for the lock file is one clear line, and a lock that
cannot be taken, or a block that fails, removes again the folders it created while they are
still empty (``aoq export`` on a full disk left an empty ``export/``).
"""

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from stages.core.errors import UserError
from stages.io.atomic import no_space_as_user_error

LOCK_NAME = ".lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "",
                name: str = LOCK_NAME, wait: bool = False) -> Iterator[Path]:
    """Hold the lock of ``folder`` (created if missing) for the block; yields the folder.

    ``what`` names the stage in the error a second process gets. ``name``: the lock file;
    a stage that writes one file of a folder other stages write too (the vocabulary in the
    dataset folder) locks that file only, ``.<file>.lock``. ``wait``: wait for the holder
    to release it instead of the error (writers that merge their rows into a shared file,
    each holding it for a moment: the text cache). The lock file is removed on
    release; a process that opened it meanwhile notices (the file it locked is no longer
    the one at the path) and takes the lock again on the new file. A disk too full to
    write the lock file is a :class:`NoSpaceError`. When the lock cannot be taken or the
    block fails, the folders this call created are removed again if they are still empty,
    so a failed start leaves nothing behind.
    """
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        with no_space_as_user_error(folder, what=f"the lock file {folder / name}"):
            folder.mkdir(parents=True, exist_ok=True)
            fd = _lock(folder, what, name, wait)
    except BaseException:
        _remove_if_empty(made)
        raise
    path = folder / name
    try:
        yield folder
    except BaseException:
        _release(fd, path)
        _remove_if_empty(made)
        raise
    _release(fd, path)


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders this process created (deepest first) while they are empty."""
    for made in folders:
        try:
            made.rmdir()
        except FileNotFoundError:  # never made (mkdir failed before it), or gone
            continue
        except OSError:  # not empty: someone else's files are in it now
            return


def _lock(folder: Path, what: str, name: str = LOCK_NAME, wait: bool = False) -> int:
    """Open, lock (``wait``: blocking until the holder releases it) and fill
    ``folder/<name>`` with our pid; returns its descriptor."""
    path = folder / name
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a failed writer removed the empty folder meanwhile
            folder.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise UserError(
                f"{folder} is being written by another process (pid {holder or 'unknown'}, "
                f"see {path}){' running ' + what if what else ''}; wait for it to finish, or "
                "stop it, then rerun") from None
        except OSError:
            os.close(fd)
            raise
        try:
            same = _identity(os.fstat(fd)) == _identity(os.stat(path))
        except FileNotFoundError:  # its holder removed it just before we locked
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except BaseException:
        _release(fd, path)
        raise
    return fd


def _release(fd: int, path: Path) -> None:
    """Remove the lock file while still holding it, so nobody can lock a file that is gone;
    only our own file (the folder may have been renamed and another lock made since)."""
    with contextlib.suppress(FileNotFoundError):
        if _identity(os.stat(path)) == _identity(os.fstat(fd)):
            os.unlink(path)
    os.close(fd)


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
