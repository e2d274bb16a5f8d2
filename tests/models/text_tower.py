"""A tiny random-weight BERT saved as a Hugging Face folder (no network), for the text tower
tests: 2 layers, hidden size 32, a WordPiece vocabulary of the words it is given; a
vse_transformer built on it, batches of its token ids, a count of its encoder's calls."""

import json
import re
from pathlib import Path

import torch

from stages.config.sections import load_config
from stages.data.captions import read_captions
from stages.data.dataset import pad_tokens
from stages.data.tokenizers import PretrainedTokenizer
from stages.models import build_model

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Word pieces, so that a word outside the list is split rather than always [UNK].
PIECES = ["##s", "##ing", "##ed", "##er", "##a", "##e", "##o", "##n", "##t"]


def write_tiny_bert(folder: Path, captions: list[str] = (), seed: int = 0,
                    layers: int = 2) -> Path:
    """Save a BertModel (random weights from ``seed``) and its tokenizer, whose vocabulary
    holds the lower-cased words and punctuation of ``captions``, into ``folder``."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for c in captions for w in re.findall(r"\w+|[^\w\s]", c.lower())})
    vocab = [*SPECIAL, *PIECES, *[w for w in words if w not in SPECIAL]]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)  # + tokenizer.json
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=37,
                        max_position_embeddings=64)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    return folder


def tiny_bert_for(root: Path, name: str = "bert", **kwargs) -> Path:
    """A tiny BERT under ``root/name`` whose vocabulary covers the captions of
    ``root/tiny/train_caps.txt`` (the conftest's tiny dataset)."""
    return write_tiny_bert(root / name, read_captions(root / "tiny" / "train_caps.txt"),
                           **kwargs)


def text_tower_config(root: Path, bert: Path, *overrides: str):
    """A tiny vse_transformer run on ``root/tiny`` (1 epoch, batch 16, CPU)."""
    return load_config(overrides=[
        f"data.path={root}", "data.name=tiny", "data.workers=0", "train.device=cpu",
        "model.name=vse_transformer", f"model.text_model={bert}", "model.embed_size=32",
        "train.batch_size=16", "train.epochs=1", "train.lr=1e-3", *overrides])


def build(bert, tokenizer=None, load=True, **options):
    """A vse_transformer (img_dim 32, embed 16) on ``bert``, its pretrained weights loaded."""
    tokenizer = tokenizer or PretrainedTokenizer.from_pretrained(str(bert), 64)
    model = build_model("vse_transformer", {"text_model": str(bert), "embed_size": 16,
                                            **options},
                        img_dim=32, **tokenizer.model_args())
    if load:
        model.load_pretrained()
    return model, tokenizer


def batch_of(tokenizer, captions):
    ids = [torch.tensor(t) for t in tokenizer.encode_many(captions)]
    return pad_tokens(ids, tokenizer.pad_id)


def count_encoder_calls(model) -> list:
    calls = []
    model.text_encoder.encoder.register_forward_hook(
        lambda module, args, kwargs_or_out: calls.append(1))
    return calls
