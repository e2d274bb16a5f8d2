"""The pretrained text miner: sentence embeddings of the captions, images as their captions'
mean, mined like any embeddings file, and checked by retraining's provenance test."""

import h5py
import numpy as np
import pytest
import torch

from stages.config.sections import OffcandiConfig, load_config
from stages.core.errors import UserError
from stages.data.captions import read_captions
from stages.mining.embedding_files import Embeddings
from stages.pipeline.embed_text import embed_text, load_text_model
from stages.pipeline.miners import miner_weights
from stages.pipeline.offcandi import offcandi
from stages.pipeline.train import train
from tests.conftest import TINY_OVERRIDES
from tests.models.text_tower import tiny_bert_for


@pytest.fixture
def text_mined(tiny_root, tmp_path):
    bert = tiny_bert_for(tiny_root)
    out = embed_text(str(bert), tiny_root / "tiny", "tiny", "train", tmp_path / "text.h5")
    return bert, out


def test_embeddings_are_mean_pooled_captions_and_their_images_means(tiny_root, text_mined):
    bert, path = text_mined
    captions = read_captions(tiny_root / "tiny" / "train_caps.txt")
    tokenizer, model, _ = load_text_model(str(bert))
    with Embeddings(path) as emb:
        cap = np.asarray(emb.captions)
        img = emb.images
        assert emb.attrs["checkpoint"] == f"text:{bert}" and emb.attrs["miner"] == "text"
        assert emb.attrs["weights"] == miner_weights(f"text:{bert}")
    for c in (0, 7, 199):  # one caption at a time, no padding: the plain mean of its tokens
        batch = tokenizer([captions[c]], return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state[0]
        want = torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy()
        np.testing.assert_allclose(cap[c], want, atol=1e-5)
    mean = cap.reshape(40, 5, -1).mean(1)
    np.testing.assert_allclose(img, mean / np.linalg.norm(mean, axis=1, keepdims=True),
                               atol=1e-6)


def test_retraining_checks_the_text_miner(tiny_root, tmp_path, text_mined):
    bert, path = text_mined
    offcandi(path, tmp_path / "cand", OffcandiConfig(k_i2t=12, k_t2i=4))
    with h5py.File(tmp_path / "cand" / "i2t.h5", "r") as f:
        assert f.attrs["checkpoint"] == f"text:{bert}"
    settings = [f"data.path={tiny_root}", "data.name=tiny", *TINY_OVERRIDES, "train.epochs=1",
                "train.offline_negatives=true", "loss.name=aoq", "offcandi.hardest=10",
                f"offcandi.dir={tmp_path / 'cand'}"]
    config = load_config(overrides=[*settings, f"offcandi.base_ckpt=text:{bert}"])
    assert train(config, tmp_path / "run").is_file()
    other = tiny_bert_for(tiny_root, name="other", seed=1)
    config = load_config(overrides=[*settings, f"offcandi.base_ckpt=text:{other}"])
    with pytest.raises(UserError, match="mined with model weights"):
        train(config, tmp_path / "run2")


def test_embeddings_are_made_again_only_for_another_model(tiny_root, text_mined):
    bert, path = text_mined
    before = path.stat().st_mtime_ns
    embed_text(str(bert), tiny_root / "tiny", "tiny", "train", path)
    assert path.stat().st_mtime_ns == before  # same weights and captions: left as it was
    other = tiny_bert_for(tiny_root, name="other", seed=1)
    embed_text(str(other), tiny_root / "tiny", "tiny", "train", path)
    with Embeddings(path) as emb:
        assert emb.attrs["weights"] == miner_weights(f"text:{other}")


def test_images_are_their_own_captions_means_whatever_their_counts(tmp_path):
    from stages.data.synthetic import write_synthetic_dataset

    counts = [1, 3, 5, 2, 7, 1]
    write_synthetic_dataset(tmp_path / "tiny", {"train": 12}, seed=3, feature_dim=8,
                            captions_per_image=counts)
    bert = tiny_bert_for(tmp_path)
    path = embed_text(str(bert), tmp_path / "tiny", "tiny", "train", tmp_path / "text.h5")
    owner = [i for i, n in enumerate(counts * 2) for _ in range(n)]
    with Embeddings(path) as emb:
        cap, img = np.asarray(emb.captions), emb.images
        assert emb.layout.owner.tolist() == owner
    for i in range(12):
        mean = cap[[c for c, o in enumerate(owner) if o == i]].mean(0)
        np.testing.assert_allclose(img[i], mean / np.linalg.norm(mean), atol=1e-6)
    # The same captions owned otherwise (the ids file edited): made again.
    ids = tmp_path / "tiny" / "train_ids.txt"
    lines = ids.read_text().splitlines()
    ids.write_text("\n".join(["0", "0", *lines[2:]]) + "\n")  # images 0 and 1: 2 + 2
    before = path.stat().st_mtime_ns
    embed_text(str(bert), tmp_path / "tiny", "tiny", "train", path)
    assert path.stat().st_mtime_ns != before
    with Embeddings(path) as emb:
        assert emb.layout.counts[:2].tolist() == [2, 2]
