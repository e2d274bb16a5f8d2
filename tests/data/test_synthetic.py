"""demo-data writes a whole dataset or nothing, and never over files it did not write."""

import os

import numpy as np
import pytest

from stages.core.errors import UserError
from stages.data import synthetic
from stages.data.dataset import open_split
from stages.data.synthetic import MANIFEST, write_synthetic_dataset
from stages.io.atomic import HOST

SPLITS = {"train": 8, "dev": 4, "test": 4}
FILES = sorted([MANIFEST] + [f"{s}_{k}" for s in SPLITS
                             for k in ("ims.npy", "ids.txt", "caps.txt")])


def test_a_folder_holding_other_files_is_refused(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"demo holds files demo-data did not write "
                                        r"\(notes.txt\); refusing"):
        write_synthetic_dataset(out, SPLITS, feature_dim=8)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_its_own_output_is_regenerated_but_not_with_files_added(tmp_path):
    out = tmp_path / "demo"
    write_synthetic_dataset(out, SPLITS, feature_dim=8)
    assert sorted(p.name for p in out.iterdir()) == FILES
    (out / "train_caps.txt").unlink()  # what makes `make` regenerate the demo data
    write_synthetic_dataset(out, SPLITS, seed=1, feature_dim=8)
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert open_split(out, "train").num_images == 8
    (out / "vocab.json").write_text("{}")  # `make vocab` wrote into it since
    with pytest.raises(UserError, match=r"did not write \(vocab.json\).*make clean-demo"):
        write_synthetic_dataset(out, SPLITS, feature_dim=8)
    assert (out / "train_caps.txt").exists() and (out / "vocab.json").exists()


def test_a_killed_generation_leaves_the_old_dataset_or_none(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    real = synthetic.generate_split
    calls = []

    def die_on_the_second_split(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_split", die_on_the_second_split)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_dataset(out, SPLITS, feature_dim=8)
    assert not out.exists() or list(out.iterdir()) == []  # no train split without the rest
    assert [p.name for p in tmp_path.iterdir() if p.name != "demo"] == []  # no temp folder
    monkeypatch.undo()
    write_synthetic_dataset(out, SPLITS, feature_dim=8)
    before = np.load(out / "train_ims.npy")
    calls.clear()
    monkeypatch.setattr(synthetic, "generate_split", die_on_the_second_split)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_dataset(out, SPLITS, seed=1, feature_dim=8)
    np.testing.assert_array_equal(np.load(out / "train_ims.npy"), before)  # the old one


def test_the_temp_folder_of_a_killed_run_is_removed(tmp_path):
    stale = tmp_path / f".demo.tmp-{2 ** 22 + 7}-{HOST}"
    stale.mkdir()
    (stale / "train_ims.npy").write_bytes(b"half")
    write_synthetic_dataset(tmp_path / "demo", SPLITS, feature_dim=8)
    assert sorted(os.listdir(tmp_path)) == ["demo"]
