"""Device choice, made once per stage."""

import logging

import torch

from stages.core.errors import UserError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA device is visible; use "
                        "--set train.device=cpu or auto")
    threads = torch.get_num_threads()
    log.info("device: %s%s", device,
             f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({threads} thread{'' if threads == 1 else 's'})")
    return device
