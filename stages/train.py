"""The train stage: a base embedding model with online hard negatives (VSE++).

Run folder ``runs/<DATA>/<run>/``: ``config.yaml`` (resolved), ``train.log``,
``metrics.jsonl`` (one line per validation), ``last.pt`` (to resume), ``best.pt`` (best dev
rsum) and, once training has finished, ``checkpoint.pt`` (the best model): the file that
``make`` and the later stages take as the stage's output.
"""

import logging
import math
import shutil
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

from .candidates import false_negative_skips, load_candidates
from .config import Config, config_diff
from .data.dataset import PairDataset, Split, collate_pairs, epoch_permutation, open_split
from .data.offline import OfflineNegativeSampler, OfflinePairDataset, collate_offline
from .data.vocab import Vocab, file_sha256
from .device import resolve_device
from .encode import encode_split
from .errors import UserError
from .io.atomic import append_jsonl, atomic_path, write_text
from .io.checkpoint import load_checkpoint, save_checkpoint, weights_hash
from .log import setup_logging
from .losses import build_loss
from .metrics.retrieval import evaluate_embeddings
from .models import build_model
from .progress import Progress

log = logging.getLogger(__name__)

# Config keys a resumed run may change; anything else would make the result a mix of two
# experiments.
RESUMABLE_CHANGES = {"train.epochs", "train.device", "train.ckpt_every", "data.workers",
                     "data.path", "data.vocab"}


def learning_rate(config: Config, epoch: int) -> float:
    """VSE++'s step schedule: ``lr * lr_decay ** (epoch // lr_update)``."""
    t = config.train
    return t.lr * t.lr_decay ** (epoch // t.lr_update) if t.lr_update > 0 else t.lr


def data_fingerprint(config: Config, vocab_path: Path, num_train_images: int) -> dict:
    """What identifies the data a model was trained on (checked by later stages)."""
    dataset_dir = config.dataset_dir()
    return {
        "dataset": config.data.name,
        "train_split": config.data.train_split,
        "num_train_images": num_train_images,
        "train_captions_sha256": file_sha256(dataset_dir / f"{config.data.train_split}_caps.txt"),
        "vocab_sha256": file_sha256(vocab_path),
    }


def _prepare_run_dir(run_dir: Path, config: Config, resume: bool) -> dict | None:
    """Create or reopen the run folder; returns the state to resume from, if any."""
    last = run_dir / "last.pt"
    if run_dir.exists() and any(run_dir.iterdir()):
        if not resume:
            raise UserError(f"run folder {run_dir} already exists; pass --resume to continue "
                            "it, or choose another --run-dir")
        if not last.exists():
            log.info("%s has no last.pt yet: starting the run from scratch", run_dir)
            return None
        state = load_checkpoint(last)
        changed = [d for d in config_diff(state["config"], config.to_dict())
                   if d.split(":")[0] not in RESUMABLE_CHANGES]
        if changed:
            raise UserError(f"cannot resume {run_dir}: the config differs from the one it "
                            f"was started with: {'; '.join(changed)}. Start a new --run-dir "
                            "for a different experiment")
        return state
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def _offline_dataset(config: Config, split: Split, vocab: Vocab, fingerprint: dict):
    """The AOQ training set: pairs plus negatives from checked candidate files."""
    h = config.offcandi.hardest
    expected = ""
    if config.offcandi.base_ckpt:
        expected = weights_hash(load_checkpoint(config.offcandi.base_ckpt)["state_dict"])
    folder = config.candidates_dir()
    ratio = config.offcandi.false_negative_ratio
    i2t, t2i = (load_candidates(folder, direction, config.data.name, split.name,
                                split.num_images, min_k, expected, with_scores=ratio > 0)
                for direction, min_k in (("i2t", h), ("t2i", -(-h // 5))))
    if i2t.attrs["weights"] != t2i.attrs["weights"]:
        raise UserError(f"{i2t.path} and {t2i.path} were mined with different models "
                        f"({i2t.attrs['weights']} vs {t2i.attrs['weights']}); mine both "
                        "again with `make offcandi`")
    fingerprint["candidates_weights"] = i2t.attrs["weights"]
    log.info("offline negatives from %s (mined with %s), sampled from the top %d",
             folder, i2t.attrs.get("checkpoint"), h)
    skips = {}
    if ratio > 0:
        for candidates, keep in ((i2t, h), (t2i, -(-h // 5))):
            skips[candidates.attrs["direction"]] = skip = false_negative_skips(
                candidates, ratio, keep)
            log.info("false-negative filter (ratio %g): %s skips %.2f candidates per query "
                     "on average, %.1f%% of queries skip any, %d hit the cap of K - %d",
                     ratio, candidates.path, skip.mean(), 100 * (skip > 0).mean(),
                     int((skip == candidates.k - keep).sum()), keep)
    sampler = OfflineNegativeSampler(i2t.indices, t2i.indices, h, config.train.seed,
                                     skips.get("i2t"), skips.get("t2i"))
    return OfflinePairDataset(split, vocab, sampler), collate_offline


def _init_weights(model, model_name: str, model_args: dict, path: str) -> None:
    """Start from another checkpoint's weights (``train.init_from``)."""
    source = load_checkpoint(path)
    if source["model"] != {"name": model_name, "args": model_args}:
        raise UserError(f"train.init_from={path} holds model {source['model']}, which "
                        f"differs from this run's {model_name} {model_args}")
    model.load_state_dict(source["state_dict"])
    log.info("initialised from %s (weights %s)", path, weights_hash(source["state_dict"]))


def _validate(model, val_split, vocab, config: Config, device) -> dict:
    img, cap = encode_split(model, val_split, vocab, device, workers=config.data.workers,
                            desc=f"validate {val_split.name}")
    return evaluate_embeddings(img, cap, folds=1, block_size=config.eval.block_size)


def _batch_loss(model, loss_fn, batch: dict, device: torch.device) -> torch.Tensor:
    """Encode a batch's images and captions (each side in one call) and apply the loss.

    Offline batches stack anchors and negatives (see ``collate_offline``): rows [0, B)
    are the anchors, [B, 2B) the first and [2B, 3B) the second offline negatives.
    """
    img = model.encode_images(batch["images"].to(device, non_blocking=True),
                              batch["regions"].to(device, non_blocking=True))
    cap = model.encode_captions(batch["tokens"].to(device, non_blocking=True),
                                batch["lengths"])
    image_ids = batch["image_ids"].to(device)
    if not loss_fn.requires_offline:
        return loss_fn(img, cap, image_ids)
    b = img.shape[0] // 3
    offline = {"images": img[b:2 * b], "images2": img[2 * b:],
               "captions": cap[b:2 * b], "captions2": cap[2 * b:]}
    return loss_fn(img[:b], cap[:b], image_ids[:b], offline=offline)


def train(config: Config, run_dir: str | Path, resume: bool = False) -> Path:
    """Train, validating on the dev split every epoch; returns ``run_dir/checkpoint.pt``.

    With ``resume`` an existing run folder is continued from its ``last.pt`` exactly:
    same batches, optimiser state and RNG, so the result equals an uninterrupted run.
    """
    run_dir = Path(run_dir)
    t = config.train
    loss_fn = build_loss(config.loss)
    # Every input is checked before the run folder is made, so a failed start leaves
    # nothing behind.
    dataset_dir = config.dataset_dir()
    vocab_path = config.vocab_path()
    vocab = Vocab.load(vocab_path)
    train_caps = dataset_dir / f"{config.data.train_split}_caps.txt"
    vocab.check_built_from(train_caps, vocab_path)
    train_split = open_split(dataset_dir, config.data.train_split)
    val_split = open_split(dataset_dir, config.data.val_split).limit(config.data.val_images)
    log.info("train: %d images / %d captions; validation: %d images of %s",
             train_split.num_images, len(train_split.captions), val_split.num_images,
             config.data.val_split)

    fingerprint = data_fingerprint(config, vocab_path, train_split.num_images)
    if loss_fn.requires_offline:
        dataset, collate = _offline_dataset(config, train_split, vocab, fingerprint)
    else:
        dataset, collate = PairDataset(train_split, vocab), collate_pairs
    device = resolve_device(t.device)

    state = _prepare_run_dir(run_dir, config, resume)
    setup_logging(run_dir / "train.log")
    write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    torch.manual_seed(t.seed)
    m = config.model
    model_args = {"img_dim": train_split.features.feature_dim, "vocab_size": len(vocab),
                  "embed_size": m.embed_size, "word_dim": m.word_dim,
                  "num_layers": m.num_layers, "bidirectional": m.bidirectional,
                  "img_norm": m.img_norm}
    model = build_model(m.name, **model_args)
    if t.init_from and state is None:
        _init_weights(model, m.name, model_args, t.init_from)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr)

    epoch = epoch_step = step = 0
    best_rsum, best_epoch, metrics = -math.inf, -1, {}
    if state is not None:
        if state["data_fingerprint"] != fingerprint:
            raise UserError(f"cannot resume {run_dir}: it was trained on other data or "
                            f"candidates ({state['data_fingerprint']}) than those now given "
                            f"({fingerprint}); delete {run_dir} to start it over, or use "
                            "another run folder")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        epoch, epoch_step, step = state["epoch"], state["epoch_step"], state["step"]
        best_rsum, best_epoch = state["best_rsum"], state["best_epoch"]
        metrics = state.get("metrics", {})
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        log.info("resuming %s at epoch %d step %d (best rsum %.2f)", run_dir, epoch + 1,
                 epoch_step, best_rsum)

    def snapshot() -> dict:
        cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
        return {"model": {"name": m.name, "args": model_args},
                "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "epoch": epoch,
                "epoch_step": epoch_step, "step": step, "best_rsum": best_rsum,
                "best_epoch": best_epoch, "config": config.to_dict(),
                "vocab": vocab.to_json(), "data_fingerprint": fingerprint,
                "rng": {"torch": torch.get_rng_state(), "cuda": cuda_rng},
                "metrics": metrics}

    while epoch < t.epochs:
        lr = learning_rate(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_fn.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        order = epoch_permutation(len(dataset), t.seed, epoch).tolist()
        batches = [order[i:i + t.batch_size] for i in range(0, len(order), t.batch_size)]
        loader = DataLoader(dataset, batch_sampler=batches[epoch_step:],
                            collate_fn=collate, num_workers=config.data.workers,
                            pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(t.seed))
        model.train()
        loss_sum, loss_count = 0.0, 0
        t0 = time.perf_counter()
        with Progress(len(batches), f"epoch {epoch + 1}/{t.epochs}", unit="it",
                      start=epoch_step) as bar:
            for batch in loader:
                loss = _batch_loss(model, loss_fn, batch, device)
                if not torch.isfinite(loss):
                    raise UserError(
                        f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1} (batch "
                        f"{epoch_step + 1} of the epoch); lower train.lr, check "
                        f"{train_split.features.path} for NaN/inf features, or resume from "
                        f"{run_dir / 'last.pt'} with --resume")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizer.step()
                step += 1
                epoch_step += 1
                loss_sum += loss.item()
                loss_count += 1
                bar.update(1, loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
                if t.ckpt_every and epoch_step % t.ckpt_every == 0:
                    save_checkpoint(run_dir / "last.pt", snapshot())
        train_seconds = time.perf_counter() - t0
        metrics = _validate(model, val_split, vocab, config, device)
        record = {"stage": "train", "epoch": epoch + 1, "step": step,
                  "split": config.data.val_split, "protocol": "all",
                  "images": val_split.num_images, **metrics, "lr": lr,
                  "train_loss": loss_sum / max(loss_count, 1),
                  "epoch_seconds": round(train_seconds, 2)}
        append_jsonl(run_dir / "metrics.jsonl", record)
        log.info("epoch %d: rsum %.2f (R@1 i2t %.1f t2i %.1f), loss %.4f", epoch + 1,
                 metrics["rsum"], metrics["r1_i2t"], metrics["r1_t2i"], record["train_loss"])
        epoch += 1
        epoch_step = 0
        is_best = metrics["rsum"] > best_rsum
        if is_best:
            best_rsum, best_epoch = metrics["rsum"], epoch
        snap = snapshot()
        if is_best:
            save_checkpoint(run_dir / "best.pt", snap)
        save_checkpoint(run_dir / "last.pt", snap)

    final = run_dir / "checkpoint.pt"
    with atomic_path(final) as tmp:
        shutil.copyfile(run_dir / "best.pt", tmp)
    log.info("done: best dev rsum %.2f at epoch %d -> %s", best_rsum, best_epoch, final)
    return final
