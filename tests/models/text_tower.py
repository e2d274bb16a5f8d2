"""A tiny random-weight BERT saved as a Hugging Face folder (no network), for the text tower
tests: 2 layers, hidden size 32, a WordPiece vocabulary of the words it is given."""

import re
from pathlib import Path

import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Word pieces, so that a word outside the list is split rather than always [UNK].
PIECES = ["##s", "##ing", "##ed", "##er", "##a", "##e", "##o", "##n", "##t"]


def write_tiny_bert(folder: Path, captions: list[str] = (), seed: int = 0,
                    layers: int = 2) -> Path:
    """Save a BertModel (random weights from ``seed``) and its tokenizer, whose vocabulary
    holds the lower-cased words and punctuation of ``captions``, into ``folder``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted({w for c in captions for w in re.findall(r"\w+|[^\w\s]", c.lower())})
    vocab = [*SPECIAL, *PIECES, *[w for w in words if w not in SPECIAL]]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=37,
                        max_position_embeddings=64)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    return folder
