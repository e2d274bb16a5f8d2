"""Checkpoints: plain dicts (no pickled objects), written atomically, loaded with checks.

Keys: ``format``, ``version``, ``model`` ({name, args}), ``state_dict``, ``optimizer``,
``epoch`` (epochs completed), ``epoch_step`` (batches done in the current epoch), ``step``,
``best_rsum``, ``best_epoch``, ``config`` (resolved), ``vocab`` (the vocabulary itself),
``data_fingerprint``, ``rng``, ``metrics`` (last validation). A later stage rebuilds the
model from the checkpoint alone.
"""

import hashlib
import os
from pathlib import Path

import torch

from ..data.vocab import Vocab
from ..errors import UserError
from ..models import MODELS, build_model
from .atomic import atomic_path

CHECKPOINT_FORMAT = "aoq-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (a plain dict of tensors and Python values) atomically."""
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint onto the CPU, refusing anything that is not this project's."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; train one with `aoq train` "
                        "(or `make train DATA=...`)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated files, pickles of foreign objects
        raise UserError(f"{path}: not a checkpoint of this project ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}); VSE++/SCAN checkpoints (pickled "
                        "argparse options) cannot be loaded, retrain with `aoq train`") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint of this project (no "
                        f"format={CHECKPOINT_FORMAT!r}); retrain with `aoq train`")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint version {state['version']} is newer than this "
                        f"code understands ({CHECKPOINT_VERSION}); update the package")
    return state


def model_from_checkpoint(state: dict, source: str = "checkpoint"):
    """Rebuild (model, vocab) from a loaded checkpoint; the model is on the CPU, eval mode."""
    spec = state["model"]
    options = MODELS.options(spec["name"])
    model = build_model(spec["name"], {k: v for k, v in spec["args"].items() if k in options},
                        **{k: v for k, v in spec["args"].items() if k not in options})
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"{source}: weights do not fit model {spec['name']!r} with "
                        f"{spec['args']}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return model, Vocab.from_json(state["vocab"], source)


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the model weights (names, shapes, bytes): identifies a checkpoint's model
    independently of optimizer state and file name. First 16 hex digits."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]
