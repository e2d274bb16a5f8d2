"""The train and retrain stages: a model trained with online hard negatives (VSE++), or with
offline hard negatives from candidate files as well (``train.offline_negatives``; AOQ).

Run folder ``runs/<DATA>/<run>/``: ``config.yaml`` (resolved), ``train.log``,
``metrics.jsonl`` (one line per validation), ``last.pt`` (to resume), ``best.pt`` (best dev
score: rsum, or R@1 + R@5 with ``train.select=r1r5``) and, once training has finished,
``checkpoint.pt`` (the best model): the file that ``make`` and the later stages take as the
stage's output; with ``offcandi.remine_every``, ``remined/epoch-<k>/`` (candidates mined by
the run, :mod:`stages.pipeline.remine`). The loop itself is :mod:`stages.training.loop`; this module
checks the inputs, builds the parts and owns the run folder: :func:`train` is a short
sequence of named parts (:func:`check_settings`, :func:`open_data`, :func:`build_task`,
:func:`build_model_and_loss`, :func:`resume_state`, ...), each reading the settings it needs.
"""

import contextlib
import copy
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from stages.config.sections import Config, config_diff
from stages.core.device import resolve_device
from stages.core.errors import UserError
from stages.core.layout import LEGACY_CAPTIONS_PER_IMAGE, CaptionLayout
from stages.core.log import setup_logging
from stages.data.dataset import Split, check_compatible
from stages.data.tokenizers import CaptionTokenizer
from stages.data.vocab import Vocab, file_sha256
from stages.io.atomic import atomic_path, write_text
from stages.io.checkpoint import load_checkpoint, weights_hash
from stages.io.lock import LOCK_NAME, folder_lock
from stages.io.scalars import ScalarWriter
from stages.losses import LOSSES, build_loss
from stages.losses.base import RetrievalLoss
from stages.metrics.retrieval import evaluate_embeddings
from stages.mining.sampler import OfflineNegativeSampler
from stages.mining.selection import CaptionWords, SelectionRules, load_selections
from stages.models import MODELS, build_model
from stages.models.base import EmbeddingModel
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
from stages.training.distributed import (
    barrier,
    destroy,
    init_from_env,
    is_main,
    main_then_share,
    world_size,
)
from stages.training.loop import Trainer
from stages.training.tasks import OfflineTask, PairTask

log = logging.getLogger(__name__)

# Besides the settings that never change a result (paths, device, workers: see
# stages.pipeline.stamps), a resumed run may change its number of epochs (not below those done);
# anything else would make the result a mix of two experiments.
RESUMABLE_CHANGES = {"train.epochs"}


def data_fingerprint(config: Config, tokenizer_sha256: str, train_split: Split) -> dict:
    """What identifies the data a model was trained on (checked by later stages and by a
    resume): the captions and their layout, the caption tokenizer (``vocab_sha256``: the
    vocabulary file's hash, or a pretrained tokenizer's) and the features of the training
    split."""
    dataset_dir = config.dataset_dir()
    return {
        "dataset": config.data.name,
        "train_split": config.data.train_split,
        "num_train_images": train_split.num_images,
        "train_captions_sha256": file_sha256(dataset_dir / f"{config.data.train_split}_caps.txt"),
        "vocab_sha256": tokenizer_sha256,
        "train_features": train_split.features.fingerprint(),
        # Which image owns each caption (an edited ids file changes it, not the captions);
        # left out for 5 per image, so runs from before layouts still resume.
        **({} if train_split.layout.identity() == LEGACY_CAPTIONS_PER_IMAGE
           else {"caption_layout": train_split.layout.identity()}),
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
    _check_curriculum(o, selections["i2t"].k, selections["t2i"].k, split.layout)
    sampler = OfflineNegativeSampler(selections["i2t"], selections["t2i"], o.hardest,
                                     config.train.seed, o.curriculum_epochs, mix, o.mix_share,
                                     layout=split.layout)
    return OfflineTask(split, tokenizer, sampler, o.group_size), load


def _check_curriculum(o, k_i2t: int, k_t2i: int, layout: CaptionLayout) -> None:
    """``offcandi.curriculum_epochs`` slides the window of ``offcandi.hardest`` candidates a
    caption draws from, over the K mined: a window holding all K in both directions has
    nowhere to slide, and the setting would do nothing (t2i: the widest window, of the
    captions of the images of fewest captions in ``layout``)."""
    window_t2i = -(-o.hardest // layout.min_per_image)
    if o.curriculum_epochs and o.hardest >= k_i2t and window_t2i >= k_t2i:
        raise UserError(
            f"offcandi.curriculum_epochs={o.curriculum_epochs} slides the window of the "
            f"offcandi.hardest={o.hardest} candidates each caption draws from (t2i: "
            f"{window_t2i}), from the easiest of the K mined to the hardest, but the window "
            f"already holds all of them (K: i2t {k_i2t}, t2i {k_t2i}), so nothing would "
            f"change: give offcandi.hardest below K (e.g. {max(1, k_i2t // 4)}), mine a "
            "larger K (offcandi.k_i2t, offcandi.k_t2i), or leave curriculum_epochs at 0")


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
    if t.drop_last and pairs < t.batch_size:
        raise UserError(f"train.drop_last=true drops every batch smaller than "
                        f"train.batch_size={t.batch_size}, but "
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


# --- the parts of a run, built in this order by train() ----------------------------------


@dataclass
class RunData:
    """What a run reads, checked: the caption tokenizer, the training split (with training
    crops, for a model of raw images) and the validation split as the model reads them, and
    the data's fingerprint (:func:`run_fingerprint`)."""

    tokenizer: CaptionTokenizer
    train: Split
    val: Split
    fingerprint: dict


def check_settings(config: Config) -> None:
    """Refuse settings that contradict each other, before anything is read: the config's
    own checks, a loss that needs offline negatives in a run without them, and the settings
    of offline negatives (``offcandi.group_size``, ``offcandi.remine_every``) in such a run
    or out of range."""
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


def check_processes(config: Config) -> None:
    """With several processes (torchrun): the global batch ``train.batch_size`` must split
    evenly over them, re-mining inside a run (``offcandi.remine_every``) is one process's
    work for now, and grouped batches need the global negatives."""
    n = world_size()
    if n == 1:
        return
    if config.train.batch_size % n:
        raise UserError(f"train.batch_size={config.train.batch_size} is the global batch, "
                        f"split over {n} processes: give a multiple of {n}")
    if config.offcandi.remine_every:
        raise UserError(f"offcandi.remine_every={config.offcandi.remine_every} re-mines "
                        "inside the run, which runs in one process only: train with one "
                        "process (no torchrun), or re-mine between runs (aoq offcandi)")
    group = config.offcandi.group_size
    if group and not config.train.global_negatives:
        raise UserError(f"offcandi.group_size={group} puts mutually hard captions in one "
                        f"batch, but a batch is cut over {n} processes item by item and "
                        "train.global_negatives=false keeps each process's negatives its "
                        "own: the groups would be split and do nothing; give "
                        "train.global_negatives=true or group_size=0")


def _model_reads(config: Config) -> dict:
    """The run's model as :func:`stages.pipeline.inputs.open_model_split` takes it."""
    return {"name": config.model.name, "args": config.model.options()}


def open_splits(config: Config) -> tuple[Split, Split]:
    """The training split (with training crops, for a model of raw images) and the
    validation split (its first ``data.val_images`` images) as the model reads them, checked
    to fit each other, the model (region features) and the batch settings (``memory.size``,
    ``train.drop_last``); logged."""
    reads = _model_reads(config)
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
    return train_split, val_split


def run_fingerprint(config: Config, tokenizer_sha256: str, train_split: Split) -> dict:
    """The data a run trains on (:func:`data_fingerprint`) and, with ``train.init_from``,
    the weights it starts from: a resume continues only from the weights it started from."""
    fingerprint = data_fingerprint(config, tokenizer_sha256, train_split)
    if config.train.init_from:
        fingerprint["init_weights"] = weights_hash(
            load_checkpoint(config.train.init_from)["state_dict"])
    return fingerprint


def open_data(config: Config) -> RunData:
    """The run's tokenizer and splits, checked, and their fingerprint; the data paths in
    ``config`` are made absolute first (what the run's checkpoints record)."""
    _absolute_paths(config)
    tokenizer, tokenizer_sha256 = _caption_tokenizer(config)
    train_split, val_split = open_splits(config)
    return RunData(tokenizer, train_split, val_split,
                   run_fingerprint(config, tokenizer_sha256, train_split))


def build_reminer(config: Config, data: RunData, device: torch.device, run_dir: Path,
                  load: LoadSelections, sampler: OfflineNegativeSampler) -> Reminer | None:
    """What re-mines the offline negatives every ``offcandi.remine_every`` epochs with the
    model being trained (None when 0): it embeds the training split unaugmented, mines as
    the run's candidates were mined, loads them with ``load`` and hands them to
    ``sampler``."""
    every = config.offcandi.remine_every
    if not every:
        return None
    return Reminer(every, open_model_split(config, config.data.train_split, _model_reads(config)),
                   data.tokenizer, device, config.data.workers, run_dir,
                   split_attrs(config, data.train, data.fingerprint),
                   mining_options(config.offcandi, config.candidates_dir(),
                                  data.fingerprint["candidates"]),
                   load, sampler, precision=config.train.precision)


def build_task(config: Config, data: RunData, device: torch.device,
               run_dir: Path) -> tuple[PairTask | OfflineTask, Reminer | None]:
    """What a batch holds, and what re-mines it (or None): pairs, or with
    ``train.offline_negatives`` pairs plus offline negatives from the checked candidate
    files (recorded in ``data.fingerprint``), re-mined with ``offcandi.remine_every``."""
    if not config.train.offline_negatives:
        return PairTask(data.train, data.tokenizer), None
    task, load = _offline_task(config, data.train, data.tokenizer, data.fingerprint)
    return task, build_reminer(config, data, device, run_dir, load, task.dataset.sampler)


def build_model_and_loss(config: Config,
                         data: RunData) -> tuple[EmbeddingModel, RetrievalLoss, dict, str | None]:
    """The loss and the model, drawn in this order from ``train.seed``; the model's spec
    (what its checkpoints record: name and arguments, the data's among them) and what it
    shares with the loss (:meth:`stages.models.base.EmbeddingModel.bind_loss`'s line for
    the run's log, or None)."""
    torch.manual_seed(config.train.seed)
    loss_fn = build_loss(config.loss.name, config.loss.values)
    data_args = {"img_dim": data.train.features.feature_dim, **data.tokenizer.model_args()}
    options = config.model.options()
    model = build_model(config.model.name, config.model.values, **data_args)
    model.use_cache_folder(config.text_cache_folder())
    bound = model.bind_loss(loss_fn)
    return model, loss_fn, {"name": config.model.name, "args": {**data_args, **options}}, bound


def resume_state(run_dir: Path, config: Config, resume: bool, refused_hint: str,
                 fingerprint: dict) -> dict | None:
    """The state to resume from (:func:`_prepare_run_dir`: None for a new run), refused
    when the run was trained on other data, candidates or initial weights."""
    state = _prepare_run_dir(run_dir, config, resume, refused_hint)
    if state is not None and state["data_fingerprint"] != fingerprint:
        changed = sorted(k for k in {*state["data_fingerprint"], *fingerprint}
                         if state["data_fingerprint"].get(k) != fingerprint.get(k))
        raise UserError(f"cannot resume {run_dir}: it was trained on other data, "
                        "candidates or initial weights (train.init_from) than those now "
                        f"given (changed: {', '.join(changed)}); "
                        + (refused_hint or f"delete {run_dir} to start it over, or use "
                           "another run folder"))
    saved = state.get("world_size", 1) if state is not None else world_size()
    if saved != world_size():
        raise UserError(f"cannot resume {run_dir} with {world_size()} process"
                        f"{'es' if world_size() > 1 else ''}: it was trained with {saved}, and "
                        "another number would cut its batches otherwise; resume it with "
                        + (f"torchrun --nproc_per_node={saved} ..." if saved > 1 else
                           "one process (no torchrun)") + ", or start a new run folder")
    return state


def open_run_folder(run_dir: Path, config: Config) -> Path:
    """Start writing the accepted run's folder (main process): its log, its resolved
    ``config.yaml``, and no settings record for its checkpoint.pt until this run writes
    one; returns that final checkpoint's path."""
    final = run_dir / "checkpoint.pt"
    if is_main():
        setup_logging(run_dir / "train.log")
        write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        clear_record(final)  # until this run's checkpoint.pt is written
    return final


def start_weights(model: EmbeddingModel, init_from: str, words: dict | None,
                  source: dict | None, state: dict | None) -> dict | None:
    """Log the pretrained word vectors loaded (``words``), load the weights of
    ``train.init_from`` (``source``) and return the word-vector record the run's checkpoints
    keep: the initial checkpoint's, a resumed run's, else ``words``."""
    if words is not None:
        log.info("word embedding: %d vocabulary words from %s (sha256 %s), %d not in it "
                 "keep their random init", words["found"], words["path"], words["sha256"],
                 words["missing"])
    if source is not None:
        model.load_state_dict(source["state_dict"])
        log.info("initialised from %s (weights %s)", init_from,
                 weights_hash(source["state_dict"]))
        return source.get("word_vectors")
    if state is not None:
        return state.get("word_vectors")
    return words


def validation(config: Config, data: RunData, device: torch.device) -> Callable:
    """The trainer's validation: the model's recall on the validation split, each epoch."""
    def validate(model) -> dict:
        img, cap = encode_split(model, data.val, data.tokenizer, device,
                                workers=config.data.workers,
                                desc=f"validate {data.val.name}",
                                precision=config.train.precision)
        return {"split": config.data.val_split, "protocol": "all",
                "images": data.val.num_images,
                **evaluate_embeddings(img, cap, data.val.layout, folds=1,
                                      block_size=config.eval.block_size)}
    return validate


def checkpoint_info(config: Config, data: RunData, spec: dict, words: dict | None) -> dict:
    """What each of the run's checkpoints records besides the training state: the model's
    spec, the resolved config, the tokenizer, the data's fingerprint and the word vectors."""
    return {"model": spec, "config": config.to_dict(), "vocab": data.tokenizer.to_json(),
            "data_fingerprint": data.fingerprint, "word_vectors": words}


def restore_trainer(trainer: Trainer, state: dict | None, run_dir: Path) -> None:
    """Give a resumed run's state to the trainer (logged), and open the TensorBoard writer
    (main process) after the step it resumes from: later points are dropped, then redone."""
    if state is not None:
        trainer.load_state_dict(state)
        log.info("resuming %s at epoch %d step %d (best rsum %.2f)", run_dir,
                 state["epoch"] + 1, state["epoch_step"], state["best_rsum"])
    if is_main():
        trainer.scalars = ScalarWriter(run_dir, (0 if state is None else state["step"]) + 1)


def fit(trainer: Trainer, model: EmbeddingModel) -> None:
    """Train; the model's text cache and the TensorBoard file are saved however it ends (the
    outputs of an epoch cut short too)."""
    try:
        trainer.fit()
    finally:
        model.save_cache()
        if trainer.scalars is not None:
            trainer.scalars.close()


def finish_run(run_dir: Path, final: Path, config: Config, trainer: Trainer) -> None:
    """The finished run's checkpoint.pt (its verified best.pt) with its settings record;
    logged with its best dev score."""
    promote_best(run_dir, trainer.checkpoint_info)
    write_record(final, settings_text(config, run_stage(config)))
    p, t = trainer.progress, config.train
    rsum = f" (rsum {p.best_rsum:.2f})" if t.select != "rsum" else ""
    log.info("done: best dev %s %.2f%s at epoch %d -> %s", t.select, p.best_score, rsum,
             p.best_epoch, final)


def shared_resume_state(run_dir: Path, config: Config, resume: bool, refused_hint: str,
                        fingerprint: dict) -> dict | None:
    """:func:`resume_state` decided by rank 0 (which holds the run folder's lock); the other
    ranks read the same ``last.pt`` when it resumes, or stop with its refusal."""
    state = None

    def decide() -> bool:
        nonlocal state
        state = resume_state(run_dir, config, resume, refused_hint, fingerprint)
        return state is not None

    resumes = main_then_share(decide)
    if is_main() or not resumes:
        return state
    return load_checkpoint(run_dir / "last.pt")


def train(config: Config, run_dir: str | Path, resume: bool = False,
          refused_hint: str = "") -> Path:
    """Train, validating on the dev split every epoch; returns ``run_dir/checkpoint.pt``.

    With ``resume`` an existing run folder is continued from its ``last.pt`` exactly:
    same batches, optimiser, loss parameters, memory bank and RNG, so the result equals an
    uninterrupted run. A resume is refused, leaving the run folder as it was, when the run
    was made with other settings or data; ``refused_hint`` then replaces the advice on
    what to do instead (make's table says how to start its cells over).
    """
    run_dir, config = Path(run_dir), copy.deepcopy(config)
    # Settings and inputs are checked first, so a refused start is one line, nothing else
    # said and nothing left behind.
    check_settings(config)
    data = open_data(config)
    # torchrun's processes join their group here (nothing happens without torchrun)
    device, started = init_from_env(resolve_device(config.train.device))
    try:
        return _train(config, run_dir, resume, refused_hint, device, data)
    finally:
        if started:
            destroy()


def _run_lock(run_dir: Path):
    """The run folder's lock, held by rank 0 (the one process that writes it)."""
    return folder_lock(run_dir, "aoq train") if is_main() else contextlib.nullcontext()


def _train(config: Config, run_dir: Path, resume: bool, refused_hint: str,
           device: torch.device, data: RunData) -> Path:
    """:func:`train`'s parts after the settings and ``data`` are checked, in this process
    (one rank of several under torchrun). Every input is checked before the run folder is
    made, so a failed start leaves nothing behind."""
    t = config.train
    check_processes(config)
    task, reminer = build_task(config, data, device, run_dir)
    model, loss_fn, spec, bound = build_model_and_loss(config, data)
    # Pretrained weights (a text tower's folder) and word vectors (model.word_vectors) for a
    # run from scratch: a run with a last.pt resumes (or is refused) and init_from brings
    # its own weights.
    from_scratch = not t.init_from and not (run_dir / "last.pt").exists()
    words = _load_pretrained(model, data.tokenizer) if from_scratch else None

    # The lock comes after the inputs are checked: a failed start leaves no folder.
    # Under torchrun rank 0 takes it and decides; the others wait for its decision.
    with _run_lock(run_dir):
        state = shared_resume_state(run_dir, config, resume, refused_hint, data.fingerprint)
        if reminer is not None and state is not None and state["epoch"] < t.epochs:
            reminer.resume(state["remined"], state["epoch"], state["epoch_step"])
        if state is None and not t.init_from and not from_scratch:  # last.pt went meanwhile
            words = _load_pretrained(model, data.tokenizer)
        source = _init_source(spec, t.init_from) if t.init_from and state is None else None
        # The run is accepted: only now is anything in its folder written, so a refused
        # resume leaves a finished run as it was.
        final = open_run_folder(run_dir, config)
        if bound:
            log.info("%s", bound)
        words = start_weights(model, t.init_from, words, source, state)
        trainer = Trainer(model, loss_fn, task, t, config.memory, device, run_dir,
                          validation(config, data, device),
                          checkpoint_info(config, data, spec, words),
                          workers=config.data.workers,
                          features_hint=str(data.train.features.path), reminer=reminer)
        restore_trainer(trainer, state, run_dir)
        fit(trainer, model)
        if is_main():
            finish_run(run_dir, final, config, trainer)
    barrier()  # the ranks end together, none tearing the group down under another
    return final
