"""A miner that needs no trained model: a pretrained sentence encoder over the captions.

Caption-caption similarity gives both directions' candidates, as sentence-transformers'
``mine_hard_negatives`` does for text: each caption is the mean of the encoder's token
outputs (sentence-transformers' mean pooling), L2-normalised, and each image is represented
by the L2-normalised mean of its captions. Written as an ordinary embeddings file
(:mod:`stages.mining.embedding_files`), so ``aoq offcandi`` mines it like any other: an image's
candidates are the captions of other images closest to its own captions, a caption's the
images whose captions are closest to it.

The file's ``checkpoint`` attribute is ``text:<model folder>`` and its ``weights`` the hash
of the encoder's weights; retraining with ``offcandi.base_ckpt=text:<model folder>`` checks
that its candidates were mined by that model (:func:`stages.pipeline.miners.miner_weights`).
"""

import logging
from pathlib import Path

import numpy as np
import torch

from stages.core.errors import UserError
from stages.core.layout import CaptionLayout
from stages.core.progress import Progress
from stages.data.dataset import open_split
from stages.data.tokenizers import from_folder_or_hub, resolve_text_model
from stages.data.vocab import file_sha256
from stages.io.checkpoint import weights_hash
from stages.io.lock import folder_lock
from stages.mining.embedding_files import made_with, write_embeddings

log = logging.getLogger(__name__)

TEXT_PREFIX = "text:"


def load_text_model(name: str):
    """(tokenizer, model in eval mode, resolved name) of a Hugging Face folder or hub name."""
    from transformers import AutoModel, AutoTokenizer

    where = resolve_text_model(name)
    tokenizer = from_folder_or_hub(AutoTokenizer, where)
    model = from_folder_or_hub(AutoModel, where).float().eval()
    return tokenizer, model, where


@torch.no_grad()
def sentence_embeddings(captions: list[str], tokenizer, model, batch_size: int = 256,
                        max_length: int = 128) -> np.ndarray:
    """(C, H) float32: each caption's mean-pooled token outputs, L2-normalised."""
    out = np.empty((len(captions), model.config.hidden_size), np.float32)
    with Progress(len(captions), "text miner", unit="captions") as bar:
        for start in range(0, len(captions), batch_size):
            batch = tokenizer(captions[start:start + batch_size], padding=True,
                              truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**batch).last_hidden_state  # (b, L, H)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[start:start + len(pooled)] = torch.nn.functional.normalize(pooled, dim=1)
            bar.update(len(pooled))
    return out


def image_rows(captions: np.ndarray, layout: CaptionLayout) -> np.ndarray:
    """(N, H): each image's row, the L2-normalised mean of its caption rows (C, H), image
    i's being ``layout.captions_of(i)``."""
    sums = np.add.reduceat(captions, layout.first_caption, axis=0)
    mean = sums / layout.counts[:, None].astype(captions.dtype)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def embed_text(text_model: str, dataset_dir: str | Path, dataset: str, split_name: str,
               out: str | Path, batch_size: int = 256) -> Path:
    """Encode ``split_name``'s captions of ``dataset_dir`` with ``text_model`` into the
    embeddings file ``out`` (see the module docstring); an ``out`` made by the same model
    weights from the same captions is left as it is (so make, which runs this every time,
    mines again only when the model, the captions or their layout changed)."""
    dataset_dir, out = Path(dataset_dir), Path(out)
    if not dataset_dir.is_dir():
        raise UserError(f"dataset folder {dataset_dir} not found; set data.path / data.name")
    split = open_split(dataset_dir, split_name)
    tokenizer, model, where = load_text_model(text_model)
    identity = {"checkpoint": TEXT_PREFIX + where, "weights": weights_hash(model.state_dict()),
                "dataset": dataset, "split": split_name,
                "train_captions_sha256": file_sha256(dataset_dir / f"{split_name}_caps.txt"),
                "caption_layout": split.layout.identity()}
    with folder_lock(out.parent, "aoq embed-text"):
        if made_with(out, identity):
            log.info("%s is up to date (the same model and captions): nothing to do", out)
            return out
        log.info("text miner %s over %d captions of %s %s", where, len(split.captions),
                 dataset, split_name)
        captions = sentence_embeddings(split.captions, tokenizer, model, batch_size)
        images = image_rows(captions, split.layout)
        write_embeddings(out, images, captions,
                         {**identity, "num_images": split.num_images, "miner": "text",
                          "dataset_dir": str(dataset_dir.resolve())}, split.layout)
    log.info("wrote %s", out)
    return out
