"""Atomic writes: stale temporary files, disk-full errors, several files as one unit."""

import errno
import os
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from stages.core.errors import NoSpaceError
from stages.io import atomic
from stages.io.atomic import (
    HOST,
    atomic_path,
    check_free_space,
    finish_replacements,
    remove_stale_temp_files,
    replace_together,
    temp_path,
    write_text,
)

DEAD_PID = 2 ** 22 + 12345  # above Linux's largest pid: never a live process
Usage = namedtuple("Usage", "total used free")


def test_stale_temp_files_of_dead_processes_are_removed_by_the_next_write(tmp_path):
    stale = tmp_path / f".last.pt.tmp-{DEAD_PID}-{HOST}"
    stale.write_bytes(b"x" * 1000)  # a checkpoint-sized leftover of a killed save
    legacy = tmp_path / f".best.pt.tmp-{DEAD_PID}"  # the name before hosts were added
    legacy.write_bytes(b"x")
    stale_dir = tmp_path / f".demo.tmp-{DEAD_PID}-{HOST}"
    stale_dir.mkdir()
    (stale_dir / "train_ims.npy").write_bytes(b"x")
    alive = tmp_path / f".other.pt.tmp-{os.getpid()}-{HOST}"  # being written right now
    alive.write_bytes(b"x")
    elsewhere = tmp_path / f".x.pt.tmp-{DEAD_PID}-another-host"  # a shared file system
    elsewhere.write_bytes(b"x")
    mine = tmp_path / "keep.tmp-1"  # not a temporary name of ours
    mine.write_bytes(b"x")
    write_text(tmp_path / "a.txt", "new")
    assert not stale.exists() and not legacy.exists() and not stale_dir.exists()
    assert alive.exists() and elsewhere.exists() and mine.exists()
    assert (tmp_path / "a.txt").read_text() == "new"
    assert remove_stale_temp_files(tmp_path) == []


def test_temp_files_a_pending_journal_needs_are_kept(tmp_path):
    tmp = tmp_path / f".a.txt.tmp-{DEAD_PID}-{HOST}"
    tmp.write_text("new a")
    (tmp_path / ".x.journal.json").write_text(f'{{"renames": [["{tmp.name}", "a.txt"]]}}')
    assert remove_stale_temp_files(tmp_path) == []
    assert finish_replacements(tmp_path / ".x.journal.json")
    assert (tmp_path / "a.txt").read_text() == "new a"


def test_free_space_is_checked_before_a_write_of_known_size(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - 10**9, 10**9))
    check_free_space(tmp_path / "new" / "sub", 10**8, "a checkpoint")  # fits
    message = rf"no space left on {tmp_path / 'ck.pt'}, need about 5.0 GB for a checkpoint"
    with (pytest.raises(NoSpaceError, match=message + r" \(1.0 GB free\)"),
          atomic_path(tmp_path / "ck.pt", need_bytes=5 * 10**9, what="a checkpoint") as tmp):
        tmp.write_bytes(b"never")
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_fills_up_midway_is_a_user_error_and_a_rerun_finishes(tmp_path):
    with (pytest.raises(NoSpaceError, match=r"no space left on .*ck.pt, need about 2.0 MB"),
          atomic_path(tmp_path / "ck.pt", need_bytes=2 * 10**6) as tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []  # no temporary file, no output
    with pytest.raises(NoSpaceError, match="no space left"), atomic_path(tmp_path / "ck.pt"):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(NoSpaceError), atomic_path(tmp_path / "f.h5"):  # HDF5: text only
        raise OSError("Can't write data (file write failed: errno = 28, error message "
                      "= 'No space left on device')")
    with pytest.raises(OSError, match="Permission"), atomic_path(tmp_path / "ck.pt"):
        raise PermissionError(errno.EACCES, "Permission denied")  # other errors stay
    write_text(tmp_path / "ck.pt", "whole")  # space freed: the rerun finishes
    assert (tmp_path / "ck.pt").read_text() == "whole"


def test_a_checkpoint_save_on_a_full_disk(tmp_path, monkeypatch):
    import torch

    from stages.io.checkpoint import save_checkpoint

    state = {"state_dict": {"w": torch.zeros(1000, 1000)}}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(NoSpaceError, match=r"last.pt, need about 5.0 MB for a checkpoint"):
        save_checkpoint(tmp_path / "last.pt", state)
    monkeypatch.undo()

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(NoSpaceError, match="no space left on .*last.pt"):
        save_checkpoint(tmp_path / "last.pt", state)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(torch, "save", real_save)
    save_checkpoint(tmp_path / "last.pt", state)
    assert (tmp_path / "last.pt").stat().st_size > 4 * 10**6


class Killed(BaseException):
    """A kill: nothing after it runs but the cleanup handlers."""


@pytest.mark.parametrize("kill_at", [0, 1, 2, 3, 4])
def test_files_replaced_together_are_all_old_or_all_new(tmp_path, monkeypatch, kill_at):
    """Kill before the journal (0, 1) or between the renames (2, 3, 4): the next run sees
    the old set or completes the new one, never a mix."""
    for name in ("a", "b", "c"):
        (tmp_path / name).write_text(f"old {name}")
    journal = tmp_path / ".abc.journal.json"
    calls = []
    real_replace = os.replace

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == kill_at:
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(Killed), replace_together(journal) as stage:
        for name in ("a", "b", "c"):
            stage(tmp_path / name).write_text(f"new {name}")
        if kill_at == 0:
            raise Killed
    monkeypatch.undo()
    contents = [(tmp_path / n).read_text() for n in "abc"]
    if kill_at <= 1:  # the journal itself was never renamed into place: the old set
        assert contents == ["old a", "old b", "old c"] and not journal.exists()
        assert not finish_replacements(journal)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]
    else:
        assert journal.exists()
        assert finish_replacements(journal)
        assert [(tmp_path / n).read_text() for n in "abc"] == ["new a", "new b", "new c"]
        assert not journal.exists()
        assert not list(tmp_path.glob(f"*{temp_path(tmp_path / 'x').name[3:]}"))
    assert (tmp_path / "c").stat().st_mtime >= (tmp_path / "a").stat().st_mtime


def test_temp_files_of_a_killed_process_not_yet_reaped_are_stale(tmp_path):
    """A process killed under a parent that has not waited for it yet (a zombie) still
    answers kill(pid, 0), but writes nothing more: its temporary file goes."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        child.kill()
        state = ""
        while state != "Z":  # ended, not reaped: this test has not called wait()
            stat = (Path("/proc") / str(child.pid) / "stat").read_text()
            state = stat[stat.rfind(")") + 1:].split()[0]
        stale = tmp_path / f".i2t.h5.tmp-{child.pid}-{HOST}"
        stale.write_bytes(b"x")
        assert remove_stale_temp_files(tmp_path) == [stale]
        assert not stale.exists()
    finally:
        child.wait()
