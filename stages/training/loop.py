"""The training loop: forward, named loss terms, backward, clip, step; validation at each
epoch's end; checkpoints that hold every stateful part, so a resumed run equals an
uninterrupted one (model, optimiser, loss parameters, memory bank, RNG, position in the
epoch, the epoch's running loss sums, the offline candidates re-mined so far).

Files a run folder gets from the loop (rank 0 only): ``last.pt`` (every epoch and every
``ckpt_every`` steps), ``best.pt`` (best validation score: ``train.select``, see
:func:`selection_score`), ``metrics.jsonl`` (one line per epoch: validation metrics, the
epoch's mean of each loss term, lr, time).
"""

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from stages.config.sections import MemoryConfig, TrainConfig
from stages.core.errors import UserError
from stages.core.precision import autocast
from stages.core.progress import Progress
from stages.io.atomic import append_jsonl, write_text
from stages.io.checkpoint import save_checkpoint
from stages.losses.base import OfflineNegatives, RetrievalLoss
from stages.models.base import EmbeddingModel, ModelOutput
from stages.models.encode import check_finite
from stages.training.distributed import (
    all_ranks,
    barrier,
    from_main,
    gather_batch,
    is_main,
    mean_over_ranks,
    rank,
    rank_sizes,
    world_size,
    wrap_forward,
)
from stages.training.memory import MemoryBank
from stages.training.repeated_updates import (
    clip_gradients,
    gradients_finite,
    optimizer_step,
)
from stages.training.tasks import LossInputs

log = logging.getLogger(__name__)


def learning_rate(train: TrainConfig, epoch: int) -> float:
    """VSE++'s step schedule: ``lr * lr_decay ** (epoch // lr_update)``."""
    return train.lr * train.lr_decay ** (epoch // train.lr_update) if train.lr_update else train.lr


def selection_score(metrics: dict, select: str) -> float:
    """The validation score the best model is kept by: ``rsum`` (R@1 + R@5 + R@10 both
    ways: VSE++, VSE-infinity) or ``r1r5`` (R@1 + R@5 both ways, no R@10: VSRN's
    ``train.py``); -inf without metrics."""
    if "rsum" not in metrics:
        return -math.inf
    if select == "rsum":
        return metrics["rsum"]
    return sum(metrics[f"r{k}_{d}"] for k in (1, 5) for d in ("i2t", "t2i"))


def build_optimizer(model: EmbeddingModel, loss_fn: RetrievalLoss, lr: float,
                    optimizer: str = "adam", weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam (or AdamW, decoupled ``weight_decay``) over the model's parameter groups plus the
    loss's own parameters (a learnable temperature); each group keeps its ``lr_scale``."""
    groups = model.param_groups()
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "lr_scale": 1.0})
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    return kind(groups, lr=lr, weight_decay=weight_decay)


@dataclass
class Progression:
    """Where a run is: ``epoch`` (epochs completed), ``epoch_step`` (batches done in the
    current epoch), ``step`` (batches in all), the best validation so far (its
    :func:`selection_score` and its rsum), the last validation's metrics, and the current
    epoch's sums of each loss term."""

    epoch: int = 0
    epoch_step: int = 0
    step: int = 0
    best_score: float = -math.inf
    best_rsum: float = -math.inf
    best_epoch: int = -1
    metrics: dict = field(default_factory=dict)
    loss_sums: dict = field(default_factory=dict)


def _to_device(batch: dict, device: torch.device) -> dict:
    """Batch tensors onto ``device``; ``lengths`` stay on the CPU (packing wants them there)."""
    return {k: v if k == "lengths" else v.to(device, non_blocking=True)
            for k, v in batch.items()}


def _global_batch(inputs: LossInputs) -> LossInputs:
    """Every rank's rows of the loss inputs gathered into the global batch, in the
    one-process order, with gradients (:func:`~stages.training.distributed.gather_batch`):
    the anchors and, row for row with them, their offline negatives."""
    sizes = rank_sizes(inputs.image_ids.shape[0], inputs.image_ids.device)
    offline = inputs.offline
    if offline is not None:
        offline = OfflineNegatives(**{f: gather_batch(getattr(offline, f), sizes)
                                      for f in OfflineNegatives.__dataclass_fields__})
    return LossInputs(gather_batch(inputs.img_emb, sizes), gather_batch(inputs.cap_emb, sizes),
                      gather_batch(inputs.image_ids, sizes), offline)


def _mean_loss_gradients(loss_fn: RetrievalLoss) -> None:
    """Average the loss's own parameters' gradients over the ranks (each rank's loss over
    its local batch: local negatives), as DistributedDataParallel does the model's."""
    import torch.distributed as dist
    for p in loss_fn.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size()


class Trainer:
    """Trains ``model`` on ``task``'s batches with ``loss_fn``.

    ``validate(model) -> metrics`` (with ``rsum``) runs at each epoch's end;
    ``checkpoint_info`` (model spec, config, vocab, data fingerprint) goes into every
    checkpoint beside the training state; ``scalars`` (optional) receives every step's loss
    terms and every validation, e.g. a TensorBoard writer with ``add(step, values,
    prefix)``; ``reminer`` (optional, :class:`stages.pipeline.remine.Reminer`) re-mines the task's
    offline candidates before the epochs it is due, and its ``history`` goes into every
    checkpoint (``remined``).

    With several processes (torchrun: :mod:`stages.training.distributed`) each rank encodes
    its share of every global batch of ``train.batch_size`` pairs through
    DistributedDataParallel; with ``train.global_negatives`` the shares' embeddings are
    gathered with gradients, so every rank's loss is the one-process loss of the global
    batch, and the memory bank holds the global batches on every rank. Rank 0 validates
    and writes the files; the others wait at a barrier.
    """

    def __init__(self, model: EmbeddingModel, loss_fn: RetrievalLoss, task, train: TrainConfig,
                 memory: MemoryConfig, device: torch.device, run_dir: Path,
                 validate: Callable[[EmbeddingModel], dict], checkpoint_info: dict,
                 workers: int = 0, scalars=None, features_hint: str = "", reminer=None):
        self.model = model.to(device)
        self.loss_fn = loss_fn.to(device)
        self.task = task
        self.train = train
        self.device = device
        self.run_dir = Path(run_dir)
        self.validate = validate
        self.checkpoint_info = checkpoint_info
        self.workers = workers
        self.scalars = scalars
        self.features_hint = features_hint
        self.reminer = reminer
        self.memory = MemoryBank(memory.size, memory.warmup_steps)
        self.optimizer = build_optimizer(model, loss_fn, train.lr, train.optimizer,
                                         train.weight_decay)
        # fp16's loss scaling (off, and a no-op, for fp32 and bf16)
        self.scaler = torch.amp.GradScaler(device.type, enabled=train.precision == "fp16")
        self.progress = Progression()
        # every step's forward pass (through DistributedDataParallel with several processes)
        self.forward = wrap_forward(self.model, task, device)

    # --- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resume needs, as plain tensors and Python values."""
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        # each rank's generators (their dropout draws differ), rank 0's first
        rngs = all_ranks({"torch": torch.get_rng_state(), "cuda": cuda_rng})
        return {**self.checkpoint_info, "world_size": world_size(),
                "state_dict": {k: v.cpu() for k, v in self.model.state_dict().items()},
                "loss_state": {k: v.cpu() for k, v in self.loss_fn.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "memory": self.memory.state_dict(), **asdict(self.progress),
                **({"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
                "rng": rngs[0], **({"rng_ranks": rngs} if len(rngs) > 1 else {}),
                **({"remined": list(self.reminer.history)} if self.reminer is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``last.pt`` written by :meth:`state_dict`, with as many
        processes as wrote it (another number would cut the batches otherwise)."""
        saved = state.get("world_size", 1)
        if saved != world_size():
            raise UserError(
                f"this run was trained with {saved} process{'es' if saved > 1 else ''} and is "
                f"resumed with {world_size()}: resume it with the same number (torchrun "
                f"--nproc_per_node={saved} ..., or no torchrun for 1), or start a new run")
        self.model.load_state_dict(state["state_dict"])
        self.loss_fn.load_state_dict(state.get("loss_state", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        if "memory" in state:
            self.memory.load_state_dict(state["memory"], self.device)
        if self.scaler.is_enabled() and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.progress = Progression(**{k: state[k] for k in Progression.__dataclass_fields__
                                       if k in state})
        if "best_score" not in state:  # a last.pt from before train.select: kept by rsum
            self.progress.best_score = self.progress.best_rsum
        rng = state["rng_ranks"][rank()] if "rng_ranks" in state else state["rng"]
        torch.set_rng_state(rng["torch"])
        cuda_rng = rng.get("cuda")
        if self.device.type == "cuda" and cuda_rng is not None:
            if isinstance(cuda_rng, list):  # a last.pt from before: every device's state
                torch.cuda.set_rng_state_all(cuda_rng)
            else:
                torch.cuda.set_rng_state(cuda_rng, self.device)

    def _drop_metrics_after(self, epoch: int) -> None:
        """Keep the metrics lines of epochs up to ``epoch`` only, so a run continued from
        there (resumed, or started over when no last.pt was saved yet) leaves one line per
        validated epoch: lines written after the last checkpoint (a kill or a full disk
        between the metrics line and last.pt) would be written again. A line that is not
        JSON is the remains of a write cut short, and goes too."""
        path = self.run_dir / "metrics.jsonl"
        if not is_main() or not path.exists():
            return
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        keep, later, torn = [], 0, 0
        for line in filter(str.strip, lines):
            try:
                record = json.loads(line)
            except ValueError:
                torn += 1
                continue
            if (isinstance(record, dict) and record.get("stage") == "train"
                    and record.get("epoch", 0) > epoch):
                later += 1
            else:
                keep.append(line)
        if len(keep) != len(lines):
            if later or torn:
                log.info("%s: dropped %d lines of epochs after %d (written after the "
                         "checkpoint this run continues from) and %d lines cut short", path,
                         later, epoch, torn)
            write_text(path, "".join(line + "\n" for line in keep))

    def _save(self, name: str, state: dict) -> None:
        if is_main():
            if self.scalars is not None:  # points up to a checkpoint's step are on disk first
                self.scalars.flush()
            save_checkpoint(self.run_dir / name, state)
        barrier()  # no rank goes on before the checkpoint is whole

    # --- the loop ------------------------------------------------------------------------
    def step(self, batch: dict) -> dict[str, float]:
        """One optimisation step; returns each loss term's value (and ``loss``, the sum)."""
        batch = _to_device(batch, self.device)
        with autocast(self.device, self.train.precision):
            output = ModelOutput(*self.forward(batch))
        if self.train.precision != "fp32":  # the losses in float32 (fp32 runs: as computed)
            output = output.float()
        inputs = self.task.loss_inputs(output, batch)
        global_batch = world_size() > 1 and self.train.global_negatives
        if global_batch:
            inputs = _global_batch(inputs)
        terms = self.loss_fn(inputs.img_emb, inputs.cap_emb, inputs.image_ids,
                             extra=self.memory.references(), offline=inputs.offline)
        terms.update(output.aux_losses)
        loss = sum(terms.values())
        names = [*terms, "loss"]
        values = dict(zip(names, torch.stack([t.detach() for t in (*terms.values(), loss)])
                          .tolist(), strict=True))
        values = mean_over_ranks(values)  # the log's: the ranks' mean
        if not math.isfinite(values["loss"]):
            # Features that are not finite are the usual cause: name the first such image.
            check_finite(batch["images"], batch["image_ids"], self.task.dataset.split)
            p = self.progress
            bad = ", ".join(f"{k} {v}" for k, v in values.items() if not math.isfinite(v))
            raise UserError(
                f"loss is {values['loss']} ({bad}) at epoch {p.epoch + 1}, step {p.step + 1} "
                f"(batch {p.epoch_step + 1} of the epoch); lower train.lr, check "
                f"{self.features_hint or 'the features'} for NaN/inf values, or resume from "
                f"{self.run_dir / 'last.pt'} with --resume")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if world_size() > 1 and not global_batch:
            _mean_loss_gradients(self.loss_fn)
        if self.scaler.is_enabled():  # fp16: true gradients before clipping
            self.scaler.unscale_(self.optimizer)
        if self.train.grad_clip > 0:
            clip_gradients(self.optimizer.param_groups, self.train.grad_clip)
        if not self.scaler.is_enabled() or gradients_finite(self.optimizer):
            optimizer_step(self.optimizer)  # fp16: a step whose gradients overflowed is skipped
        self.scaler.update()  # fp16: a smaller scale after an overflow, larger after a while
        self.memory.push(inputs.img_emb, inputs.cap_emb, inputs.image_ids)
        return values

    def fit(self) -> None:
        """Train until ``train.epochs`` epochs are done, from wherever the run is."""
        t, p = self.train, self.progress
        self._drop_metrics_after(p.epoch)
        while p.epoch < t.epochs:
            if self.reminer is not None:
                self.reminer.start_epoch(self.model, p.epoch, p.epoch_step)
            lr = learning_rate(t, p.epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            self.loss_fn.set_epoch(p.epoch)
            self.task.set_epoch(p.epoch)
            # train.batch_size is the global batch: each rank takes its share of it
            batches = self.task.epoch_batches(t.batch_size // world_size(), t.seed, p.epoch,
                                              rank(), world_size(), t.drop_last)
            loader = DataLoader(self.task.dataset, batch_sampler=batches[p.epoch_step:],
                                collate_fn=self.task.collate, num_workers=self.workers,
                                pin_memory=self.device.type == "cuda",
                                generator=torch.Generator().manual_seed(t.seed))
            self.model.train()
            t0 = time.perf_counter()
            with Progress(len(batches), f"epoch {p.epoch + 1}/{t.epochs}", unit="it",
                          start=p.epoch_step) as bar:
                for batch in loader:
                    values = self.step(batch)
                    p.step += 1
                    p.epoch_step += 1
                    for name, value in values.items():
                        p.loss_sums[name] = p.loss_sums.get(name, 0.0) + value
                    if self.scalars is not None:
                        self.scalars.add(p.step, values, prefix="train")
                    bar.update(1, **{k: f"{v:.3f}" for k, v in values.items()},
                               lr=f"{lr:.1e}")
                    if t.ckpt_every and p.epoch_step % t.ckpt_every == 0:
                        self._save("last.pt", self.state_dict())
            self._end_epoch(lr, len(batches), time.perf_counter() - t0)

    def _end_epoch(self, lr: float, num_batches: int, seconds: float) -> None:
        p = self.progress
        metrics = self.validate(self.model) if is_main() else {}
        metrics = from_main(metrics)  # every rank waits for rank 0's validation
        self.model.save_cache()  # the epoch's new frozen outputs, for later processes
        means = {f"loss_{k}" if k != "loss" else "train_loss": v / max(num_batches, 1)
                 for k, v in p.loss_sums.items()}
        record = {"stage": "train", "epoch": p.epoch + 1, "step": p.step, **metrics,
                  "lr": lr, **means, "epoch_seconds": round(seconds, 2)}
        if is_main():
            append_jsonl(self.run_dir / "metrics.jsonl", record)
            if self.scalars is not None:
                self.scalars.add(p.step, {k: v for k, v in record.items()
                                          if isinstance(v, float | int) and k != "step"},
                                 prefix="val")
            log.info("epoch %d: rsum %.2f (R@1 i2t %.1f t2i %.1f), loss %.4f", p.epoch + 1,
                     metrics.get("rsum", math.nan), metrics.get("r1_i2t", math.nan),
                     metrics.get("r1_t2i", math.nan), record.get("train_loss", math.nan))
        p.epoch += 1
        p.epoch_step = 0
        p.loss_sums = {}
        p.metrics = metrics
        score = selection_score(metrics, self.train.select)
        is_best = score > p.best_score
        if is_best:
            p.best_score, p.best_rsum, p.best_epoch = score, metrics["rsum"], p.epoch
        state = self.state_dict()
        if is_best:
            self._save("best.pt", state)
        self._save("last.pt", state)
