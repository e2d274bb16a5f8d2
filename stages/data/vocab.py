"""Tokenizer and vocabulary.

Tokenization is NLTK's Treebank word tokenizer on the lower-cased caption: the same tokens
as VSE++'s ``nltk.word_tokenize`` on single-sentence captions, without the punkt data file
that cannot be downloaded on many clusters. The vocabulary is built from the *training*
captions only and records a hash of them, so a vocabulary from another dataset is caught.
"""

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

from nltk.tokenize import TreebankWordTokenizer

from stages.core.errors import UserError
from stages.io.atomic import write_json

log = logging.getLogger(__name__)

SPECIALS = ("<pad>", "<start>", "<end>", "<unk>")
PAD, START, END, UNK = range(4)

_tokenizer = TreebankWordTokenizer()


def tokenize(caption: str) -> list[str]:
    """Lower-cased word tokens of one caption."""
    return _tokenizer.tokenize(caption.lower())


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Vocab:
    """Word <-> index map with ``<pad>=0, <start>=1, <end>=2, <unk>=3``; a
    :class:`~stages.data.tokenizers.CaptionTokenizer`."""

    pad_id = PAD

    def __init__(self, words: list[str], meta: dict | None = None):
        if tuple(words[:4]) != SPECIALS:
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {words[:4]}")
        self.idx2word = list(words)
        self.word2idx = {w: i for i, w in enumerate(self.idx2word)}
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return len(self.idx2word)

    def encode(self, caption: str) -> list[int]:
        """``<start>`` + token ids (``<unk>`` for unknown words) + ``<end>``."""
        ids = [self.word2idx.get(t, UNK) for t in tokenize(caption)]
        return [START, *ids, END]

    def encode_many(self, captions: list[str]) -> list[list[int]]:
        return [self.encode(c) for c in captions]

    def model_args(self) -> dict:
        """The model's data-derived text argument: the vocabulary size."""
        return {"vocab_size": len(self)}

    def decode(self, ids) -> list[str]:
        return [self.idx2word[i] for i in ids]

    @classmethod
    def build(cls, captions: list[str], threshold: int = 4, meta: dict | None = None) -> "Vocab":
        """Words occurring at least ``threshold`` times, by decreasing count then alphabetically."""
        counts = Counter(t for c in captions for t in tokenize(c))
        kept = sorted((w for w, n in counts.items() if n >= threshold and w not in SPECIALS),
                      key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept], meta={**(meta or {}), "threshold": threshold})

    def to_json(self) -> dict:
        return {"format": "aoq-vocab", "version": 1, **self.meta, "idx2word": self.idx2word}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def from_json(cls, obj, source: str = "vocab") -> "Vocab":
        """Our format, or SCAN/VSE++'s ``{"word2idx": ..., "idx2word": {"0": ...}, "idx": n}``.

        Anything else, or a word list that is not distinct strings starting with the four
        special tokens, is a :class:`UserError` naming ``source``.
        """
        if isinstance(obj, dict) and obj.get("format") == "aoq-vocab":
            words = obj.get("idx2word")
            if not isinstance(words, list):
                raise UserError(f"{source}: an aoq-vocab without an idx2word list; rebuild "
                                "it with `aoq vocab`")
            meta = {k: v for k, v in obj.items() if k not in ("format", "version", "idx2word")}
            return cls(_checked_words(words, source), meta)
        if isinstance(obj, dict) and isinstance(obj.get("word2idx"), dict):
            word2idx = obj["word2idx"]
            words = [None] * len(word2idx)
            for word, idx in word2idx.items():
                if (not isinstance(idx, int) or not 0 <= idx < len(words)
                        or words[idx] is not None):
                    raise UserError(f"{source}: word2idx indices are not 0..{len(words) - 1}")
                words[idx] = word
            return cls(_checked_words(words, source), {"imported_from": str(source)})
        raise UserError(f"{source}: not a vocabulary file (neither aoq-vocab nor SCAN's "
                        "word2idx format)")

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"vocabulary {path} not found; build it from the training captions "
                            "with `aoq vocab` (or `make vocab DATA=...`)")
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not a JSON vocabulary ({exc}); rebuild it with "
                            "`aoq vocab`") from exc
        return cls.from_json(obj, str(path))

    def check_built_from(self, captions_file: str | Path, vocab_path: str | Path) -> None:
        """Fail if this vocabulary records training captions other than ``captions_file``.

        Vocabularies imported from SCAN carry no record and are accepted with a warning.
        """
        recorded = self.meta.get("captions_sha256")
        if recorded is None:
            log.warning("%s records no source captions (imported?); cannot check that it "
                        "was built from %s", vocab_path, captions_file)
            return
        actual = file_sha256(captions_file)
        if recorded != actual:
            raise UserError(
                f"{vocab_path} was built from other captions ({self.meta.get('captions_file')}, "
                f"sha256 {recorded[:12]}) than {captions_file} (sha256 {actual[:12]}); use a "
                f"vocabulary of these captions: `aoq vocab --out FILE` builds one, and make "
                "builds the dataset's own when VOCAB is not given")


def _checked_words(words: list, source: str) -> list[str]:
    """Distinct strings, the four special tokens first."""
    if not all(isinstance(w, str) for w in words):
        raise UserError(f"{source}: the vocabulary's words must all be strings")
    if tuple(words[:4]) != SPECIALS:
        raise UserError(f"{source}: expected {SPECIALS} at indices 0-3, got {words[:4]}; "
                        "rebuild it with `aoq vocab`")
    if len(set(words)) < len(words):
        repeated = sorted(w for w, n in Counter(words).items() if n > 1)[:5]
        raise UserError(f"{source}: words listed more than once ({', '.join(repeated)}); "
                        "rebuild it with `aoq vocab`")
    return words


def build_vocab_file(captions_file: str | Path, out: str | Path, threshold: int = 4) -> Vocab:
    """Build the vocabulary of a training caption file and write it atomically to ``out``."""
    from stages.data.captions import read_captions

    captions = read_captions(captions_file)
    vocab = Vocab.build(captions, threshold, meta={
        "captions_file": str(captions_file),
        "captions_sha256": file_sha256(captions_file),
    })
    vocab.save(out)
    log.info("vocabulary of %d words (count >= %d) from %d captions in %s -> %s",
             len(vocab), threshold, len(captions), captions_file, out)
    return vocab
