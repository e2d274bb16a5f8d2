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
