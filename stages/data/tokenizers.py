"""Caption tokenizers: what turns a caption string into the token ids a model's text side
reads, for every stage alike.

One interface (:class:`CaptionTokenizer`), three kinds:

* :class:`~stages.data.vocab.Vocab`: our word vocabulary, built from the training captions
  (``aoq vocab``), for models that learn their word embeddings (VSE++);
* :class:`PretrainedTokenizer`: a Hugging Face tokenizer (BERT's WordPiece, ...) together
  with the configuration of the pretrained text model it belongs to;
* :class:`~stages.data.clip_tokenizer.ClipTokenizer`: open_clip's BPE tokenizer with the
  CLIP architecture it belongs to (model ``clip``).

A model class says which it needs (:meth:`stages.models.base.EmbeddingModel.caption_tokenizer`:
None is our vocabulary). The tokenizer's description (:meth:`CaptionTokenizer.to_json`) is
stored in every checkpoint (its ``vocab`` entry) and :func:`tokenizer_from_json` rebuilds
either kind from it, so later stages need neither ``vocab.json`` nor the text model's
folder. Batches hold ``tokens`` (B, L) padded with the tokenizer's ``pad_id`` and their
``lengths`` (B,); the attention mask is ``arange(L) < lengths``.
"""

import base64
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Protocol

from stages.core.errors import UserError
from stages.data.clip_tokenizer import CLIP_FORMAT, ClipTokenizer
from stages.data.vocab import Vocab

log = logging.getLogger(__name__)

PRETRAINED_FORMAT = "aoq-hf-tokenizer"
# Hugging Face's spellings of an environment switch's values.
_TRUE = {"1", "ON", "YES", "TRUE"}
# Captions per call of the Hugging Face tokenizer when a split is encoded.
_CHUNK = 8192


class CaptionTokenizer(Protocol):
    """Caption -> token ids, the padding id, a JSON description, the model's text arguments."""

    pad_id: int

    def encode_many(self, captions: list[str]) -> list[list[int]]:
        """Each caption's token ids, special tokens included."""

    def to_json(self) -> dict:
        """Everything needed to rebuild the tokenizer (JSON types only)."""

    def model_args(self) -> dict:
        """The data-derived constructor arguments of the model's text side:
        ``{"vocab_size": n}`` for a vocabulary, ``{"text_config": {...}}`` for a
        pretrained text model."""


def tokenizer_from_json(obj, source: str = "checkpoint") -> CaptionTokenizer:
    """Rebuild the tokenizer a checkpoint's ``vocab`` entry describes."""
    if isinstance(obj, dict) and obj.get("format") == PRETRAINED_FORMAT:
        return PretrainedTokenizer.from_json(obj, source)
    if isinstance(obj, dict) and obj.get("format") == CLIP_FORMAT:
        return ClipTokenizer.from_json(obj, source)
    return Vocab.from_json(obj, source)


def _looks_like_path(name: str) -> bool:
    """A folder path rather than a hub name (``org/name`` or ``name``)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _missing_model(name: str, reason: str) -> UserError:
    fetch = (f"python -c \"from transformers import AutoModel, AutoTokenizer; "
             f"[c.from_pretrained('{name}').save_pretrained('DIR') for c in "
             f"(AutoModel, AutoTokenizer)]\"")
    return UserError(f"text model {name}: {reason}; on a machine with network save it to a "
                     f"folder ({fetch}), copy DIR here and set model.text_model=DIR")


def resolve_text_model(name: str) -> str:
    """``name`` as Hugging Face loads it: an existing folder (absolute), or a hub name
    (found in the Hugging Face cache, or downloaded where there is network).

    A path to no folder, or a folder without ``config.json``, is a :class:`UserError`
    that names it and says how to get one.
    """
    if not name:
        raise UserError("model.text_model is empty; set it to a Hugging Face model folder "
                        "or hub name, e.g. model.text_model=/models/bert-base-uncased")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _missing_model(name, f"the folder {path} has no config.json (not a model "
                                 "saved with save_pretrained)")
        return str(path.resolve())
    if _looks_like_path(name) or path.exists():
        raise _missing_model(name, f"no such folder {path}")
    return name


def downloads_allowed() -> bool:
    """Whether a hub name missing from the Hugging Face cache may be downloaded: unless
    Hugging Face's own switches say offline (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``
    true). Offline, a missing name is an error at once instead of the network's retries."""
    return not any(os.environ.get(variable, "").strip().upper() in _TRUE
                   for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def from_folder_or_hub(loader, where: str):
    """``loader.from_pretrained(where)`` (an ``Auto*`` class) from the folder or the Hugging
    Face cache; a hub name missing there is downloaded only where :func:`downloads_allowed`,
    otherwise it is a one-line :class:`UserError` at once (no network call)."""
    try:
        return loader.from_pretrained(where, local_files_only=True)
    except OSError:
        if Path(where).is_dir():
            raise
        if not downloads_allowed():
            raise _missing_model(where, "not in the Hugging Face cache, and HF_HUB_OFFLINE / "
                                 "TRANSFORMERS_OFFLINE say offline") from None
        return loader.from_pretrained(where)


class PretrainedTokenizer:
    """A Hugging Face tokenizer truncating to ``max_length`` tokens, and ``text_config``,
    the configuration (``config.json`` as a dict) of the text model it belongs to.

    ``files`` are the tokenizer's files as ``save_pretrained`` writes them (name -> bytes);
    they are its serialised form, so the tokenizer is rebuilt without the original folder.
    """

    def __init__(self, files: dict[str, bytes], text_config: dict, max_length: int,
                 source: str):
        from transformers import AutoTokenizer

        self.files = dict(files)
        self.text_config = dict(text_config)
        self.max_length = max_length
        self.source = source  # where it was loaded from (a folder or hub name), for messages
        with tempfile.TemporaryDirectory(prefix="aoq-tokenizer-") as folder:
            for name, data in self.files.items():
                (Path(folder) / name).write_bytes(data)
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if self.tokenizer.pad_token_id is None:
            raise UserError(f"text model {source}: its tokenizer has no padding token; "
                            "choose a text encoder with one (BERT, RoBERTa, MiniLM, ...)")
        self.pad_id = int(self.tokenizer.pad_token_id)

    @classmethod
    def from_pretrained(cls, name: str, max_length: int) -> "PretrainedTokenizer":
        """The tokenizer and model configuration of the folder or hub name ``name``."""
        from transformers import AutoConfig, AutoTokenizer

        where = resolve_text_model(name)
        try:
            tokenizer = from_folder_or_hub(AutoTokenizer, where)
            config = from_folder_or_hub(AutoConfig, where)
        except (OSError, ValueError) as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise _missing_model(name, f"cannot be loaded ({first})") from exc
        with tempfile.TemporaryDirectory(prefix="aoq-tokenizer-") as folder:
            tokenizer.save_pretrained(folder)
            files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())
                     if p.is_file()}
        return cls(files, text_config_dict(config), max_length, name)

    def encode_many(self, captions: list[str]) -> list[list[int]]:
        """Token ids with the model's special tokens ([CLS] ... [SEP]), at most
        ``max_length`` of them."""
        out: list[list[int]] = []
        for start in range(0, len(captions), _CHUNK):
            out.extend(self.tokenizer(captions[start:start + _CHUNK], truncation=True,
                                      max_length=self.max_length)["input_ids"])
        return out

    def model_args(self) -> dict:
        return {"text_config": dict(self.text_config)}

    def to_json(self) -> dict:
        return {"format": PRETRAINED_FORMAT, "version": 1, "source": self.source,
                "max_length": self.max_length, "text_config": self.text_config,
                "files": {name: base64.b64encode(data).decode("ascii")
                          for name, data in sorted(self.files.items())}}

    @classmethod
    def from_json(cls, obj: dict, source: str = "checkpoint") -> "PretrainedTokenizer":
        try:
            files = {name: base64.b64decode(text) for name, text in obj["files"].items()}
            return cls(files, obj["text_config"], int(obj["max_length"]), obj["source"])
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise UserError(f"{source}: its stored tokenizer cannot be rebuilt ({exc}); the "
                            "checkpoint is incomplete or comes from another version") from exc

    def sha256(self) -> str:
        """Hex SHA-256 of the description (files, max length, model configuration; not
        where it was loaded from): what the data fingerprint records in place of a
        vocabulary file's hash."""
        text = json.dumps({**self.to_json(), "source": ""}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def text_config_dict(config) -> dict:
    """A Hugging Face model configuration as a plain dict, without the keys that say where
    and by which version it was loaded (so moving the folder changes nothing)."""
    return {k: v for k, v in config.to_dict().items()
            if not k.startswith("_") and k != "transformers_version"}
