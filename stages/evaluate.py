"""The eval stage: R@1/5/10, medr, meanr and rsum of one checkpoint or an ensemble.

Protocols: the whole split (Flickr30K's 1K test; COCO 5K on ``testall``) or, with
``eval.fold5``, COCO's 5-fold 1K on ``testall`` (metrics averaged over folds, rsum
recomputed from the averaged recalls). Several checkpoints are evaluated as an ensemble:
the average of their similarity matrices.
"""

import logging
import time
from pathlib import Path

from .config import Config, load_config
from .data.dataset import open_split
from .device import resolve_device
from .encode import encode_split
from .errors import UserError
from .io.atomic import append_jsonl
from .io.checkpoint import load_checkpoint, model_from_checkpoint, weights_hash
from .metrics.retrieval import RECALL_KS, evaluate_embeddings

log = logging.getLogger(__name__)

FOLDS = 5


def format_table(results: dict[str, dict]) -> str:
    """A text table of R@K / medr / meanr per direction and rsum, one block per result."""
    head = "".join(f"{'R@' + str(k):>7}" for k in RECALL_KS) + f"{'medr':>7}{'meanr':>8}"
    lines = []
    for name, m in results.items():
        lines.append(f"{name:<24}{head}")
        for direction, label in (("i2t", "image->text"), ("t2i", "text->image")):
            values = "".join(f"{m[f'r{k}_{direction}']:>7.1f}" for k in RECALL_KS)
            lines.append(f"  {label:<22}{values}{m[f'medr_{direction}']:>7.1f}"
                         f"{m[f'meanr_{direction}']:>8.1f}")
        lines.append(f"  {'rsum':<22}{m['rsum']:>7.1f}")
    return "\n".join(lines)


def evaluate(checkpoints: list[str | Path], config_files=(), overrides=(),
             out: str | Path | None = None) -> dict:
    """Evaluate ``checkpoints`` (an ensemble if several) on ``data.eval_split``.

    The data config starts from the first checkpoint's and is changed by ``config_files``
    and ``overrides`` (e.g. ``data.eval_split=testall``, ``eval.fold5=true``). The record
    is appended to ``out`` (default: ``metrics.jsonl`` beside the first checkpoint) and
    returned.
    """
    if not checkpoints:
        raise UserError("no checkpoint given; pass --ckpt PATH (repeat it for an ensemble)")
    states = [load_checkpoint(p) for p in checkpoints]
    config = load_config(config_files, overrides,
                         base=Config.from_dict(states[0]["config"], str(checkpoints[0])))
    split = open_split(config.dataset_dir(), config.data.eval_split)
    folds = FOLDS if config.eval.fold5 else 1
    if folds > 1 and split.num_images % folds:
        raise UserError(f"eval.fold5 needs a split of 5 equal folds (COCO's testall: 5000 "
                        f"images); {config.data.eval_split} of {config.dataset_dir()} has "
                        f"{split.num_images} images")
    device = resolve_device(config.train.device)
    imgs, caps, hashes = [], [], []
    for path, state in zip(checkpoints, states, strict=True):
        trained_on = state["data_fingerprint"]["dataset"]
        if trained_on != config.data.name:
            log.info("%s was trained on %s; evaluating on %s", path, trained_on,
                     config.data.name)
        model, vocab = model_from_checkpoint(state, str(path))
        model.to(device)
        img, cap = encode_split(model, split, vocab, device, workers=config.data.workers,
                                desc=f"encode {config.data.eval_split} ({Path(path).name})")
        imgs.append(img)
        caps.append(cap)
        hashes.append(weights_hash(state["state_dict"]))
    metrics = evaluate_embeddings(imgs, caps, folds=folds, block_size=config.eval.block_size)
    record = {"stage": "eval", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "checkpoints": [str(p) for p in checkpoints], "weights": hashes,
              "epoch": states[0]["epoch"], "dataset": config.data.name,
              "split": config.data.eval_split,
              "protocol": f"{folds}fold" if folds > 1 else "all",
              "images": split.num_images // folds, **metrics}
    out = Path(out) if out else Path(checkpoints[0]).parent / "metrics.jsonl"
    append_jsonl(out, record)
    name = "ensemble" if len(checkpoints) > 1 else Path(checkpoints[0]).parent.name
    protocol = (f"{folds}-fold {split.num_images // folds}" if folds > 1
                else f"{split.num_images} images")
    print(f"\n{config.data.name} {config.data.eval_split} ({protocol})")
    print(format_table({name: metrics}))
    log.info("appended to %s", out)
    return record
