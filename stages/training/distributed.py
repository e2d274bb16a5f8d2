"""Process ranks: one process today; torch.distributed (torchrun) when it is initialised.

Files are written by rank 0 only (:func:`is_main`); every rank computes the same batch order
and takes its own share of each batch (:mod:`stages.training.batches`).
"""

import torch.distributed as dist


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes files (checkpoints, logs, metrics)."""
    return rank() == 0
