"""Pretrained word vectors (GloVe, fastText) for a model's word embedding.

The file is text, one word per line: ``word v1 v2 ... vD``, separated by single spaces
(GloVe's ``glove.840B.300d.txt``, fastText's ``*.vec``, whose first line is a ``count dim``
header, skipped). It is streamed once, hashing it on the way, and only the vectors of the
vocabulary's words are kept (GloVe 840B is 5.6 GB for 2.2M words). A line whose word holds
spaces (a few in GloVe 840B) is read from the right: its last D fields are the vector.
Words are matched exactly (the vocabulary is lower-cased), the first occurrence wins; the
special tokens (``<pad>``, ``<start>``, ``<end>``, ``<unk>``) are never looked up.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages.core.errors import UserError
from stages.data.vocab import SPECIALS, Vocab

COMPRESSED = {b"\x1f\x8b": "gzip", b"PK": "zip", b"BZ": "bzip2", b"\xfd7": "xz"}


@dataclass
class WordVectors:
    """The vectors of a vocabulary's words found in a file: ``vectors`` (V, D) float32 (rows
    of missing words are 0), ``found`` (V,) bool, and ``record`` (what the checkpoint keeps:
    ``path``, ``sha256``, ``dim``, ``found``, ``missing``)."""

    vectors: torch.Tensor
    found: torch.Tensor
    record: dict


def _is_header(fields: list[bytes]) -> bool:
    return len(fields) == 2 and all(f.isdigit() for f in fields)


def load_word_vectors(path: str | Path, vocab: Vocab, dim: int) -> WordVectors:
    """Stream ``path`` and keep the vectors of ``vocab``'s words, which must be ``dim``-d.

    A missing or compressed file, vectors of another dimension, a line with too few fields,
    a value that is not a finite number, or a file without vectors is a :class:`UserError`
    naming the file (and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"word vector file {path} not found (model.word_vectors); give a "
                        "GloVe or fastText text file (word v1 ... vD per line)")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic in COMPRESSED:
        raise UserError(f"{path} is {COMPRESSED[magic]}-compressed; unpack it and give the "
                        "text file (e.g. glove.840B.300d.txt, cc.en.300.vec) as "
                        "model.word_vectors")
    wanted = {w.encode("utf-8"): i for i, w in enumerate(vocab.idx2word) if w not in SPECIALS}
    vectors = np.zeros((len(vocab), dim), dtype=np.float32)
    found = np.zeros(len(vocab), dtype=bool)
    digest = hashlib.sha256()
    seen_vector = False
    with open(path, "rb", buffering=1 << 20) as f:
        for number, raw in enumerate(f, 1):
            digest.update(raw)
            line = raw.rstrip()  # fastText ends lines with " \n"
            if not line:
                continue
            spaces = line.count(b" ")
            if not seen_vector:
                if number == 1 and _is_header(line.split(b" ")):
                    header_dim = int(line.split(b" ")[1])
                    if header_dim != dim:
                        raise UserError(f"{path}: line 1 (header) says {header_dim}-d vectors "
                                        f"but model.word_dim is {dim}; set model.word_dim="
                                        f"{header_dim} or give a file of {dim}-d vectors")
                    continue
                if spaces != dim:
                    raise UserError(f"{path}: line {number} has a {spaces}-d vector but "
                                    f"model.word_dim is {dim}; set model.word_dim={spaces} or "
                                    f"give a file of {dim}-d vectors")
                seen_vector = True
            if spaces < dim:
                raise UserError(f"{path}: line {number} has {spaces} values after its first "
                                f"field, expected 'word v1 ... v{dim}' ({dim} values)")
            if spaces == dim:
                word, _, rest = line.partition(b" ")
            else:  # the word holds spaces: the vector is the last dim fields
                word = line.rsplit(b" ", dim)[0]
                rest = line[len(word) + 1:]
            row = wanted.get(word)
            if row is None or found[row]:
                continue
            try:
                values = np.array(rest.split(b" "), dtype=np.float32)
            except ValueError:
                values = np.array([np.nan])
            if values.shape != (dim,) or not np.isfinite(values).all():
                raise UserError(f"{path}: line {number} (word {word.decode('utf-8', 'replace')!r})"
                                f" does not hold {dim} finite numbers after its word")
            vectors[row] = values
            found[row] = True
    if not seen_vector:
        raise UserError(f"{path} holds no word vectors; give a GloVe or fastText text file")
    record = {"path": str(path.resolve()), "sha256": digest.hexdigest(), "dim": dim,
              "found": int(found.sum()), "missing": len(wanted) - int(found.sum())}
    return WordVectors(torch.from_numpy(vectors), torch.from_numpy(found), record)


def init_embedding(embedding: nn.Embedding, path: str | Path, vocab: Vocab,
                   extra_rows: int = 0) -> dict:
    """Overwrite the rows of ``embedding`` (V + extra_rows, D) whose words ``path`` holds;
    the other rows, and the ``extra_rows`` after the vocabulary's (VSE-infinity's
    ``<mask>``), keep their initialisation. Returns the record of :class:`WordVectors`."""
    if embedding.num_embeddings != len(vocab) + extra_rows:
        raise ValueError(f"embedding has {embedding.num_embeddings} rows for a vocabulary "
                         f"of {len(vocab)} words and {extra_rows} more")
    loaded = load_word_vectors(path, vocab, embedding.embedding_dim)
    with torch.no_grad():
        rows = loaded.found.nonzero().squeeze(1).to(embedding.weight.device)
        embedding.weight[rows] = loaded.vectors[loaded.found].to(embedding.weight)
    return loaded.record
