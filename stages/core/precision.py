"""Mixed precision: the forward passes of training and inference under ``torch.autocast``
(``bf16`` or ``fp16``), the losses and every stored embedding in float32.

``fp32`` runs as before (no autocast). ``bf16`` keeps float32's range, so it needs no loss
scaling; ``fp16`` does, and training pairs it with a ``torch.amp.GradScaler``
(:class:`stages.training.loop.Trainer`). Both run on CUDA; on the CPU, autocast supports
them too (slower than float32 on most CPUs: for tests and checks).
"""

import contextlib

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """A context under which ``device``'s operations run in ``precision`` where autocast
    allows (matrix products, convolutions; reductions and norms stay float32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
