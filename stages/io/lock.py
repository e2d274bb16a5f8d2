"""One writer per output folder: an exclusive, non-blocking lock on ``<folder>/.lock``.

Two stages writing the same folder at once (two ``make`` runs, a forgotten job in another
terminal) would interleave their files into a mix neither made. :func:`folder_lock` takes
``fcntl.flock`` on ``<folder>/.lock`` and writes the holder's pid into it; a second process
gets a :class:`UserError` naming the folder and that pid. The operating system releases a
flock when its process ends, killed or not, so a ``.lock`` file left by a crash never
blocks the next run.
"""

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "",
                name: str = LOCK_NAME) -> Iterator[Path]:
    """Hold the lock of ``folder`` (created if missing) for the block; yields the folder.

    ``what`` names the stage in the error a second process gets. ``name``: the lock file;
    a stage that writes one file of a folder other stages write too (the vocabulary in the
    dataset folder) locks that file only, ``.<file>.lock``. The lock file is removed on
    release; a process that opened it meanwhile notices (the file it locked is no longer
    the one at the path) and takes the lock again on the new file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
        yield folder
    finally:
        # Remove the file while still holding it, so nobody can lock a file that is gone;
        # only our own file (the folder may have been renamed and another lock made since).
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
