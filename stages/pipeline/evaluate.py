"""The eval stage: R@1/5/10, medr, meanr and rsum of one checkpoint or an ensemble.

Protocols: the whole split (Flickr30K's 1K test; COCO 5K on ``testall``) or, with
``eval.fold5``, COCO's 5-fold 1K on ``testall`` (metrics averaged over folds, rsum
recomputed from the averaged recalls). Several checkpoints are evaluated as an ensemble:
the average of their similarity matrices.
"""

import contextlib
import logging
import time
from pathlib import Path

from stages.config.sections import Config, load_config
from stages.core.device import resolve_device
from stages.core.errors import UserError
from stages.data.captions import split_names
from stages.data.dataset import check_feature_dim
from stages.io.atomic import append_jsonl
from stages.io.checkpoint import load_checkpoint, weights_hash
from stages.io.lock import folder_lock
from stages.metrics.retrieval import RECALL_KS, evaluate_ranks, fold_ranks
from stages.models.encode import encode_split
from stages.models.restore import model_from_checkpoint
from stages.pipeline.inputs import open_model_split
from stages.pipeline.stamps import clear_record, settings_text, write_record

log = logging.getLogger(__name__)

FOLDS = 5
COCO_FOLD_IMAGES = 1000  # COCO's 5-fold protocol: 5 folds of 1000 images of its 5K test


def format_table(results: dict[str, dict]) -> str:
    """Metrics side by side: a row per metric, a column per named result."""
    names = list(results)
    width = max(10, *(len(n) + 2 for n in names))
    rows = [f"{'':<18}" + "".join(f"{n:>{width}}" for n in names)]
    for direction, label in (("i2t", "image->text"), ("t2i", "text->image")):
        for key, text in [*((f"r{k}", f"R@{k}") for k in RECALL_KS), ("medr", "medr"),
                          ("meanr", "meanr")]:
            values = "".join(f"{results[n][f'{key}_{direction}']:>{width}.1f}" for n in names)
            rows.append(f"{label + ' ' + text:<18}{values}")
    rows.append(f"{'rsum':<18}" + "".join(f"{results[n]['rsum']:>{width}.1f}" for n in names))
    return "\n".join(rows)


def run_name(checkpoints: list[str | Path]) -> str:
    """How a result is labelled in tables: the run folder's name, or 'ensemble'."""
    return "ensemble" if len(checkpoints) > 1 else Path(checkpoints[0]).parent.name


def evaluate(checkpoints: list[str | Path], config_files=(), overrides=(),
             out: str | Path | None = None, show: bool = True, ranks: bool = False) -> dict:
    """Evaluate ``checkpoints`` (an ensemble if several) on ``data.eval_split``.

    The data config starts from the first checkpoint's and is changed by ``config_files``
    and ``overrides`` (e.g. ``data.eval_split=testall``, ``eval.fold5=true``). The record
    is appended to ``out`` (default: ``metrics.jsonl`` beside the first checkpoint), holding
    its folder's lock, and returned; the settings of the last record appended are recorded
    beside ``out`` for make's stamps (make's table evaluates each cell into eval.jsonl).
    The record's ``captions_per_image`` says the split's caption layout
    (:meth:`~stages.core.layout.CaptionLayout.identity`: the common count, or a digest of
    the counts when they differ). ``ranks``: the record also holds every query's 0-based
    rank (``ranks``: ``{"i2t": [N], "t2i": [C]}``, each within its fold, with
    ``"caption_counts": [N]`` when images own different numbers of captions and ``"folds"``
    when there are several), for paired comparisons.
    """
    if not checkpoints:
        raise UserError("no checkpoint given; pass --ckpt PATH (repeat it for an ensemble)")
    states = [load_checkpoint(p) for p in checkpoints]
    config = load_config(config_files, overrides,
                         base=Config.from_dict(states[0]["config"], str(checkpoints[0]),
                                               stored=True))
    dataset_dir, eval_split = config.dataset_dir(), config.data.eval_split
    if dataset_dir.is_dir() and eval_split not in split_names(dataset_dir):
        raise UserError(f"data.eval_split={eval_split}: {dataset_dir} has no such split (its "
                        f"splits: {', '.join(split_names(dataset_dir)) or 'none'}); evaluate "
                        "another with --set data.eval_split=NAME (make ... "
                        "SET=data.eval_split=NAME)")
    split = open_model_split(config, config.data.eval_split, states[0]["model"])
    folds = FOLDS if config.eval.fold5 else 1
    if folds > 1 and split.num_images % folds:
        raise UserError(f"eval.fold5 needs a split of 5 equal folds (COCO's testall: 5000 "
                        f"images); {config.data.eval_split} of {config.dataset_dir()} has "
                        f"{split.num_images} images")
    if folds > 1 and split.num_images != FOLDS * COCO_FOLD_IMAGES:
        log.warning("eval.fold5: %s of %s has %d images, evaluated as %d folds of %d: not "
                    "COCO's 5-fold 1K protocol (5000 images, folds of %d), so the figures "
                    "are not comparable with published 1K ones; FOLD5=0 (eval.fold5=false) "
                    "evaluates the whole split", config.data.eval_split, config.dataset_dir(),
                    split.num_images, folds, split.num_images // folds, COCO_FOLD_IMAGES)
    out = Path(out) if out else Path(checkpoints[0]).parent / "metrics.jsonl"
    # The output's folder is locked before the work, so a refusal (a run training there)
    # comes at once, not after the encoding.
    with _output_lock(out):
        record = _evaluate(checkpoints, states, config, folds, out, ranks)
    log.info("appended to %s", out)
    if show:
        print_results({run_name(checkpoints): record})
    return record


@contextlib.contextmanager
def _output_lock(out: Path):
    """The lock of ``out``'s folder; a refusal says how to evaluate anyway."""
    held = False
    try:
        with folder_lock(out.parent, "aoq eval"):
            held = True
            yield
    except UserError as exc:
        if held:
            raise
        raise UserError(f"{exc}; or evaluate into another file: --out PATH") from None


def _evaluate(checkpoints, states, config: Config, folds: int, out: Path, ranks: bool) -> dict:
    """Encode the eval split with each checkpoint, rank, and append the record to ``out``
    (its folder's lock held)."""
    device = resolve_device(config.train.device)
    imgs, caps, hashes = [], [], []
    for path, state in zip(checkpoints, states, strict=True):
        split = open_model_split(config, config.data.eval_split, state["model"])
        trained_on = state["data_fingerprint"].get("dataset")
        if trained_on != config.data.name:
            log.info("%s was trained on %s; evaluating on %s", path, trained_on,
                     config.data.name)
        check_feature_dim(split, state["model"]["args"].get("img_dim", split.features.feature_dim),
                          path)
        model, tokenizer = model_from_checkpoint(state, str(path))
        model.to(device)
        model.use_cache_folder(config.text_cache_folder())
        try:
            img, cap = encode_split(model, split, tokenizer, device,
                                    workers=config.data.workers,
                                    desc=f"encode {config.data.eval_split} ({Path(path).name})",
                                    precision=config.eval.precision)
        finally:
            model.save_cache()
        imgs.append(img)
        caps.append(cap)
        hashes.append(weights_hash(state["state_dict"]))
    layout = split.layout  # the eval split's, whichever checkpoint opened it
    i2t_ranks, t2i_ranks = fold_ranks(imgs, caps, layout, folds=folds,
                                      block_size=config.eval.block_size)
    metrics = evaluate_ranks(i2t_ranks, t2i_ranks, layout, folds)
    record = {"stage": "eval", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "checkpoints": [str(p) for p in checkpoints], "weights": hashes,
              "epoch": states[0]["epoch"], "dataset": config.data.name,
              "split": config.data.eval_split,
              "protocol": f"{folds}fold" if folds > 1 else "all",
              "images": split.num_images // folds,
              "captions_per_image": layout.identity(), **metrics}
    if ranks:
        record["ranks"] = {"i2t": i2t_ranks.tolist(), "t2i": t2i_ranks.tolist()}
        if layout.per_image is None:
            record["ranks"]["caption_counts"] = layout.counts.tolist()
        if folds > 1:
            record["ranks"]["folds"] = folds
    clear_record(out)
    append_jsonl(out, record)
    write_record(out, settings_text(config, "eval"))  # its last record's settings
    return record


def print_results(records: dict[str, dict]) -> None:
    """Print eval records (of one dataset, split and protocol) as one table."""
    first = next(iter(records.values()))
    protocol = (f"{FOLDS} folds of {first['images']} images" if first["protocol"] == "5fold"
                else f"{first['images']} images")
    print(f"\n{first['dataset']} {first['split']} ({protocol})")
    print(format_table(records))
