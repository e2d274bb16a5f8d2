"""Training and embedding a split whose images have one caption each, or counts that differ:
a tiny run end to end, the embeddings file holding the layout, and an ids file edited to
another layout (same captions) making the embeddings and the run's data fingerprint change.

The validation split stays 5 per image: retrieval metrics over other layouts are the
metrics stage's part."""

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from stages.cli import cli
from stages.config.sections import load_config
from stages.core.errors import UserError
from stages.core.layout import CaptionLayout
from stages.data.dataset import open_split
from stages.data.synthetic import write_synthetic_dataset
from stages.data.vocab import build_vocab_file
from stages.io.checkpoint import load_checkpoint
from stages.mining.embedding_files import Embeddings, made_with
from stages.pipeline.embed import embed
from stages.pipeline.train import train
from tests.conftest import TINY_OVERRIDES, TINY_SPLITS

COUNTS = [1, 3, 5, 2, 7, 1, 4, 6]


def _dataset(root, captions_per_image):
    """``root/tiny``: a train split of ``captions_per_image`` (k or counts), dev and test 5
    per image, and the vocabulary; returns the run config."""
    write_synthetic_dataset(root / "tiny", TINY_SPLITS, seed=3, feature_dim=32,
                            captions_per_image=captions_per_image)
    write_synthetic_dataset(root / "five", TINY_SPLITS, seed=3, feature_dim=32)
    for split in ("dev", "test"):
        for kind in ("ims.npy", "ids.txt", "caps.txt"):
            shutil.copy(root / "five" / f"{split}_{kind}", root / "tiny" / f"{split}_{kind}")
    build_vocab_file(root / "tiny" / "train_caps.txt", root / "tiny" / "vocab.json",
                     threshold=1)
    return load_config(overrides=[f"data.path={root}", "data.name=tiny", *TINY_OVERRIDES])


@pytest.mark.parametrize("captions_per_image", [1, COUNTS], ids=["one", "counts"])
def test_a_run_trains_and_embeds_its_layout(tmp_path, captions_per_image):
    config = _dataset(tmp_path, captions_per_image)
    split = open_split(tmp_path / "tiny", "train")
    want = np.resize(captions_per_image, 40)
    assert split.layout.counts.tolist() == want.tolist()
    checkpoint = train(config, tmp_path / "run")
    fingerprint = load_checkpoint(checkpoint)["data_fingerprint"]
    assert fingerprint.get("caption_layout") == split.layout.identity()
    out = tmp_path / "run" / "embeddings_train.h5"
    result = CliRunner().invoke(cli, ["embed", "--ckpt", str(checkpoint), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Embeddings(out) as emb:
        assert emb.layout == split.layout == CaptionLayout.from_counts(want)
        assert emb.captions.shape[0] == int(want.sum()) and emb.images.shape[0] == 40
        assert emb.attrs["caption_layout"] == split.layout.identity()


def test_five_per_image_keeps_its_fingerprint_and_embeddings_attributes(tiny_config, tmp_path):
    checkpoint = train(tiny_config, tmp_path / "run")
    assert "caption_layout" not in load_checkpoint(checkpoint)["data_fingerprint"]
    out = embed(checkpoint, out=tmp_path / "emb.h5")
    with Embeddings(out) as emb:
        assert emb.attrs["caption_layout"] == 5 and emb.layout.per_image == 5


def test_an_ids_file_edited_to_another_layout_is_seen(tmp_path):
    config = _dataset(tmp_path, COUNTS)
    checkpoint = train(config, tmp_path / "run")
    shard = embed(checkpoint, out=tmp_path / "emb.h5", shard=(0, 2))
    with Embeddings(shard, shard=True) as emb:
        identity = {k: emb.attrs[k] for k in ("weights", "caption_layout", "shard_index")}
        assert emb.layout == open_split(tmp_path / "tiny", "train").layout.images(0, 20)
    assert made_with(shard, identity)
    before = shard.stat().st_mtime_ns
    assert embed(checkpoint, out=tmp_path / "emb.h5", shard=(0, 2)) == shard
    assert shard.stat().st_mtime_ns == before  # the same model and layout: kept
    # The same captions, the first two images' captions now split 2 + 2 instead of 1 + 3.
    ids = tmp_path / "tiny" / "train_ids.txt"
    lines = ids.read_text().splitlines()
    assert lines[:4] == ["0", "1", "1", "1"]
    ids.write_text("\n".join(["0", "0", "1", "1", *lines[4:]]) + "\n")
    embed(checkpoint, out=tmp_path / "emb.h5", shard=(0, 2))
    with Embeddings(shard, shard=True) as emb:
        assert emb.layout.counts[:2].tolist() == [2, 2]
        assert emb.attrs["caption_layout"] != identity["caption_layout"]
    with pytest.raises(UserError, match="cannot resume .*changed: caption_layout"):
        train(config, tmp_path / "run", resume=True)
