"""The embed stage: encode a whole split with a checkpoint, unshuffled, into one HDF5 file.

``embeddings_<split>.h5``: datasets ``images`` float32 (N, E) and ``captions`` float32
(5N, E), caption c belonging to image c // 5; attributes ``format="aoq-embeddings"``,
``checkpoint`` (path), ``weights`` (hash of the model weights), ``dataset``, ``split``,
``num_images``, ``train_captions_sha256`` (from the checkpoint's data fingerprint).
"""

import logging
from pathlib import Path

from stages.config.sections import Config, load_config
from stages.core.device import resolve_device
from stages.data.dataset import check_feature_dim
from stages.io.checkpoint import load_checkpoint, weights_hash
from stages.io.lock import folder_lock
from stages.mining.embedding_files import write_embeddings
from stages.models.encode import encode_split
from stages.models.restore import model_from_checkpoint
from stages.pipeline.inputs import open_model_split
from stages.pipeline.stamps import clear_record, settings_text, write_record

log = logging.getLogger(__name__)


def embed(checkpoint: str | Path, split_name: str = "", config_files=(), overrides=(),
          out: str | Path | None = None) -> Path:
    """Encode ``split_name`` (default: the training split) of the checkpoint's dataset."""
    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    config = load_config(config_files, overrides,
                         base=Config.from_dict(state["config"], str(checkpoint), stored=True))
    split_name = split_name or config.data.train_split
    split = open_model_split(config, split_name, state["model"])
    check_feature_dim(split, state["model"]["args"].get("img_dim", split.features.feature_dim),
                      checkpoint)
    out = Path(out) if out else checkpoint.parent / f"embeddings_{split_name}.h5"
    with folder_lock(out.parent, "aoq embed"):
        clear_record(out)
        _embed(state, checkpoint, config, split, out)
        write_record(out, settings_text(config, "embed"))
    return out


def split_attrs(config: Config, split, data_fingerprint: dict) -> dict:
    """The attributes of an embeddings file that say what was embedded: the dataset, the
    split, its image count, the training captions' hash (of the model's data fingerprint)
    and the dataset folder."""
    return {"dataset": config.data.name, "split": split.name,
            "num_images": split.num_images,
            "train_captions_sha256": data_fingerprint.get("train_captions_sha256", ""),
            "dataset_dir": str(config.dataset_dir().resolve())}


def _embed(state: dict, checkpoint: Path, config: Config, split, out: Path) -> None:
    """Encode ``split`` with the checkpoint's model and write ``out`` (under its lock)."""
    device = resolve_device(config.train.device)
    model, tokenizer = model_from_checkpoint(state, str(checkpoint))
    model.to(device)
    model.use_cache_folder(config.text_cache_folder())
    try:
        img, cap = encode_split(model, split, tokenizer, device, workers=config.data.workers,
                                desc=f"embed {split.name}", precision=config.eval.precision)
    finally:
        model.save_cache()
    write_embeddings(out, img, cap, {
        "checkpoint": str(checkpoint), "weights": weights_hash(state["state_dict"]),
        **split_attrs(config, split, state["data_fingerprint"])})
    log.info("%d images and %d captions (%d-d) -> %s", img.shape[0], cap.shape[0],
             img.shape[1], out)
