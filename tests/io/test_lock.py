"""One writer per folder: a second process is refused, a killed holder never blocks."""

import os
import signal
import subprocess
import sys

import pytest

from stages.core.errors import UserError
from stages.io.lock import LOCK_NAME, folder_lock

HOLD = """
import sys, time
from stages.io.lock import folder_lock
with folder_lock(sys.argv[1], "a test"):
    print("locked", flush=True)
    sys.stdin.readline()  # hold it until told (or killed)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of ``tmp_path / 'out'``; yields it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_a_second_process_is_refused_naming_folder_and_pid(tmp_path, holder):
    with (pytest.raises(UserError, match=rf"{tmp_path / 'out'} is being written by another "
                                         rf"process \(pid {holder.pid}\b.*wait for it"),
          folder_lock(tmp_path / "out")):
        pass
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.wait() == 0
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # released and removed
    with folder_lock(tmp_path / "out"):  # free again
        assert (tmp_path / "out" / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "out" / LOCK_NAME).exists()  # its file is left behind...
    with folder_lock(tmp_path / "out") as folder:  # ...but the OS released the lock
        assert folder == tmp_path / "out"


def test_the_lock_is_released_on_an_exception(tmp_path):
    with pytest.raises(RuntimeError), folder_lock(tmp_path):
        raise RuntimeError("boom")
    with folder_lock(tmp_path):
        pass


def _stages(tmp_path, tiny_config):
    """Each stage that writes into a folder, pointed at ``tmp_path / 'out'``."""
    from stages.config.sections import OffcandiConfig
    from stages.data.synthetic import write_synthetic_dataset
    from stages.features.annotations import write_splits
    from stages.features.butd_tsv import tsv_to_hdf5
    from stages.features.cnn import cnn_features
    from stages.features.precomp import precomp_to_hdf5
    from stages.pipeline.embed import embed
    from stages.pipeline.import_candidates import import_published
    from stages.pipeline.offcandi import offcandi
    from stages.pipeline.train import train

    out = tmp_path / "out"
    return {
        "demo-data": lambda: write_synthetic_dataset(out, {"train": 4}),
        "captions": lambda: write_splits({}, out),
        "features precomp": lambda: precomp_to_hdf5(out, ["train"]),
        "features tsv": lambda: tsv_to_hdf5([tiny_config.dataset_dir() / "train_caps.txt"],
                                            out, ["train"]),
        "features cnn": lambda: cnn_features(tmp_path, out, ["train"], "resnet18", "random"),
        # settings it can mine with: refused settings are refused before the lock is taken
        "offcandi": lambda: offcandi(tmp_path / "e.h5", out, OffcandiConfig(k_i2t=10, k_t2i=5)),
        "offcandi-import": lambda: import_published(
            tiny_config.dataset_dir() / "train_caps.txt",
            tiny_config.dataset_dir() / "train_caps.txt", tiny_config, out),
        "embed": lambda: embed(train(tiny_config, tmp_path / "run"), out=out / "e.h5"),
    }


@pytest.mark.parametrize("stage", ["demo-data", "captions", "features precomp", "features tsv",
                                   "features cnn", "offcandi", "offcandi-import", "embed"])
def test_every_stage_locks_its_output_folder(tmp_path, tiny_config, holder, stage):
    if stage == "offcandi":
        from tests.test_offcandi import random_embeddings, write_embeddings

        write_embeddings(tmp_path / "e.h5", *random_embeddings(8))
    with pytest.raises(UserError, match=rf"out is being written by another process \(pid "
                                        rf"{holder.pid}"):
        _stages(tmp_path, tiny_config)[stage]()


def test_a_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from stages.core.errors import NoSpaceError
    from stages.io import lock

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock.os, "write", full)
    with (pytest.raises(NoSpaceError, match=rf"no space left on {tmp_path / 'a' / 'b'} for the "
                                            r"lock file .*b/\.lock.*free some space and rerun"),
          folder_lock(tmp_path / "a" / "b", "a test")):
        pass
    assert list(tmp_path.iterdir()) == []  # the folders it made are gone again


def test_a_failed_block_removes_only_the_empty_folders_it_made(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), folder_lock(tmp_path / "kept" / "new" / "out"):
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]  # existed before: kept
    with pytest.raises(RuntimeError), folder_lock(tmp_path / "kept" / "new") as folder:
        (folder / "result.txt").write_text("x")
        raise RuntimeError("boom")
    assert [p.name for p in (tmp_path / "kept" / "new").iterdir()] == ["result.txt"]
