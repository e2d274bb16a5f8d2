import numpy as np
import pytest

from stages.core.errors import UserError
from stages.data.dataset import open_split
from stages.features import precomp
from stages.features.precomp import precomp_to_hdf5
from tests.conftest import write_precomp


def test_precomp_npy_becomes_hdf5_that_reads_the_same(tmp_path):
    rng = np.random.default_rng(0)
    regions = rng.normal(size=(6, 4, 8)).astype(np.float32)
    write_precomp(tmp_path, "train", regions, [f"cap {i}" for i in range(30)])
    # A release with one row per caption (5N rows) for dev, global features.
    glob = rng.normal(size=(3, 16)).astype(np.float32)
    write_precomp(tmp_path, "dev", np.repeat(glob, 5, axis=0), [f"c {i}" for i in range(15)])
    (tmp_path / "dev_ids.txt").write_text("7\n8\n9\n")
    outputs = precomp_to_hdf5(tmp_path, dtype="float32")
    assert [p.name for p in outputs] == ["dev.h5", "train.h5"]
    (tmp_path / "train_ims.npy").unlink()  # the HDF5 alone is now read
    (tmp_path / "dev_ims.npy").rename(tmp_path / "dev_ims.bak")
    train, dev = open_split(tmp_path, "train"), open_split(tmp_path, "dev")
    np.testing.assert_array_equal(train.features.read_many(range(6)), regions)
    np.testing.assert_array_equal(dev.features.read_many(range(3)), glob)
    with pytest.raises(UserError, match="no \\*_ims.npy"):
        precomp_to_hdf5(tmp_path / "empty_nothing", None)


def test_killed_precomp_conversion_resumes(tmp_path, monkeypatch):
    features = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    write_precomp(tmp_path, "train", features, [f"c {i}" for i in range(50)])
    monkeypatch.setattr(precomp, "CHECKPOINT_IMAGES", 4)
    real_update = precomp.Progress.update
    seen = []

    def die_after_six(self, n=1, **kw):
        seen.append(n)
        if len(seen) == 6:
            raise KeyboardInterrupt
        real_update(self, n, **kw)

    monkeypatch.setattr(precomp.Progress, "update", die_after_six)
    with pytest.raises(KeyboardInterrupt):
        precomp_to_hdf5(tmp_path)
    assert (tmp_path / "train.h5.partial").exists() and not (tmp_path / "train.h5").exists()
    monkeypatch.setattr(precomp.Progress, "update", real_update)
    written = []
    real_write = precomp.SplitWriter.write
    monkeypatch.setattr(precomp.SplitWriter, "write",
                        lambda self, i, f, *a: written.append(i) or real_write(self, i, f))
    precomp_to_hdf5(tmp_path)
    assert written == list(range(4, 10))  # from the last checkpoint (after image 4)
    (tmp_path / "train_ims.npy").unlink()
    np.testing.assert_array_equal(open_split(tmp_path, "train").features.read_many(range(10)),
                                  features)


def test_a_full_disk_is_one_clear_error_and_a_rerun_resumes(tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    import h5py

    from stages.core.errors import NoSpaceError

    features = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    write_precomp(tmp_path, "train", features, [f"c {i}" for i in range(50)])
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(NoSpaceError, match=r"no space left on .*train.h5.partial, need about "
                                           r"1.0 MB for the features of train.h5"):
        precomp_to_hdf5(tmp_path)
    assert not list(tmp_path.glob("train.h5*"))  # checked before anything is written
    monkeypatch.undo()

    monkeypatch.setattr(precomp, "CHECKPOINT_IMAGES", 4)
    real_setitem = h5py.Dataset.__setitem__
    writes = []

    def disk_fills_up(self, key, value):
        writes.append(key)
        if len(writes) == 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", disk_fills_up)
    with pytest.raises(NoSpaceError, match=r"no space left on .*train.h5.partial"):
        precomp_to_hdf5(tmp_path)
    assert (tmp_path / "train.h5.partial").exists()  # kept for the rerun
    monkeypatch.undo()
    precomp_to_hdf5(tmp_path)  # space freed: resumes and finishes
    (tmp_path / "train_ims.npy").unlink()
    np.testing.assert_array_equal(open_split(tmp_path, "train").features.read_many(range(10)),
                                  features)


def test_repeated_rows_of_images_with_counts_that_differ_become_one_row_per_image(tmp_path):
    import h5py

    counts = [1, 3, 5, 2, 7]
    feats = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
    captions = [f"c {i} {j}" for i, n in enumerate(counts) for j in range(n)]
    write_precomp(tmp_path, "dev", np.repeat(feats, counts, axis=0), captions)
    (tmp_path / "dev_ids.txt").write_text("".join(f"{40 + i}\n" * n
                                                  for i, n in enumerate(counts)))
    precomp_to_hdf5(tmp_path, dtype="float32")
    with h5py.File(tmp_path / "dev.h5", "r") as f:
        np.testing.assert_array_equal(f["features"][...], feats)
        assert f["image_ids"][...].tolist() == [40, 41, 42, 43, 44]
    (tmp_path / "dev_ims.npy").unlink()
    dev = open_split(tmp_path, "dev")
    assert dev.layout.counts.tolist() == counts and dev.features.path.name == "dev.h5"
    assert [captions[c].split()[1] for c in range(len(captions))] == [
        str(i) for i in dev.layout.owner.tolist()]
