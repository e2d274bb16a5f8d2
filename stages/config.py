"""Typed configuration: dataclasses with VSE++'s published defaults, YAML files, overrides.

A config has sections (``data``, ``model``, ``loss``, ``train``, ``eval``). YAML files under
``configs/`` set some of their fields and are applied in order; then ``--set key=value``
overrides apply, where ``key`` is ``section.field`` or a bare field name that only one
section has (``--set lr=5e-4``). Unknown keys and values of the wrong type are errors that
list what is allowed.
"""

import contextlib
import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError


@dataclass
class DataConfig:
    """Which dataset, where, and how to read it."""

    name: str = "f30k_precomp"
    path: str = "data"  # the datasets root (DATA_PATH); the dataset is path/name
    train_split: str = "train"
    val_split: str = "dev"
    val_images: int = 0  # validate on the first N dev images (0: all); COCO uses 1000
    eval_split: str = "test"
    vocab: str = ""  # vocabulary JSON; empty: <path>/<name>/vocab.json
    workers: int = 2  # DataLoader worker processes


@dataclass
class ModelConfig:
    """The embedding model (VSE++ defaults)."""

    name: str = "vsepp"
    embed_size: int = 1024
    word_dim: int = 300
    num_layers: int = 1
    bidirectional: bool = False
    img_norm: bool = True


@dataclass
class LossConfig:
    """The training loss, picked by registered name (VSE++: max violation, margin 0.2).

    The AOQ losses (``aoq``, ``offquin``, ``offtri``) also use ``offline_margin``,
    ``alpha``, ``beta``, ``clamp_weights`` and ``detach_weights``.
    """

    name: str = "vse_max"
    margin: float = 0.2  # online margin (m_on)
    warmup_epochs: int = 0  # epochs of sum-of-violations before the max-violation loss
    mask_same_image: bool = False  # also mask in-batch pairs that share an image
    offline_margin: float = 0.0  # m_off
    alpha: float = 0.3
    beta: float = 1.5
    clamp_weights: bool = False  # clamp the adaptive weights at 0 (the reference does not)
    detach_weights: bool = False  # no gradient through the weights (the reference has one)


@dataclass
class TrainConfig:
    """Optimisation (VSE++ defaults: Adam 2e-4, x0.1 at epoch 15 of 30, batch 128, clip 2)."""

    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-4
    lr_update: int = 15
    lr_decay: float = 0.1
    grad_clip: float = 2.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    ckpt_every: int = 0  # also save last.pt every N steps within an epoch (0: epoch ends only)
    init_from: str = ""  # start from this checkpoint's weights (default: from scratch)


@dataclass
class OffcandiConfig:
    """Offline candidates: how they are mined, and how retraining samples them."""

    dir: str = ""  # candidate folder; empty: offcandi/<data.name>
    k_i2t: int = 300  # captions kept per image
    k_t2i: int = 60  # images kept per caption
    index: str = "flat"  # flat (exact) | hnsw | ivf (approximate, recall reported)
    nlist: int = 0  # ivf: inverted lists (0: 4 * sqrt(items))
    nprobe: int = 32  # ivf: lists visited per query
    ef_search: int = 256  # hnsw: candidates kept per query (at least K)
    block_size: int = 4096  # queries per search block
    recall_sample: int = 1000  # queries on which an approximate index is checked
    threads: int = 0  # FAISS threads (0: all this process may use)
    hardest: int = 300  # h: a negative is drawn uniformly from the top h (t2i: top h / 5)
    base_ckpt: str = ""  # retrain refuses candidates not mined with this checkpoint
    # False-negative filter (0: off): skip candidates scoring above ratio x the query's
    # positive score (i2t: mean over the image's captions), likely true matches.
    false_negative_ratio: float = 0.0


@dataclass
class EvalConfig:
    """Evaluation protocol."""

    fold5: bool = False  # COCO 5-fold 1K on a 5000-image split, instead of the whole split
    block_size: int = 1024  # images per block of the similarity matrix


@dataclass
class Config:
    """The resolved configuration of a run; saved in run folders and checkpoints."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    offcandi: OffcandiConfig = field(default_factory=OffcandiConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "Config":
        config = cls()
        apply_mapping(config, values, source)
        return config

    def dataset_dir(self) -> Path:
        return Path(self.data.path) / self.data.name

    def candidates_dir(self) -> Path:
        return Path(self.offcandi.dir) if self.offcandi.dir else Path("offcandi") / self.data.name

    def vocab_path(self) -> Path:
        return Path(self.data.vocab) if self.data.vocab else self.dataset_dir() / "vocab.json"


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def _field_types(section_obj) -> dict[str, type]:
    hints = typing.get_type_hints(type(section_obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(section_obj)}


def _coerce(value, target: type, key: str, source: str):
    """Check ``value`` against the field type ``target``; YAML strings like '5e-4' are parsed."""
    origin = typing.get_origin(target)
    if origin in (typing.Union, types.UnionType):
        target = next(t for t in typing.get_args(target) if t is not type(None))
    ok = False
    if target is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            value = value.lower() in ("true", "1", "yes")
        elif type(value) is int and value in (0, 1):  # FOLD5=1 on a make command line
            value = bool(value)
        ok = isinstance(value, bool)
    elif target is int:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif target is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif target is str:
        ok = value is not None and not isinstance(value, (dict, list))
        value = str(value) if ok else value
    if not ok:
        raise UserError(f"{source}: {key} must be {target.__name__}, got {value!r}")
    return value


def set_value(config: Config, key: str, value, source: str) -> None:
    """Set ``section.field`` (or a bare field name unique across sections) to ``value``."""
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise UserError(f"{source}: unknown section {section!r} in {key!r}; "
                            f"sections are {', '.join(SECTIONS)}")
    else:
        owners = [s for s in SECTIONS if key in _field_types(getattr(config, s))]
        if not owners:
            known = sorted(f"{s}.{n}" for s in SECTIONS for n in _field_types(getattr(config, s)))
            raise UserError(f"{source}: unknown key {key!r}; known keys: {', '.join(known)}")
        if len(owners) > 1:
            raise UserError(f"{source}: {key!r} is ambiguous, write one of "
                            + ", ".join(f"{s}.{key}" for s in owners))
        section, name = owners[0], key
    section_obj = getattr(config, section)
    types_ = _field_types(section_obj)
    if name not in types_:
        raise UserError(f"{source}: unknown key {section}.{name}; {section} has: "
                        f"{', '.join(types_)}")
    setattr(section_obj, name, _coerce(value, types_[name], f"{section}.{name}", source))


def apply_mapping(config: Config, values: dict, source: str) -> None:
    """Apply a nested ``{section: {field: value}}`` mapping (a YAML file's content)."""
    if not isinstance(values, dict):
        raise UserError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)})")
    for section, fields_ in values.items():
        if section not in SECTIONS:
            raise UserError(f"{source}: unknown section {section!r}; "
                            f"sections are {', '.join(SECTIONS)}")
        if not isinstance(fields_, dict):
            raise UserError(f"{source}: section {section!r} must be a mapping")
        for name, value in fields_.items():
            set_value(config, f"{section}.{name}", value, source)


def parse_override(text: str) -> tuple[str, object]:
    """Split ``key=value``; the value is read as YAML (``true``, ``3``, ``abc``)."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected key=value, e.g. --set train.lr=5e-4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(config_files: typing.Iterable[str | Path] = (),
                overrides: typing.Iterable[str] = (),
                base: Config | None = None) -> Config:
    """Defaults (or a copy of ``base``), then each YAML file in order, then overrides."""
    config = copy.deepcopy(base) if base is not None else Config()
    for path in config_files:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found; the shipped ones are under configs/")
        with open(path, encoding="utf-8") as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise UserError(f"{path}: not valid YAML: {exc}") from exc
        apply_mapping(config, values, str(path))
    for text in overrides:
        key, value = parse_override(text)
        set_value(config, key, value, f"--set {text}")
    return config


def config_diff(a: dict, b: dict) -> list[str]:
    """Keys (``section.field``) whose values differ between two config dicts."""
    diffs = []
    for section in SECTIONS:
        sa, sb = a.get(section, {}), b.get(section, {})
        for name in sorted(set(sa) | set(sb)):
            if sa.get(name) != sb.get(name):
                diffs.append(f"{section}.{name}: {sa.get(name)!r} -> {sb.get(name)!r}")
    return diffs
