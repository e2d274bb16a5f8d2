"""Every bad input gets a UserError that names the file and says what to do."""

import numpy as np
import pytest

from stages.core.errors import UserError
from stages.data.captions import read_captions
from stages.data.dataset import open_split
from tests.conftest import write_precomp

CAPS = [f"caption {i}" for i in range(10)]


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(UserError, match="dataset folder .*nope not found.*DATA_PATH"):
        open_split(tmp_path / "nope", "train")


def test_missing_caption_file(tmp_path):
    np.save(tmp_path / "train_ims.npy", np.zeros((2, 3), np.float32))
    (tmp_path / "dev_caps.txt").write_text("a caption\n" * 5)
    with pytest.raises(UserError, match=r"has no split 'train' \(no train_caps.txt; its "
                                        r"splits: dev\); a split is a \{split\}_caps.txt"):
        open_split(tmp_path, "train")


def test_missing_features(tmp_path):
    (tmp_path / "test_caps.txt").write_text("".join(c + "\n" for c in CAPS))
    with pytest.raises(UserError, match="no features for split 'test'.*test.h5.*test_ims.npy"):
        open_split(tmp_path, "test")


def test_caption_count_not_five_per_image(tmp_path):
    write_precomp(tmp_path, "train", np.zeros((3, 4), np.float32), CAPS)
    with pytest.raises(UserError, match="train_caps.txt has 10 captions but .*train_ims.npy "
                                        "has 3 images"):
        open_split(tmp_path, "train")


@pytest.mark.parametrize("shape", [(10,), (2, 3, 4, 5)])
def test_features_of_the_wrong_rank(tmp_path, shape):
    write_precomp(tmp_path, "train", np.zeros(shape, np.float32), CAPS)
    with pytest.raises(UserError, match=r"train_ims.npy: features have shape .*expected \(N, D\)"):
        open_split(tmp_path, "train")


def test_truncated_npy(tmp_path):
    write_precomp(tmp_path, "train", np.zeros((2, 64), np.float32), CAPS)
    path = tmp_path / "train_ims.npy"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match="train_ims.npy: cannot be read.*truncated"):
        open_split(tmp_path, "train")


def test_truncated_hdf5(tmp_path):
    (tmp_path / "train.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 20)
    (tmp_path / "train_caps.txt").write_text("".join(c + "\n" for c in CAPS))
    with pytest.raises(UserError, match="train.h5: cannot be read as HDF5"):
        open_split(tmp_path, "train")


def test_empty_caption_line_names_the_line(tmp_path):
    path = tmp_path / "train_caps.txt"
    path.write_text("one\ntwo\n   \nfour\n")
    with pytest.raises(UserError, match=r"train_caps.txt:3: empty caption line"):
        read_captions(path)


def test_non_utf8_caption_names_the_line(tmp_path):
    path = tmp_path / "train_caps.txt"
    path.write_bytes(b"one\ntwo caf\xe9\n")
    with pytest.raises(UserError, match=r"train_caps.txt:2: not UTF-8.*iconv"):
        read_captions(path)


def test_missing_final_newline_is_fine(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("one\ntwo")
    assert read_captions(path) == ["one", "two"]
