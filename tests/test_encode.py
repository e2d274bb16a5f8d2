"""Encoding a split refuses NaN/inf image features: they would rank first for every caption."""

import numpy as np
import pytest
import torch

from stages.core.errors import UserError
from stages.data.dataset import open_split
from stages.data.vocab import Vocab
from stages.models import build_model
from stages.models.encode import encode_split
from tests.conftest import write_precomp

CAPTIONS = [f"a photo number {i}" for i in range(5 * 12)]


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_features_name_the_split_file_and_first_image(tmp_path, bad_value):
    feats = np.random.default_rng(0).normal(size=(12, 3, 8)).astype(np.float32)
    feats[7, 1, 2] = bad_value
    feats[9, 0, 0] = bad_value
    write_precomp(tmp_path, "test", feats, CAPTIONS)
    split = open_split(tmp_path, "test")
    vocab = Vocab(["<pad>", "<start>", "<end>", "<unk>", "a", "photo"])
    model = build_model("vsepp", {"embed_size": 4, "word_dim": 4}, img_dim=8,
                        vocab_size=len(vocab))
    with pytest.raises(UserError, match=r"split 'test': .*test_ims.npy has NaN or inf "
                                        r"features .*first: image 7\b"):
        encode_split(model, split, vocab, torch.device("cpu"), batch_size=5)
    feats[7, 1, 2] = feats[9, 0, 0] = 0.0
    write_precomp(tmp_path, "test", feats, CAPTIONS)
    img, cap = encode_split(model, open_split(tmp_path, "test"), vocab, torch.device("cpu"))
    assert img.shape == (12, 4) and cap.shape == (60, 4)


def test_an_image_range_takes_the_captions_of_those_images(tmp_path):
    counts = [1, 3, 5, 2, 7, 1, 4]
    captions = [f"a photo number {i}" for i, n in enumerate(counts) for _ in range(n)]
    feats = np.random.default_rng(1).normal(size=(len(counts), 8)).astype(np.float32)
    write_precomp(tmp_path, "test", feats, captions)
    (tmp_path / "test_ids.txt").write_text("".join(f"{i}\n" * n for i, n in enumerate(counts)))
    split = open_split(tmp_path, "test")
    vocab = Vocab.build(captions, threshold=1)
    model = build_model("vsepp", {"embed_size": 4, "word_dim": 4}, img_dim=8,
                        vocab_size=len(vocab))
    img, cap = encode_split(model, split, vocab, torch.device("cpu"), batch_size=3)
    assert img.shape == (7, 4) and cap.shape == (sum(counts), 4)
    part_img, part_cap = encode_split(model, split, vocab, torch.device("cpu"), batch_size=3,
                                      image_range=(2, 5))
    first = sum(counts[:2])  # captions of images 0 and 1 come before
    np.testing.assert_allclose(part_img, img[2:5], atol=1e-6)
    np.testing.assert_allclose(part_cap, cap[first:first + sum(counts[2:5])], atol=1e-6)
    assert len(part_cap) == 14
