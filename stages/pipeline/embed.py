"""The embed stage: encode a whole split with a checkpoint, unshuffled, into one HDF5 file.

``embeddings_<split>.h5``: datasets ``images`` float32 (N, E) and ``captions`` float32
(C, E), with the split's caption layout (:mod:`stages.core.layout`: which image owns each
caption); attributes ``format="aoq-embeddings"``, ``checkpoint`` (path), ``weights`` (hash
of the model weights), ``dataset``, ``split``, ``num_images``, ``caption_layout`` (the
layout's identity), ``train_captions_sha256`` (from the checkpoint's data fingerprint).

``shard=(i, n)`` (``aoq embed --shard i/n``) encodes only shard i of n, a contiguous range
of the images (:func:`~stages.mining.embedding_files.shard_range`) and their captions, into
``embeddings_<split>.shard-<i>-of-<n>.h5`` (same attributes plus the shard's), written
atomically under that file's own lock, so the shards of a split can be embedded at once by
several processes; a shard already written by the same model is kept, so rerunning the
shards after a kill redoes only the missing ones. ``aoq offcandi`` reads them as one.
"""

import logging
from pathlib import Path

from stages.config.sections import Config, load_config
from stages.core.device import resolve_device
from stages.core.errors import UserError
from stages.data.dataset import check_feature_dim
from stages.io.checkpoint import load_checkpoint, weights_hash
from stages.io.lock import LOCK_NAME, folder_lock
from stages.mining.embedding_files import made_with, shard_path, shard_range, write_embeddings
from stages.models.encode import encode_split
from stages.models.restore import model_from_checkpoint
from stages.pipeline.inputs import open_model_split
from stages.pipeline.stamps import clear_record, settings_text, write_record

log = logging.getLogger(__name__)


def embed(checkpoint: str | Path, split_name: str = "", config_files=(), overrides=(),
          out: str | Path | None = None, shard: tuple[int, int] | None = None) -> Path:
    """Encode ``split_name`` (default: the training split) of the checkpoint's dataset, or
    its shard ``shard`` = (i, n), 0 <= i < n; returns the file written."""
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    config = load_config(config_files, overrides,
                         base=Config.from_dict(state["config"], str(checkpoint), stored=True))
    split_name = split_name or config.data.train_split
    split = open_model_split(config, split_name, state["model"])
    check_feature_dim(split, state["model"]["args"].get("img_dim", split.features.feature_dim),
                      checkpoint)
    out = Path(out) if out else checkpoint.parent / f"embeddings_{split_name}.h5"
    attrs = {"checkpoint": str(checkpoint), "weights": weights_hash(state["state_dict"]),
             **split_attrs(config, split, state["data_fingerprint"])}
    image_range, lock = None, LOCK_NAME
    if shard is not None:
        index, shards = shard
        if not 0 <= index < shards:
            raise UserError(f"--shard {index}/{shards}: expected i/n with 0 <= i < n")
        if shards > split.num_images:
            raise UserError(f"--shard {index}/{shards}: {shards} shards of the "
                            f"{split.num_images} images of {split.name}; use at most "
                            f"{split.num_images}")
        image_range = shard_range(split.num_images, index, shards)
        out = shard_path(out, index, shards)
        lock = f".{out.name}.lock"  # the shards of a split are embedded in parallel
        attrs.update(shard_index=index, num_shards=shards, shard_image_start=image_range[0],
                     shard_image_stop=image_range[1])
    with folder_lock(out.parent, "aoq embed", name=lock):
        if shard is not None and made_with(out, attrs):
            log.info("%s: shard %d of %d already embedded by this model: kept", out, *shard)
            return out
        clear_record(out)
        _embed(state, checkpoint, config, split, out, attrs, image_range)
        write_record(out, settings_text(config, "embed"))
    return out


def split_attrs(config: Config, split, data_fingerprint: dict) -> dict:
    """The attributes of an embeddings file that say what was embedded: the dataset, the
    split, its image count and caption layout (the whole split's, a shard's too), the
    training captions' hash (of the model's data fingerprint) and the dataset folder."""
    return {"dataset": config.data.name, "split": split.name,
            "num_images": split.num_images, "caption_layout": split.layout.identity(),
            "train_captions_sha256": data_fingerprint.get("train_captions_sha256", ""),
            "dataset_dir": str(config.dataset_dir().resolve())}


def _embed(state: dict, checkpoint: Path, config: Config, split, out: Path, attrs: dict,
           image_range: tuple[int, int] | None = None) -> None:
    """Encode ``split`` (or its images ``image_range`` and their captions) with the
    checkpoint's model and write ``out`` with ``attrs`` (under its lock)."""
    device = resolve_device(config.train.device)
    model, tokenizer = model_from_checkpoint(state, str(checkpoint))
    model.to(device)
    model.use_cache_folder(config.text_cache_folder())
    part = "" if image_range is None else f" images {image_range[0]}..{image_range[1]}"
    try:
        img, cap = encode_split(model, split, tokenizer, device, workers=config.data.workers,
                                desc=f"embed {split.name}{part}", image_range=image_range)
    finally:
        model.save_cache()
    layout = (split.layout if image_range is None
              else split.layout.images(*image_range))
    write_embeddings(out, img, cap, attrs, layout)
    log.info("%d images and %d captions (%d-d) -> %s", img.shape[0], cap.shape[0],
             img.shape[1], out)
