"""Checkpoints: plain dicts (no pickled objects), written atomically, loaded with checks.

Keys: ``format``, ``version``, ``model`` ({name, args}), ``state_dict``, ``optimizer``,
``epoch`` (epochs completed), ``epoch_step`` (batches done in the current epoch), ``step``,
``best_score`` (the best validation by ``train.select``), ``best_rsum`` (that validation's
rsum), ``best_epoch``, ``config`` (resolved), ``vocab`` (the caption tokenizer's
description: the vocabulary itself, or a pretrained tokenizer's files, see
:mod:`stages.data.tokenizers`), ``data_fingerprint``, ``rng``, ``metrics`` (last
validation). A later stage rebuilds the model from the checkpoint alone.
"""

import hashlib
import os
import pickle
from pathlib import Path

import torch

from stages.core.errors import UserError
from stages.io.atomic import atomic_path

CHECKPOINT_FORMAT = "aoq-checkpoint"
CHECKPOINT_VERSION = 1
# What the later stages read from a checkpoint.
REQUIRED_KEYS = ("model", "state_dict", "epoch", "config", "vocab", "data_fingerprint")


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested dict/list (about a checkpoint's size on disk)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (a plain dict of tensors and Python values) atomically.

    The free space is checked first (the tensors' size plus 1 MiB), and a disk that fills
    up midway is a :class:`~stages.core.errors.NoSpaceError`, not a traceback from torch's
    writer (the file is written through a Python file object, whose ``ENOSPC`` surfaces).
    """
    need = tensor_bytes(state) + (1 << 20)
    with atomic_path(path, need_bytes=need, what="a checkpoint") as tmp, open(tmp, "wb") as f:
        torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, f)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint onto the CPU, refusing anything that is not this project's."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; train one with `aoq train` "
                        "(or `make train DATA=...`)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated files, pickles of foreign objects
        detail = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        if _looks_truncated(path, exc):
            raise UserError(f"{path}: truncated or corrupt checkpoint ({detail}); delete it "
                            f"and rerun {_remake_hint(path)}") from exc
        raise UserError(f"{path}: not a checkpoint of this project ({detail}); VSE++/SCAN "
                        "checkpoints (pickled argparse options) cannot be loaded, retrain "
                        "with `aoq train`") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a checkpoint of this project (no "
                        f"format={CHECKPOINT_FORMAT!r}); retrain with `aoq train`")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint version {state['version']} is newer than this "
                        f"code understands ({CHECKPOINT_VERSION}); update the package")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    model = state.get("model")
    if not missing and not (isinstance(model, dict) and isinstance(model.get("args"), dict)
                            and "name" in model):
        missing = ["model.name/model.args"]
    if missing:
        raise UserError(f"{path}: checkpoint lacks {', '.join(missing)}; it is incomplete or "
                        f"was edited: delete it and rerun {_remake_hint(path)}")
    return state


def _looks_truncated(path: Path, exc: Exception) -> bool:
    """An empty file, or a torch zip archive (``PK`` magic) whose reading failed."""
    if isinstance(exc, EOFError):
        return True
    with open(path, "rb") as f:
        magic = f.read(4)
    return magic == b"PK\x03\x04" and not isinstance(exc, pickle.UnpicklingError)


def _remake_hint(path: Path) -> str:
    """The make command that rebuilds a checkpoint of ``runs/<DATA>/<RUN>/``."""
    run, data = path.parent.name, path.parent.parent.name
    if path.parent.parent.parent.name != "runs":
        return "the `make train` / `make retrain` (or `aoq train --resume`) that wrote it"
    again = ("; without last.pt the run starts over" if path.name == "last.pt"
             else "; the run resumes from its last.pt" if path.name == "checkpoint.pt" else "")
    return (f"`make train DATA={data} RUN={run}` (or `make retrain DATA={data} "
            f"AOQ_RUN={run}` for an AOQ run){again}")


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the model weights (names, shapes, bytes): identifies a checkpoint's model
    independently of optimizer state and file name. First 16 hex digits."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        # reshape: a 0-d tensor (batch norm's num_batches_tracked) cannot be viewed as bytes
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()[:16]
