"""``aoq``: one command line for every stage; the Makefile calls these sub-commands."""

import logging
import sys
from pathlib import Path

import click

from stages.config.sections import load_config, retrain_defaults, set_value
from stages.core.errors import UserError
from stages.core.log import setup_logging
from stages.pipeline.stamps import STAMPED_STAGES

log = logging.getLogger("aoq")


def config_options(func):
    """``--config FILE`` (repeatable, applied in order) and ``--set key=value`` (repeatable)."""
    func = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help="Override one config value, e.g. --set train.lr=5e-4 "
                             "(or a bare key that one section has: --set lr=5e-4).")(func)
    func = click.option("--config", "config_files", multiple=True,
                        type=click.Path(dir_okay=False, path_type=Path),
                        help="YAML config under configs/; repeat to layer several.")(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Image-text retrieval with offline hard negatives (AOQ over VSE++), stage by stage."""
    setup_logging()


@cli.command()
@config_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the vocabulary (default: data.vocab or "
                   "<data.path>/<data.name>/vocab.json).")
@click.option("--threshold", default=4, show_default=True,
              help="Keep words seen at least this often in the training captions.")
def vocab(config_files, overrides, out, threshold) -> None:
    """Build the vocabulary from the training captions only."""
    from stages.data.vocab import build_vocab_file
    from stages.io.lock import folder_lock
    from stages.pipeline.stamps import clear_record, settings_text, write_record

    config = load_config(config_files, overrides)
    captions = config.dataset_dir() / f"{config.data.train_split}_caps.txt"
    if not captions.is_file():
        raise UserError(f"training captions {captions} not found; check DATA_PATH and DATA")
    out = out or config.vocab_path()
    with folder_lock(out.parent, "aoq vocab", name=f".{out.name}.lock"):
        clear_record(out)
        build_vocab_file(captions, out, threshold)
        write_record(out, settings_text(config, "vocab"))


@cli.command()
@config_options
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run folder (default: runs/<data.name>/base).")
@click.option("--resume", is_flag=True,
              help="Continue the run in --run-dir from its last.pt (or start it if it has "
                   "none); without it an existing run folder is refused.")
@click.option("--refused-hint", default="",
              help="What to advise instead when --resume refuses the run (other settings "
                   "or data); make's table passes how to start its cells over.")
def train(config_files, overrides, run_dir, resume, refused_hint) -> None:
    """Train a base model with online hard negatives (VSE++)."""
    from stages.pipeline.train import default_run_dir
    from stages.pipeline.train import train as run_training

    config = load_config(config_files, overrides)
    run_training(config, run_dir or default_run_dir(config, "train"), resume=resume,
                 refused_hint=refused_hint)


@cli.command(name="eval")
@config_options
@click.option("--ckpt", "checkpoints", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Checkpoint to evaluate; repeat for an ensemble (averaged similarities).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="metrics.jsonl to append to (default: beside the first checkpoint).")
@click.option("--each", is_flag=True,
              help="Evaluate the checkpoints one by one and print them side by side, "
                   "instead of as an ensemble.")
@click.option("--ranks", is_flag=True,
              help="Also store every query's rank in the record (for paired comparisons: "
                   "`aoq table`'s bootstrap reads them).")
def evaluate(config_files, overrides, checkpoints, out, each, ranks) -> None:
    """Recall@K, medr, meanr, rsum on data.eval_split (eval.fold5 for COCO 5-fold 1K)."""
    from stages.pipeline.evaluate import evaluate as run_eval
    from stages.pipeline.evaluate import print_results, run_name

    if not each:
        run_eval(list(checkpoints), config_files, overrides, out, ranks=ranks)
        return
    records = {run_name([c]): run_eval([c], config_files, overrides, out, show=False,
                                       ranks=ranks)
               for c in checkpoints}
    print_results(records)


@cli.command()
@config_options
@click.option("--ckpt", "checkpoint", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The model to embed with.")
@click.option("--split", default="", help="Split to embed (default: data.train_split).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output HDF5 (default: embeddings_<split>.h5 beside the checkpoint).")
@click.option("--shard", default="", metavar="I/N",
              help="Embed shard I of N (0-based): a contiguous range of the images and "
                   "their captions, into <out stem>.shard-I-of-N.h5; a shard already "
                   "written by the same model is kept. `aoq offcandi` reads the N files as "
                   "one.")
def embed(config_files, overrides, checkpoint, split, out, shard) -> None:
    """Embed every image and caption of a split (or a shard of it), unshuffled, into one
    HDF5 file."""
    from stages.mining.embedding_files import parse_shard
    from stages.pipeline.embed import embed as run_embed

    run_embed(checkpoint, split, config_files, overrides, out,
              shard=parse_shard(shard) if shard else None)


@cli.command(name="embed-text")
@config_options
@click.option("--text-model", required=True,
              help="A Hugging Face sentence encoder folder (or hub name), e.g. "
                   "/models/all-MiniLM-L6-v2.")
@click.option("--split", default="", help="Split to embed (default: data.train_split).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The embeddings file to write (then `aoq offcandi --embeddings` it).")
def embed_text_command(config_files, overrides, text_model, split, out) -> None:
    """Embed a split's captions with a pretrained text model (images: the mean of their
    captions), to mine offline negatives without a trained model."""
    from stages.pipeline.embed_text import embed_text

    config = load_config(config_files, overrides)
    embed_text(text_model, config.dataset_dir(), config.data.name,
               split or config.data.train_split, out)


@cli.command(name="embed-clip")
@config_options
@click.option("--arch", required=True,
              help="An open_clip architecture (e.g. ViT-B-32), a TinyCLIP name this package "
                   "ships or a model-config JSON file: as model.arch of the clip model.")
@click.option("--weights", required=True,
              help="The open_clip checkpoint file of that architecture "
                   "(.bin/.pt/.safetensors).")
@click.option("--split", default="", help="Split to embed (default: data.train_split).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The embeddings file to write (then `aoq offcandi --embeddings` it).")
def embed_clip_command(config_files, overrides, arch, weights, split, out) -> None:
    """Embed a split's images (data.images) and captions with a pretrained open_clip
    model, to mine offline negatives without a trained model."""
    from stages.pipeline.embed_clip import embed_clip

    config = load_config(config_files, overrides)
    embed_clip(arch, weights, config, split or config.data.train_split, out)


@cli.command(name="export")
@config_options
@click.option("--ckpt", "checkpoint", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The model to export.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Export folder (default: export/<format>/ beside the checkpoint).")
@click.option("--format", "fmt", default="torchscript", show_default=True,
              help="torchscript (torch.jit.load) or onnx (onnxruntime).")
@click.option("--force", is_flag=True,
              help="Replace an earlier export at --out (a folder holding its export.json; "
                   "nothing else is ever replaced).")
@click.option("--tolerance", type=float, default=1e-4, show_default=True,
              help="Largest abs difference allowed between the exported encoders' and the "
                   "checkpoint's embeddings.")
def export_command(config_files, overrides, checkpoint, out, fmt, force, tolerance) -> None:
    """Write the image and caption encoders (TorchScript or ONNX), the vocabulary and
    export.json, checked against the checkpoint's embeddings."""
    from stages.pipeline.export import export

    export(checkpoint, out, fmt, force, tolerance, config_files, overrides)


@cli.command(name="export-check")
@config_options
@click.option("--dir", "folder", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="An export folder.")
@click.option("--ckpt", "checkpoint", type=click.Path(dir_okay=False, path_type=Path),
              help="The checkpoint it was exported from (default: the one export.json names).")
@click.option("--tolerance", type=float, help="Default: the one the export used.")
def export_check(config_files, overrides, folder, checkpoint, tolerance) -> None:
    """Check an export folder again: its encoders against the checkpoint's embeddings."""
    from stages.pipeline.export import check_export

    check_export(folder, checkpoint, tolerance, config_files, overrides)


@cli.command()
@config_options
@click.option("--embeddings", required=True, multiple=True,
              help="Training-split embeddings from `aoq embed`; of a split embedded in "
                   "shards (`aoq embed --shard i/n`): its shard files (repeat the option, "
                   "or a quoted glob), or the unsharded name, whose shards are found.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where i2t.h5 and t2i.h5 go (default: offcandi.dir or "
                   "offcandi/<dataset>).")
def offcandi(config_files, overrides, embeddings, out_dir) -> None:
    """Mine offline hard-negative candidates (i2t, t2i) with FAISS."""
    from stages.pipeline.offcandi import offcandi as run_offcandi

    config = load_config(config_files, overrides)
    run_offcandi(list(embeddings), out_dir or config.candidates_dir(), config.offcandi)


@cli.command(name="offcandi-import")
@config_options
@click.option("--i2t", "i2t_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="AOQ's published i2t_<data>.npy, int32 (N, K).")
@click.option("--t2i", "t2i_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="AOQ's published t2i_<data>.npy, int32 (5N, K).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Default: offcandi.dir or offcandi/<data.name>.")
def offcandi_import(config_files, overrides, i2t_file, t2i_file, out_dir) -> None:
    """Convert AOQ's published candidate .npy files, checked against the dataset."""
    from stages.pipeline.import_candidates import import_published

    config = load_config(config_files, overrides)
    import_published(i2t_file, t2i_file, config, out_dir or config.candidates_dir())


@cli.command(name="inspect")
@config_options
@click.option("--candidates", "folder", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Candidate folder holding i2t.h5 and t2i.h5 (e.g. offcandi/f30k_precomp).")
@click.option("--image", type=int, help="Show this training image's candidate captions.")
@click.option("--caption", type=int, help="Show this training caption's candidate images.")
@click.option("--top", default=10, show_default=True, help="How many candidates to show.")
@click.option("--false-negative-ratio", "ratio", type=str,
              help="Short for --set offcandi.false_negative_ratio=...: mark candidates "
                   "scoring above this x the query's positive score (0: no marks). The "
                   "other filters: --set offcandi.false_negative_margin / duplicate_overlap "
                   "/ skip_top.")
def inspect_command(config_files, overrides, folder, image, caption, top, ratio) -> None:
    """Print one query's offline candidates with their captions and scores, marked by the
    false-negative filters (offcandi.*) retraining would apply."""
    from stages.mining.selection import SelectionRules
    from stages.pipeline.inspect import inspect_caption, inspect_image

    if (image is None) == (caption is None):
        raise UserError("give one of --image N or --caption N")
    if top < 1:
        raise UserError(f"--top {top}: must be at least 1")
    config = load_config(config_files, overrides)
    if ratio is not None:  # checked as the config checks it (a finite number >= 0)
        set_value(config, "offcandi.false_negative_ratio", ratio,
                  f"--false-negative-ratio {ratio}")
    show = inspect_image if image is not None else inspect_caption
    click.echo(show(folder, image if image is not None else caption, config.data.path,
                    top=top, rules=SelectionRules.from_config(config.offcandi),
                    hardest=config.offcandi.hardest))


@cli.command(name="plot")
@config_options
@click.option("--candidates", "candidate_dirs", multiple=True, required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Candidate folder of a round (i2t.h5, t2i.h5); repeat for each round, "
                   "in order (offcandi/DATA, offcandi/DATA/round2, ...).")
@click.option("--embeddings", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The training embeddings each --candidates was mined from, in the same "
                   "order (default: the path the candidate files record).")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the PNGs and diagnostics.json go (e.g. runs/DATA/compare).")
@click.option("--rank-sample", default=1000, show_default=True,
              help="Images (and their captions) whose positive rank is computed.")
@click.option("--online-batches", default=160, show_default=True,
              help="Random batches of train.batch_size in which hardest online negatives "
                   "are found.")
@click.option("--seed", default=0, show_default=True)
def plot_command(config_files, overrides, candidate_dirs, embeddings, out_dir, rank_sample,
                 online_batches, seed) -> None:
    """PNG figures: positive vs online vs offline negative similarities, positive ranks,
    across rounds."""
    from stages.pipeline.plot import plot

    # The retrain stage's settings (RETRAIN_SET reaches plot too): its sampling range.
    config = load_config(config_files, overrides, base=retrain_defaults(),
                         retrain=True)
    plot(list(candidate_dirs), list(embeddings), config, out_dir, rank_sample,
         online_batches, seed)


@cli.command()
@config_options
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run folder (default: runs/<data.name>/aoq).")
@click.option("--resume", is_flag=True, help="As for train.")
def retrain(config_files, overrides, run_dir, resume) -> None:
    """Train with offline hard negatives: loss.name defaults to aoq; any loss may be used
    (offline negatives then join its reference set)."""
    from stages.pipeline.train import default_run_dir
    from stages.pipeline.train import train as run_training

    config = load_config(config_files, overrides, base=retrain_defaults(),
                         retrain=True)
    if not config.train.offline_negatives:
        raise UserError("retrain trains with offline negatives; for a model without them "
                        "use `aoq train`")
    run_training(config, run_dir or default_run_dir(config, "retrain"), resume=resume)


@cli.command()
@config_options
@click.option("--stage", required=True,
              type=click.Choice(STAMPED_STAGES),
              help="The stage whose settings to write (retrain starts from the retrain "
                   "defaults, as `aoq retrain` does; features: those of the feature "
                   "command given after --).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The stamp file: it holds the settings asked for, and is dated after "
                   "--target when that was made with others.")
@click.option("--target", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The stage's output, whose stage recorded the settings it made it with.")
@click.option("--retrain-set", "retrain_overrides", multiple=True, metavar="KEY=VALUE",
              help="make's RETRAIN_SET: an override of the retrain stage only, applied "
                   "after --set; a key the retrain stage does not read is refused.")
@click.argument("feature_command", nargs=-1, metavar="[-- cnn|tsv OPTIONS]")
def settings(config_files, overrides, stage, out, target, retrain_overrides,
             feature_command) -> None:
    """Write the resolved settings a stage reads (the Makefile's stamp for that stage),
    dated so that make redoes the stage exactly when its output was made with others."""
    from stages.pipeline.stamps import (
        check_retrain_set,
        read_record,
        run_stage,
        settings_text,
        stamp_text,
        update_stamp,
    )

    if retrain_overrides and stage != "retrain":
        raise UserError(f"--retrain-set is for --stage retrain, not {stage}")

    if stage == "features":
        from stages.features.identity import recorded_identity

        identity = _feature_identity(feature_command)
        made_with = recorded_identity(target, identity)
        update_stamp(out, stamp_text(stage, {"features": identity}), target,
                     None if made_with is None else stamp_text(stage, {"features": made_with}))
        return
    retrain = stage == "retrain"
    base = retrain_defaults() if retrain else None
    config = load_config(config_files, overrides, base=base, retrain=retrain)
    if retrain_overrides:
        without = config
        config = load_config(config_files, [*overrides, *retrain_overrides], base=base,
                             retrain=True)
        check_retrain_set(without, config)
    if stage in ("train", "retrain"):
        stage = run_stage(config)
    update_stamp(out, settings_text(config, stage), target, read_record(target))


@cli.command(name="model-input")
@config_options
def model_input(config_files, overrides) -> None:
    """Print what the config's model reads: features (the dataset folder's features) or
    pixels (raw images, by {split}_images.txt); make asks, to know a training run's input.
    Needs no torch once the options are cached."""
    from stages.config.options import image_input

    click.echo(image_input(load_config(config_files, overrides).model.name))


@cli.command()
@config_options
def rounds(config_files, overrides) -> None:
    """Print the config's mining-round recipe as make reads it: the number of rounds and
    what each round's retraining starts from (rounds.count, rounds.retrain_init), e.g.
    "2 miner". Needs no torch once the options are cached."""
    recipe = load_config(config_files, overrides).rounds
    click.echo(f"{recipe.count} {recipe.retrain_init}")


def _feature_identity(command: tuple[str, ...]) -> dict:
    """What the features command ``aoq features COMMAND`` records in the files it makes."""
    from stages.features.identity import cnn_identity, tsv_identity

    name, *args = command or ("",)
    if name not in ("cnn", "tsv"):
        raise UserError("aoq settings --stage features: give the feature command after --, "
                        "e.g. -- cnn --images DIR --dataset-dir DIR --arch resnet152")
    p = features.commands[name].make_context(f"aoq features {name}", list(args)).params
    if name == "cnn":
        return cnn_identity(p["images"], p["arch"], p["weights"], p["grid"], p["seed"],
                            int(p["crops"]), p["crop_size"], p["dtype"])
    return tsv_identity(p["tsv_files"], p["max_regions"], p["feature_dim"], p["dtype"])


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Dataset folder to write {split}_caps.txt, _ids.txt, _images.txt into.")
@click.option("--karpathy", type=click.Path(dir_okay=False, path_type=Path),
              help="Karpathy split file: dataset_coco.json, dataset_flickr30k.json, ...")
@click.option("--restval", type=click.Choice(["train", "apart"]), default="train",
              show_default=True,
              help="Karpathy COCO's restval images: folded into train (as SCAN's 113,287 "
                   "training images) or kept as a split of their own.")
@click.option("--coco-json", "coco_json", multiple=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="COCO caption JSON (captions_train2014.json ...); repeatable.")
@click.option("--split", "split_ids", multiple=True, metavar="NAME=IDS_FILE",
              help="With --coco-json: a split and its file of COCO image ids; repeatable. "
                   "Default: one split per JSON file, named from it (train/dev/test).")
@click.option("--captions-per-image", type=int, default=5, show_default=True,
              help="Captions each image keeps: its first k (fewer is an error; 5 is the "
                   "benchmarks' protocol), or 0 to keep all of them.")
def captions(out, karpathy, restval, coco_json, split_ids, captions_per_image) -> None:
    """Write captions, image ids and image paths per split from the annotation sources."""
    from stages.features.annotations import coco_splits, karpathy_splits, write_splits

    if bool(karpathy) == bool(coco_json):
        raise UserError("give either --karpathy FILE or --coco-json FILE (not both)")
    if karpathy:
        splits = karpathy_splits(karpathy, restval_into_train=restval == "train",
                                 captions_per_image=captions_per_image)
    else:
        named = {}
        for text in split_ids:
            if "=" not in text:
                raise UserError(f"--split {text!r}: expected NAME=IDS_FILE, e.g. "
                                "--split train=coco_train_ids.txt")
            name, path = text.split("=", 1)
            named[name] = path
        splits = coco_splits(list(coco_json), named, captions_per_image)
    write_splits(splits, out)


@cli.group()
def features() -> None:
    """Image features into the dataset folder's {split}.h5 (BUTD TSV, CNN, precomp .npy)."""


def _splits_option(func):
    return click.option("--splits", default="",
                        help="Comma-separated splits (default: every split the folder "
                             "lists).")(func)


def _dtype_option(func):
    return click.option("--dtype", type=click.Choice(["float32", "float16"]),
                        default="float32", show_default=True,
                        help="Stored feature type; float16 halves the file.")(func)


@features.command(name="tsv")
@click.option("--tsv", "tsv_files", multiple=True, required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="BUTD feature TSV; repeat for releases split over several files.")
@click.option("--dataset-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Dataset folder holding {split}_ids.txt; {split}.h5 are written there.")
@_splits_option
@click.option("--max-regions", default=36, show_default=True,
              help="Regions stored per image (images with fewer are padded, their count "
                   "kept); the adaptive 10-100 release needs 100.")
@click.option("--feature-dim", default=2048, show_default=True)
@_dtype_option
def features_tsv(tsv_files, dataset_dir, splits, max_regions, feature_dim, dtype) -> None:
    """Bottom-up-attention region features from TSV, streamed, resumable."""
    from stages.data.splits import listed_splits
    from stages.features.butd_tsv import tsv_to_hdf5

    names = [s for s in splits.split(",") if s] or listed_splits(dataset_dir)
    tsv_to_hdf5(list(tsv_files), dataset_dir, names, max_regions, feature_dim, dtype)


@features.command(name="cnn")
@click.option("--images", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Image root; {split}_images.txt paths are relative to it.")
@click.option("--dataset-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Dataset folder holding {split}_images.txt and _ids.txt (`aoq captions`).")
@_splits_option
@click.option("--arch", default="resnet152", show_default=True,
              help="resnet152 (2048-d), vgg19 (4096-d), mobilenet_v3_large (1280-d), "
                   "resnet101/50/18, efficientnet_lite0 (1280-d; needs timm).")
@click.option("--weights", default="imagenet", show_default=True,
              help="A state-dict file, 'imagenet' (torchvision's cache) or 'random' (tests).")
@click.option("--crops", type=click.Choice(["1", "10"]), default="1", show_default=True,
              help="Center crop, or 10 crops (corners, center, mirrored) averaged.")
@click.option("--grid", is_flag=True,
              help="Store the last conv map as regions (e.g. 49 x 2048) instead of a vector.")
@click.option("--crop-size", default=224, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--workers", default=4, show_default=True,
              help="Image decoding processes (at most the cores this process may use).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@_dtype_option
@click.option("--on-bad-image", type=click.Choice(["fail", "skip"]), default="fail",
              show_default=True,
              help="An unreadable image stops the run, or is dropped from the split with its "
                   "captions (listed in {split}_skipped.txt).")
@click.option("--seed", default=0, show_default=True,
              help="Seed of the network drawn by --weights random (recorded in the file).")
def features_cnn(images, dataset_dir, splits, arch, weights, crops, grid, crop_size,
                 batch_size, workers, device, dtype, on_bad_image, seed) -> None:
    """CNN features of raw images (torchvision), batched, resumable."""
    from stages.data.splits import listed_splits
    from stages.features.cnn import cnn_features

    names = [s for s in splits.split(",") if s] or listed_splits(dataset_dir)
    cnn_features(images, dataset_dir, names, arch, weights, int(crops), grid, crop_size,
                 batch_size, workers, device, dtype, on_bad_image, seed)


@features.command(name="precomp")
@click.option("--dataset-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="SCAN/VSE++ precomp folder; each {split}_ims.npy becomes {split}.h5.")
@_splits_option
@_dtype_option
def features_precomp(dataset_dir, splits, dtype) -> None:
    """Convert a precomp folder's .npy features into the HDF5 layout, streamed."""
    from stages.features.precomp import precomp_to_hdf5

    precomp_to_hdf5(dataset_dir, [s for s in splits.split(",") if s] or None, dtype)


@cli.command()
@click.option("--dir", "table_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="The table folder: one run folder per cell, <loss>-<off|on>-b<batch>/.")
@click.option("--losses", required=True, help="Loss names, e.g. 'vse_max infonce aoq'.")
@click.option("--batches", required=True, help="Batch sizes, e.g. '128 256'.")
@click.option("--miner", default="vse_max", show_default=True,
              help="The loss whose model without offline negatives mines the candidates of "
                   "each batch size's 'on' cells.")
@click.option("--seeds", default=1, show_default=True,
              help="Train every cell with train.seed 0..N-1 and report means, the std over "
                   "seeds and paired bootstrap intervals.")
@click.option("--init", default="", help="Every cell continues from this checkpoint, which "
                                         "also mines the offline negatives (default: from "
                                         "scratch, mined by the --miner cell).")
@click.option("--mined-by", default="",
              help="What mined the 'on' cells' candidates, a checkpoint, text:<model "
                   "folder> or clip:<arch>:<weights file> (default: --init, else the "
                   "--miner cell).")
@click.option("--plan", is_flag=True,
              help="Only print the cells' folder names (one line) and exit.")
def table(table_dir, losses, batches, miner, seeds, init, mined_by, plan) -> None:
    """Loss x offline negatives x batch size x seed: table.md, table.csv, pairs.csv and
    table.png from the cells' checkpoints and eval records (`make table` trains and
    evaluates the cells); each offline cell is paired with its matched control."""
    from stages.pipeline.table import parse_batches, plan_cells, split_words, write_table

    if plan:
        cells = plan_cells(split_words(losses), parse_batches(batches), miner, seeds)
        print(" ".join(c.name for c in cells))
        return
    write_table(table_dir, split_words(losses), parse_batches(batches), miner, seeds, init,
                mined_by)


@cli.command(name="demo-data")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Dataset folder to write (precomp layout).")
@click.option("--train-images", default=5000, show_default=True)
@click.option("--dev-images", default=500, show_default=True)
@click.option("--test-images", default=1000, show_default=True)
@click.option("--testall-images", default=0, show_default=True,
              help="Also write a COCO-style testall split (5 folds) of this many images.")
@click.option("--feature-dim", default=256, show_default=True)
@click.option("--seed", default=0, show_default=True)
def demo_data(out, train_images, dev_images, test_images, testall_images, feature_dim,
              seed) -> None:
    """Generate the synthetic demo dataset (scenes, region features, 5 captions each)."""
    from stages.data.synthetic import write_synthetic_dataset

    splits = {"train": train_images, "dev": dev_images, "test": test_images}
    if testall_images:
        splits["testall"] = testall_images
    write_synthetic_dataset(out, splits, seed=seed, feature_dim=feature_dim)


def main() -> None:
    """Entry point: user errors print one clear line and exit with status 2."""
    try:
        cli(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        log.error("interrupted; outputs are written atomically, rerun (with --resume for "
                  "train) to continue")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UserError as exc:
        log.error("%s", exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
