"""features_fingerprint: the same for a copy, different for other values of the same shape."""

import shutil

import h5py
import numpy as np
import pytest

from stages.data.dataset import open_split
from stages.data.features import features_fingerprint
from tests.conftest import write_precomp

CAPTIONS = [f"caption {i}" for i in range(5 * 40)]


def _write(folder, layout, features):
    write_precomp(folder, "train", features, CAPTIONS)
    if layout == "h5":
        (folder / "train_ims.npy").unlink()
        with h5py.File(folder / "train.h5", "w") as f:
            f.create_dataset("features", data=features, chunks=(1, *features.shape[1:]))
            f.attrs.update({"format": "aoq-features", "source": "precomp", "dtype": "float32"})


@pytest.mark.parametrize("layout", ["npy", "h5"])
def test_a_copy_has_the_same_fingerprint_other_values_do_not(tmp_path, layout):
    feats = np.random.default_rng(0).normal(size=(40, 3, 8)).astype(np.float32)
    _write(tmp_path / "a", layout, feats)
    first = features_fingerprint(open_split(tmp_path / "a", "train").features)
    assert first["kind"] == ("npy" if layout == "npy" else "hdf5")
    assert first["shape"] == [40, 3, 8] and first["dtype"] == "float32"
    assert first["sample_rows"] == 18

    shutil.copytree(tmp_path / "a", tmp_path / "copy")  # another path, another mtime
    assert features_fingerprint(open_split(tmp_path / "copy", "train").features) == first

    recomputed = np.random.default_rng(1).normal(size=feats.shape).astype(np.float32)
    _write(tmp_path / "b", layout, recomputed)  # same shape, other values
    other = features_fingerprint(open_split(tmp_path / "b", "train").features)
    assert other["shape"] == first["shape"] and other["bytes"] == first["bytes"]
    assert other["sample_sha256"] != first["sample_sha256"]
    assert other != first


def test_hdf5_attributes_are_part_of_it(tmp_path):
    feats = np.zeros((40, 8), np.float32)
    _write(tmp_path / "a", "h5", feats)
    first = features_fingerprint(open_split(tmp_path / "a", "train").features)
    assert first["attrs"]["source"] == "precomp"
    with h5py.File(tmp_path / "a" / "train.h5", "a") as f:
        f.attrs["source"] = "cnn"
    assert features_fingerprint(open_split(tmp_path / "a", "train").features) != first


def test_one_row_per_caption_files_sample_the_image_rows(tmp_path):
    feats = np.repeat(np.arange(40, dtype=np.float32)[:, None], 5, axis=0) * np.ones(4)
    write_precomp(tmp_path, "train", feats.astype(np.float32), CAPTIONS)  # 200 rows
    store = open_split(tmp_path, "train").features
    assert store.row_step == 5
    assert features_fingerprint(store)["row_step"] == 5
