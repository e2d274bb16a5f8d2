"""How a features file was made: the feature command's options, as its attributes record them.

The features stage records them in every ``{split}.h5`` it writes (with the data, holding
the dataset folder's lock) and refuses to replace a finished file that records others: the
features of a dataset are shared by every run trained on it. ``aoq settings --stage
features`` (make's stamp for the features) compares them with the attributes of
``train.h5``, so a changed ``CNN=``, ``WEIGHTS=``, ``TSV=`` or ``FEATURE_OPTS=`` runs the
stage, which refuses it, instead of keeping the old features silently. Computed from the
options alone, without torch.
"""

from pathlib import Path

import h5py
import numpy as np

from stages.core.errors import UserError
from stages.io.atomic import plain_attrs


def cnn_identity(images_root: str | Path, arch: str, weights: str, grid: bool, seed: int,
                 crops: int, crop_size: int, dtype: str) -> dict:
    """What ``aoq features cnn`` records (``seed`` only draws ``weights="random"``)."""
    return {"source": "cnn", "kind": "grid" if grid else "global", "arch": arch,
            "weights": weights, **({"seed": seed} if weights == "random" else {}),
            "crops": crops, "crop_size": crop_size,
            "images_root": str(Path(images_root).resolve()), "dtype": dtype}


def tsv_identity(tsv_files: list[str | Path], max_regions: int, feature_dim: int,
                 dtype: str) -> dict:
    """What ``aoq features tsv`` records (a TSV file that is missing has no size)."""
    paths = [Path(p) for p in tsv_files]
    return {"source": "butd-tsv", "tsv_files": [str(p.resolve()) for p in paths],
            "tsv_bytes": [p.stat().st_size if p.is_file() else None for p in paths],
            "item_shape": [max_regions, feature_dim], "dtype": dtype}


def recorded_identity(path: Path, identity: dict) -> dict | None:
    """What the finished features file ``path`` records for each key of ``identity``
    (None: there is no such file)."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            attrs = plain_attrs(f.attrs)
    except OSError:  # unreadable: it records nothing (the readers say what is wrong)
        attrs = {}
    return {key: _plain(attrs.get(key)) for key in identity}


def _plain(value):
    return np.asarray(value).tolist() if isinstance(value, np.ndarray) else value


def refuse_other_identity(path: Path, identity: dict) -> None:
    """Fail when the finished features file ``path`` was made with other options than
    ``identity``: replacing it would change the features of every run of the dataset."""
    recorded = recorded_identity(path, identity)
    if recorded is None:
        return
    changes = [f"{key}: {recorded[key]!r} -> {value!r}" for key, value in identity.items()
               if recorded[key] != value]
    if changes:
        raise UserError(
            f"{path} holds features made with other settings ({'; '.join(changes)}); give "
            "the settings it was made with (make: CNN=, WEIGHTS=, TSV=, FEATURE_OPTS=), "
            f"make these features as a dataset of their own (make features DATA=<new name> "
            f"...), or delete {path.parent}/*.h5 to make them again")
