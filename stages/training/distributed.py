"""Process ranks: one process, or torch.distributed when started by torchrun.

:func:`init_from_env` starts the process group from torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL on CUDA devices, gloo
on the CPU; without those variables nothing changes. Files are written by rank 0 only
(:func:`is_main`); every rank computes the same batch order and takes its own share of each
global batch (:mod:`stages.training.batches`: rank r takes items r, r + N, ... of it), and
:func:`gather_batch` puts the ranks' rows back into that global order, with gradients.
"""

import gc
import logging
import os
import warnings
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from stages.core.errors import UserError

log = logging.getLogger(__name__)

# A rank waits this long at a collective for the others (rank 0 validating, re-mining or
# writing a checkpoint while the others wait at a barrier) before it gives up.
TIMEOUT = timedelta(hours=2)


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes files (checkpoints, logs, metrics)."""
    return rank() == 0


def launched() -> bool:
    """Whether torchrun (or anything setting its variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device: torch.device) -> tuple[torch.device, bool]:
    """Start the process group from torchrun's environment, once; returns the device this
    rank trains on (``cuda:LOCAL_RANK`` for a CUDA device) and whether this call started the
    group (then :func:`destroy` ends it). Without torchrun's variables, or with a group
    already started: ``device`` unchanged, nothing started."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return device, False
    if not dist.is_available():
        raise UserError("torchrun started this process, but this PyTorch build has no "
                        "torch.distributed")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT,
                            **({"device_id": device} if device.type == "cuda" else {}))
    if not is_main():  # one log: rank 0's (the others say only what goes wrong)
        logging.getLogger().setLevel(logging.WARNING)
    log.info("process group: %d processes (%s), this is rank %d on %s", world_size(),
             backend, rank(), device)
    return device, True


def destroy() -> None:
    """End the process group :func:`init_from_env` started, after freeing what still uses
    it: a DistributedDataParallel wrapper held in a reference cycle would otherwise be
    freed at interpreter exit, after the group, and gloo's threads abort the process
    ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing with one process)."""
    if world_size() > 1:
        dist.barrier()


def from_main(value):
    """Rank 0's ``value`` on every rank (a picklable object; itself with one process)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_then_share(work: Callable[[], object]):
    """Run ``work`` on rank 0 only and hand its result to every rank; a :class:`UserError`
    it raises is raised on every rank (so the others stop too, instead of waiting)."""
    if world_size() == 1:
        return work()
    outcome: tuple = ("ok", None)
    if is_main():
        try:
            outcome = ("ok", work())
        except UserError as exc:
            outcome = ("error", str(exc))
            from_main(outcome)
            raise
    kind, value = from_main(outcome)
    if kind == "error":
        raise UserError(f"rank 0 stopped: {value}")
    return value


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value's mean over the ranks (the same keys on every rank)."""
    if world_size() == 1 or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return dict(zip(values, (t / world_size()).tolist(), strict=True))


def all_ranks(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` with one process."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_sizes(size: int, device: torch.device) -> list[int]:
    """Every rank's ``size`` (its share of a global batch), in rank order: one all_gather
    of an int64 tensor on ``device`` (all_gather_object would pickle it, and under NCCL
    copy it through the GPU, every step)."""
    n = world_size()
    if n == 1:
        return [size]
    mine = torch.tensor([size], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(parts, mine)
    return [int(p) for p in torch.cat(parts).tolist()]


def gather_batch(tensor: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """The global batch's rows from each rank's share ``tensor`` (b_r, ...), in the global
    order (row g from rank g % N, its row g // N: how :mod:`stages.training.batches` cuts a
    global batch), with gradients for floating tensors: ``torch.distributed.nn``'s
    all_gather, whose backward sums every rank's gradient of this rank's rows back to it
    (open_clip's ``gather_features`` with ``gather_with_grad``). The shares may differ by a
    row (an epoch's last batch): they are padded to the largest for the gather; ``sizes``
    (each rank's b_r) saves asking for them."""
    n = world_size()
    if n == 1:
        return tensor
    if sizes is None:
        sizes = rank_sizes(tensor.shape[0], tensor.device)
    most = max(sizes)
    padded = tensor
    if tensor.shape[0] < most:
        pad = tensor.new_zeros((most - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, pad])
    if tensor.is_floating_point() and tensor.requires_grad:
        import torch.distributed.nn.functional as dist_nn
        with warnings.catch_warnings():  # deprecated for a private successor
            warnings.simplefilter("ignore", FutureWarning)
            parts = dist_nn.all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(n)]
        dist.all_gather(parts, padded.contiguous())
    stacked = torch.cat(list(parts))
    total = sum(sizes)
    order = torch.tensor([(g % n) * most + g // n for g in range(total)],
                         device=tensor.device)
    return stacked.index_select(0, order)


class _TaskForward(nn.Module):
    """The task's forward pass as one module call, so DistributedDataParallel sees one
    forward per step whatever the task calls (the offline task's three passes, its
    ``encode_images``/``encode_captions``); returns (img_emb, cap_emb, aux_losses)."""

    def __init__(self, model: nn.Module, task):
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: dict):
        output = self.task.forward(self.model, batch)
        return output.img_emb, output.cap_emb, output.aux_losses


def wrap_forward(model: nn.Module, task, device: torch.device) -> Callable:
    """``forward(batch) -> (img_emb, cap_emb, aux_losses)``: ``task.forward(model, batch)``,
    through DistributedDataParallel when there are several processes (its gradients averaged
    over the ranks in the backward pass). The model itself stays unwrapped for checkpoints,
    validation and parameter groups."""
    module = _TaskForward(model, task)
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    # find_unused_parameters: a model whose parts sit out a step (a caption decoder without
    # its loss) must not stall the gradient reduction
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
