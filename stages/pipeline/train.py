"""The train and retrain stages: a model trained with online hard negatives (VSE++), or with
offline hard negatives from candidate files as well (``train.offline_negatives``; AOQ).

Run folder ``runs/<DATA>/<run>/``: ``config.yaml`` (resolved), ``train.log``,
``metrics.jsonl`` (one line per validation), ``last.pt`` (to resume), ``best.pt`` (best dev
score: rsum, or R@1 + R@5 with ``train.select=r1r5``) and, once training has finished,
``checkpoint.pt`` (the best model): the file that ``make`` and the later stages take as the
stage's output; with ``offcandi.remine_every``, ``remined/epoch-<k>/`` (candidates mined by
the run, :mod:`stages.pipeline.remine`). The loop itself is :mod:`stages.training.loop`; this module
checks the inputs, builds the parts and owns the run folder.
"""

import copy
import logging
import shutil
from pathlib import Path

import torch
import yaml

from stages.config.sections import Config, config_diff
from stages.core.device import resolve_device
from stages.core.errors import UserError
from stages.core.log import setup_logging
from stages.data.dataset import Split, check_compatible
from stages.data.tokenizers import CaptionTokenizer
from stages.data.vocab import Vocab, file_sha256
from stages.io.atomic import atomic_path, write_text
from stages.io.checkpoint import load_checkpoint, weights_hash
from stages.io.lock import LOCK_NAME, folder_lock
from stages.io.scalars import ScalarWriter
from stages.losses import LOSSES, build_loss
from stages.metrics.retrieval import evaluate_embeddings
from stages.mining.sampler import OfflineNegativeSampler
from stages.mining.selection import CaptionWords, SelectionRules, load_selections
from stages.models import MODELS, build_model
from stages.models.encode import encode_split
from stages.models.restore import same_model, with_legacy_options
from stages.pipeline.embed import split_attrs
from stages.pipeline.inputs import open_model_split
from stages.pipeline.miners import miner_weights
from stages.pipeline.remine import LoadSelections, Reminer, mining_options
from stages.pipeline.stamps import (
    clear_record,
    run_stage,
    settings_text,
    stage_settings,
    write_record,
)
from stages.training.distributed import is_main, world_size
from stages.training.loop import Trainer
from stages.training.tasks import OfflineTask, PairTask

log = logging.getLogger(__name__)

# Besides the settings that never change a result (paths, device, workers: see
# stages.pipeline.stamps), a resumed run may change its number of epochs (not below those done);
# anything else would make the result a mix of two experiments.
RESUMABLE_CHANGES = {"train.epochs"}


def data_fingerprint(config: Config, tokenizer_sha256: str, train_split: Split) -> dict:
    """What identifies the data a model was trained on (checked by later stages and by a
    resume): the captions, the caption tokenizer (``vocab_sha256``: the vocabulary file's
    hash, or a pretrained tokenizer's) and the features of the training split."""
    dataset_dir = config.dataset_dir()
    return {
        "dataset": config.data.name,
        "train_split": config.data.train_split,
        "num_train_images": train_split.num_images,
        "train_captions_sha256": file_sha256(dataset_dir / f"{config.data.train_split}_caps.txt"),
        "vocab_sha256": tokenizer_sha256,
        "train_features": train_split.features.fingerprint(),
    }


def _absolute_paths(config: Config) -> None:
    """Store data paths absolute, so a checkpoint used from another folder reads the data
    it was trained on, not whatever lies at the same relative path there."""
    config.data.path = str(Path(config.data.path).resolve())
    if config.data.vocab:
        config.data.vocab = str(Path(config.data.vocab).resolve())
    if config.data.images:
        config.data.images = str(Path(config.data.images).resolve())


def _prepare_run_dir(run_dir: Path, config: Config, resume: bool,
                     refused_hint: str = "") -> dict | None:
    """Create or reopen the run folder; returns the state to resume from, if any.
    ``refused_hint``: what to advise when the run was made with other settings."""
    last = run_dir / "last.pt"
    if run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        if not resume:
            raise UserError(f"run folder {run_dir} already exists; pass --resume to continue "
                            "it, or choose another --run-dir")
        if not last.exists():
            log.info("%s has no last.pt yet: starting the run from scratch", run_dir)
            return None
        state = load_checkpoint(last)
        stage = run_stage(config)
        stored = dict(state["config"])  # with the options its model has gained since
        stored["model"] = with_legacy_options(stored["model"]["name"], stored["model"])
        before = stage_settings(Config.from_dict(stored, str(last), stored=True), stage)
        changed = [d for d in config_diff(before, stage_settings(config, stage))
                   if d.split(":")[0] not in RESUMABLE_CHANGES]
        if changed:
            raise UserError(f"cannot resume {run_dir}: it was made with other settings: "
                            f"{'; '.join(changed)}. " + (
                                refused_hint or "For a new experiment choose another run "
                                "name (make ... RUN=<name> for train, AOQ_RUN=<name> for "
                                f"retrain; --run-dir for aoq), or delete {run_dir} to redo "
                                "it"))
        if config.train.epochs < state["epoch"]:
            raise UserError(f"cannot resume {run_dir} with train.epochs={config.train.epochs}: "
                            f"it has already trained {state['epoch']} epochs; give "
                            f"train.epochs >= {state['epoch']}, or use another run folder")
        return state
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def _caption_tokenizer(config: Config) -> tuple[CaptionTokenizer, str]:
    """The tokenizer the model reads and its hash: a pretrained one the model names, else
    our vocabulary (checked to be of the training captions)."""
    tokenizer = MODELS.class_of(config.model.name).caption_tokenizer(config.model.options())
    if tokenizer is not None:
        return tokenizer, tokenizer.sha256()
    vocab_path = config.vocab_path()
    vocab = Vocab.load(vocab_path)
    vocab.check_built_from(config.dataset_dir() / f"{config.data.train_split}_caps.txt",
                           vocab_path)
    return vocab, file_sha256(vocab_path)


def _offline_task(config: Config, split: Split, tokenizer: CaptionTokenizer,
                  fingerprint: dict) -> tuple[OfflineTask, LoadSelections]:
    """Pairs plus negatives from checked candidate files (and a second source mixed in,
    ``offcandi.mix_dir``); records them in the fingerprint. Also returns how a candidate
    folder is loaded and filtered for this run, given its miner's weights hash (what
    re-mining loads)."""
    o = config.offcandi
    rules = SelectionRules.from_config(o)
    words = CaptionWords(split.captions) if rules.duplicate_overlap else None

    def load(folder, weights: str) -> tuple[dict, dict]:
        return load_selections(folder, config.data.name, split, o.hardest, weights, rules,
                               words)

    def selections_of(folder, base_ckpt: str) -> tuple[dict, dict]:
        return load(folder, miner_weights(base_ckpt) if base_ckpt else "")

    selections, fingerprint["candidates"] = selections_of(config.candidates_dir(),
                                                          o.base_ckpt)
    mix = None
    if o.mix_dir:
        mixed, fingerprint["candidates_mix"] = selections_of(o.mix_dir, o.mix_base_ckpt)
        mix = (mixed["i2t"], mixed["t2i"])
        log.info("%.0f%% of the captions draw their offline negatives from %s",
                 100 * o.mix_share, o.mix_dir)
    sampler = OfflineNegativeSampler(selections["i2t"], selections["t2i"], o.hardest,
                                     config.train.seed, o.curriculum_epochs, mix, o.mix_share)
    return OfflineTask(split, tokenizer, sampler, o.group_size), load


def _check_remine(config: Config) -> None:
    """``offcandi.remine_every`` needs offline negatives, and a re-mine within the run."""
    every, epochs = config.offcandi.remine_every, config.train.epochs
    if not every:
        return
    if not config.train.offline_negatives:
        raise UserError(f"offcandi.remine_every={every} re-mines a run's offline negatives, "
                        "and this run trains without them (train.offline_negatives=false): "
                        "give it to the retrain stage only (`aoq retrain`; make: "
                        "RETRAIN_SET=offcandi.remine_every=N, not SET=), or leave it at 0")
    if every >= epochs:
        raise UserError(f"offcandi.remine_every={every} would never re-mine in a run of "
                        f"train.epochs={epochs} (the first re-mine is at the start of epoch "
                        f"{every + 1}): give remine_every < {epochs}, or 0 for no re-mining")


def _init_source(spec: dict, path: str) -> dict:
    """The checkpoint a run starts from (``train.init_from``), checked to hold this run's
    model."""
    source = load_checkpoint(path)
    if not same_model(source["model"], spec):
        raise UserError(f"train.init_from={path} holds model {source['model']}, which "
                        f"differs from this run's {spec}")
    return source


def _load_pretrained(model, tokenizer) -> dict | None:
    """A fresh model's pretrained parts: its weights files (``load_pretrained``) and word
    vectors (``init_word_vectors``); returns the word vectors' record (or None)."""
    model.load_pretrained()
    return model.init_word_vectors(tokenizer)


def promote_best(run_dir: Path, info: dict) -> None:
    """Copy ``best.pt`` to ``checkpoint.pt``, the file make and the later stages take as the
    run's output, once it is verified: a whole checkpoint of this project, of this run's
    model and data (``info``, the trainer's checkpoint_info). A missing, truncated or
    foreign best.pt is a :class:`UserError` and no checkpoint.pt is written."""
    best, final = run_dir / "best.pt", run_dir / "checkpoint.pt"
    problem = "is missing" if not best.is_file() else ""
    if not problem:
        try:
            state = load_checkpoint(best)
            if (not same_model(state["model"], info["model"])
                    or state["data_fingerprint"] != info["data_fingerprint"]):
                problem = "holds another run's model or data"
        except UserError as exc:
            cause = exc.__cause__ or exc
            detail = (str(cause).splitlines() or [""])[0][:200]
            problem = (f"cannot be read as a whole checkpoint of this project (truncated or "
                       f"corrupt: {type(cause).__name__}: {detail})")
    if problem:
        raise UserError(f"{best} {problem}: it cannot become {final}. The best model of "
                        f"this run is lost: delete {run_dir} and train it again (rerun the same "
                        "make or aoq command)")
    with atomic_path(final, need_bytes=best.stat().st_size,
                     what="the final checkpoint") as tmp:
        shutil.copyfile(best, tmp)


def _check_drop_last(config: Config, train_split: Split) -> None:
    """``train.drop_last`` with fewer pairs than a batch would train on nothing."""
    t, pairs = config.train, len(train_split.captions)
    if t.drop_last and pairs < t.batch_size * world_size():
        raise UserError(f"train.drop_last=true drops every batch smaller than "
                        f"train.batch_size={t.batch_size} (x {world_size()} processes), but "
                        f"{train_split.name} has {pairs} pairs: every epoch would train on "
                        "nothing; lower train.batch_size or set train.drop_last=false")


def _check_memory_size(config: Config, train_split: Split) -> None:
    """A memory bank holds at most one epoch of pairs: more would keep each pair several
    times (and a typo like memory.size=100000000000 would allocate 800 GB)."""
    pairs = len(train_split.captions)
    if config.memory.size > pairs:
        captions = config.dataset_dir() / f"{train_split.name}_caps.txt"
        raise UserError(f"memory.size={config.memory.size} is more than the {pairs} pairs of "
                        f"an epoch of {train_split.name} ({captions}): a bank that large "
                        f"would keep each pair more than once; give memory.size <= {pairs} "
                        "(0 turns the bank off)")


# The run folder of each stage when none is given: runs/<data.name>/<this>.
DEFAULT_RUNS = {"train": "base", "retrain": "aoq"}


def default_run_dir(config: Config, stage: str) -> Path:
    """``runs/<data.name>/base`` for train, ``.../aoq`` for retrain."""
    return Path("runs") / config.data.name / DEFAULT_RUNS[stage]


def train(config: Config, run_dir: str | Path, resume: bool = False,
          refused_hint: str = "") -> Path:
    """Train, validating on the dev split every epoch; returns ``run_dir/checkpoint.pt``.

    With ``resume`` an existing run folder is continued from its ``last.pt`` exactly:
    same batches, optimiser, loss parameters, memory bank and RNG, so the result equals an
    uninterrupted run. A resume is refused, leaving the run folder as it was, when the run
    was made with other settings or data; ``refused_hint`` then replaces the advice on
    what to do instead (make's table says how to start its cells over).
    """
    run_dir = Path(run_dir)
    config = copy.deepcopy(config)
    t = config.train
    config.check()
    if LOSSES.class_of(config.loss.name).requires_offline and not t.offline_negatives:
        raise UserError(f"loss {config.loss.name!r} needs offline negatives: train it with "
                        "`aoq retrain` / `make retrain` (train.offline_negatives=true)")
    group = config.offcandi.group_size
    if group and not t.offline_negatives:
        raise UserError(f"offcandi.group_size={group} makes batches from a run's offline "
                        "candidates, and this run trains without them "
                        "(train.offline_negatives=false): give it to the retrain stage only "
                        "(`aoq retrain`; make: RETRAIN_SET=offcandi.group_size=N, not SET=), "
                        "or leave it at 0")
    if group == 1 or group > t.batch_size:
        raise UserError(f"offcandi.group_size={group}: give 0 (random batches) or a group "
                        f"of 2 to train.batch_size={t.batch_size} captions")
    _check_remine(config)
    # Every input is checked before the run folder is made, so a failed start leaves
    # nothing behind.
    _absolute_paths(config)
    tokenizer, tokenizer_sha256 = _caption_tokenizer(config)
    reads = {"name": config.model.name, "args": config.model.options()}
    train_split = open_model_split(config, config.data.train_split, reads, augment=True)
    val_split = open_model_split(config, config.data.val_split, reads).limit(
        config.data.val_images)
    check_compatible(train_split, val_split)
    if MODELS.class_of(config.model.name).needs_regions and not train_split.features.has_regions:
        raise UserError(f"model {config.model.name} reasons over region features (N, R, D), "
                        f"but {train_split.features.path} holds global (N, D) features: use "
                        "region features (aoq features tsv, or aoq features cnn --grid) or a "
                        "model for global features (model.name=vsepp)")
    _check_memory_size(config, train_split)
    _check_drop_last(config, train_split)
    log.info("train: %d images / %d captions; validation: %d images of %s",
             train_split.num_images, len(train_split.captions), val_split.num_images,
             config.data.val_split)

    fingerprint = data_fingerprint(config, tokenizer_sha256, train_split)
    if t.init_from:  # a resume continues only from the weights it started from
        fingerprint["init_weights"] = weights_hash(load_checkpoint(t.init_from)["state_dict"])
    device = resolve_device(t.device)
    reminer = None
    if t.offline_negatives:
        task, load = _offline_task(config, train_split, tokenizer, fingerprint)
        if config.offcandi.remine_every:
            reminer = Reminer(
                config.offcandi.remine_every,
                open_model_split(config, config.data.train_split, reads), tokenizer, device,
                config.data.workers, run_dir, split_attrs(config, train_split, fingerprint),
                mining_options(config.offcandi, config.candidates_dir(),
                               fingerprint["candidates"]),
                load, task.dataset.sampler)
    else:
        task = PairTask(train_split, tokenizer)
    torch.manual_seed(t.seed)
    loss_fn = build_loss(config.loss.name, config.loss.values)
    data_args = {"img_dim": train_split.features.feature_dim, **tokenizer.model_args()}
    options = config.model.options()
    model = build_model(config.model.name, config.model.values, **data_args)
    model.use_cache_folder(config.text_cache_folder())
    # parameters shared with the loss (CLIP's logit_scale), said in the run's log below
    bound = model.bind_loss(loss_fn)
    spec = {"name": config.model.name, "args": {**data_args, **options}}
    # Pretrained weights (a text tower's folder) and word vectors (model.word_vectors) for a
    # run from scratch: a run with a last.pt resumes (or is refused) and init_from brings
    # its own weights.
    from_scratch = not t.init_from and not (run_dir / "last.pt").exists()
    words = _load_pretrained(model, tokenizer) if from_scratch else None

    # The lock comes after the inputs are checked: a failed start leaves no folder.
    with folder_lock(run_dir, "aoq train"):
        state = _prepare_run_dir(run_dir, config, resume, refused_hint)
        if state is not None and state["data_fingerprint"] != fingerprint:
            changed = sorted(k for k in {*state["data_fingerprint"], *fingerprint}
                             if state["data_fingerprint"].get(k) != fingerprint.get(k))
            raise UserError(f"cannot resume {run_dir}: it was trained on other data, "
                            "candidates or initial weights (train.init_from) than those now "
                            f"given (changed: {', '.join(changed)}); "
                            + (refused_hint or f"delete {run_dir} to start it over, or use "
                               "another run folder"))
        if reminer is not None and state is not None and state["epoch"] < t.epochs:
            reminer.resume(state["remined"], state["epoch"], state["epoch_step"])
        if state is None and not t.init_from and not from_scratch:  # last.pt went meanwhile
            words = _load_pretrained(model, tokenizer)
        source = _init_source(spec, t.init_from) if t.init_from and state is None else None
        # The run is accepted: only now is anything in its folder written, so a refused
        # resume leaves a finished run as it was.
        final = run_dir / "checkpoint.pt"
        if is_main():
            setup_logging(run_dir / "train.log")
            write_text(run_dir / "config.yaml",
                       yaml.safe_dump(config.to_dict(), sort_keys=False))
            clear_record(final)  # until this run's checkpoint.pt is written
        if bound:
            log.info("%s", bound)
        if words is not None:
            log.info("word embedding: %d vocabulary words from %s (sha256 %s), %d not in it "
                     "keep their random init", words["found"], words["path"], words["sha256"],
                     words["missing"])
        if source is not None:
            model.load_state_dict(source["state_dict"])
            log.info("initialised from %s (weights %s)", t.init_from,
                     weights_hash(source["state_dict"]))
            words = source.get("word_vectors")
        elif state is not None:
            words = state.get("word_vectors")

        def validate(model) -> dict:
            img, cap = encode_split(model, val_split, tokenizer, device,
                                    workers=config.data.workers,
                                    desc=f"validate {val_split.name}")
            return {"split": config.data.val_split, "protocol": "all",
                    "images": val_split.num_images,
                    **evaluate_embeddings(img, cap, folds=1,
                                          block_size=config.eval.block_size)}

        trainer = Trainer(model, loss_fn, task, t, config.memory, device, run_dir, validate,
                          checkpoint_info={"model": spec, "config": config.to_dict(),
                                           "vocab": tokenizer.to_json(),
                                           "data_fingerprint": fingerprint,
                                           "word_vectors": words},
                          workers=config.data.workers,
                          features_hint=str(train_split.features.path), reminer=reminer)
        if state is not None:
            trainer.load_state_dict(state)
            log.info("resuming %s at epoch %d step %d (best rsum %.2f)", run_dir,
                     state["epoch"] + 1, state["epoch_step"], state["best_rsum"])
        if is_main():  # TensorBoard: points after the resume point are dropped, then redone
            trainer.scalars = ScalarWriter(run_dir, (0 if state is None else state["step"]) + 1)
        try:
            trainer.fit()
        finally:
            model.save_cache()  # the outputs of an epoch cut short too
            if trainer.scalars is not None:
                trainer.scalars.close()

        if is_main():
            promote_best(run_dir, trainer.checkpoint_info)
            write_record(final, settings_text(config, run_stage(config)))
            p = trainer.progress
            rsum = f" (rsum {p.best_rsum:.2f})" if t.select != "rsum" else ""
            log.info("done: best dev %s %.2f%s at epoch %d -> %s", t.select, p.best_score,
                     rsum, p.best_epoch, final)
    return final

