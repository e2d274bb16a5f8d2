"""Typed configuration: dataclasses with VSE++'s published defaults, YAML files, overrides.

A config has sections (``data``, ``model``, ``loss``, ``train``, ``memory``, ``offcandi``,
``eval``). YAML files under ``configs/`` set some of their fields and are applied in order;
then ``--set key=value`` overrides apply, where ``key`` is ``section.field`` or a bare field
name that only one section has (``--set lr=5e-4``). Unknown keys, values of the wrong type
and values out of range are errors that say what is allowed.

``model`` and ``loss`` are *named blocks*: ``name`` picks a registered class and the other
keys are that class's constructor options (``model.embed_size``, ``loss.temperature``). They
are checked once the whole config is read (so ``--set loss.temperature=0.05 --set
loss.name=infonce`` works in either order); an option the chosen class does not take is an
error that names the classes that take it.
"""

import copy
import dataclasses
import itertools
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import yaml

from stages.core.errors import UserError
from stages.core.values import OneOf, Range, check_value

log = logging.getLogger(__name__)

NonNegative = Range(min=0)
Positive = Range(min=0, min_open=True)
AtLeastOne = Range(min=1)


@dataclass
class DataConfig:
    """Which dataset, where, and how to read it."""

    name: str = "f30k_precomp"
    path: str = "data"  # the datasets root (DATA_PATH); the dataset is path/name
    train_split: str = "train"
    val_split: str = "dev"
    # validate on the first N dev images (0: all); COCO and Flickr30K use 1000
    val_images: Annotated[int, NonNegative] = 0
    eval_split: str = "test"
    vocab: str = ""  # vocabulary JSON; empty: <path>/<name>/vocab.json
    # image root of {split}_images.txt, for models that read raw images (model vse_cnn)
    images: str = ""
    workers: Annotated[int, NonNegative] = 2  # DataLoader worker processes
    # keep a whole frozen text tower's outputs on disk for later processes, in files under
    # text_cache_dir (empty: <path>/<name>/cache)
    text_cache: bool = True
    text_cache_dir: str = ""


@dataclass
class NamedBlock:
    """A config block naming a registered class (``kind``: model | loss) and its options.

    ``values`` holds the options set explicitly (raw); :meth:`options` gives every option of
    the named class, defaults filled in and each value checked. ``layers`` says which layer
    (a config file, a file's ``retrain:`` block, the ``--set`` overrides) set each option:
    a later layer that names another class drops the options earlier layers set that the new
    class does not take (a model file's ``loss.warmup_epochs`` for ``vse_max`` does not
    follow the loss to ``aoq``); options of the naming layer or later are checked strictly.
    """

    kind: str
    name: str
    values: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict, compare=False, repr=False)

    def rename(self, name: str, layer: int, source: str) -> None:
        """Name another class; options set by layers before ``layer`` that it does not take
        are dropped (logged)."""
        registry = self.registry()
        registry.check_name(name)  # unknown names fail here
        if name != self.name:
            takes = registry.options(name)
            for key in [k for k in self.values
                        if k not in takes and self.layers.get(k, layer) < layer]:
                log.info("%s.%s=%r dropped: %s names %s %r, which does not take it",
                         self.kind, key, self.values.pop(key), source, self.kind, name)
                self.layers.pop(key, None)
        self.name = name

    def registry(self):
        """The names and options of this kind (from the options cache when it is fresh, so
        checking a config needs no torch; see :mod:`stages.config.options`)."""
        from stages.config.options import option_registry
        return option_registry(self.kind)

    def options(self, source: str = "config") -> dict:
        return self.registry().resolve(self.name, self.values, source)

    def to_dict(self) -> dict:
        return {"name": self.name, **self.options()}


@dataclass
class TrainConfig:
    """Optimisation (VSE++ defaults: Adam 2e-4, x0.1 at epoch 15 of 30, batch 128, clip 2)."""

    epochs: Annotated[int, AtLeastOne] = 30
    batch_size: Annotated[int, AtLeastOne] = 128
    lr: Annotated[float, Positive] = 2e-4
    lr_update: Annotated[int, NonNegative] = 15  # decay every N epochs (0: never)
    lr_decay: Annotated[float, Range(min=0, max=1, min_open=True)] = 0.1
    grad_clip: Annotated[float, NonNegative] = 2.0  # max gradient norm (0: no clipping)
    # drop each epoch's last batch when it is smaller than batch_size (VSE-infinity)
    drop_last: bool = False
    # the validation score best.pt (and so checkpoint.pt) is kept by: rsum (R@1+5+10 both
    # ways: VSE++, VSE-infinity) | r1r5 (R@1+5 both ways: VSRN)
    select: Annotated[str, OneOf("rsum", "r1r5")] = "rsum"
    # the forward pass under autocast (bf16, fp16 with a GradScaler); losses in float32
    precision: Annotated[str, OneOf("fp32", "bf16", "fp16")] = "fp32"
    # adam (VSE++, VSRN, AOQ) | adamw (VSE-infinity); weight_decay: Adam's L2 term, AdamW's
    # decoupled decay
    optimizer: Annotated[str, OneOf("adam", "adamw")] = "adam"
    weight_decay: Annotated[float, NonNegative] = 0.0
    seed: Annotated[int, NonNegative] = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # also save last.pt every N steps within an epoch (0: epoch ends only)
    ckpt_every: Annotated[int, NonNegative] = 0
    init_from: str = ""  # start from this checkpoint's weights (default: from scratch)
    # pairs plus offline negatives from the candidate files (the retrain stage sets it)
    offline_negatives: bool = False
    # with several processes (torchrun): every rank's embeddings join the loss (the global
    # batch's negatives, as one process with the whole batch); false: each rank's own only
    global_negatives: bool = True


@dataclass
class MemoryConfig:
    """Cross-batch memory (Wang et al. 2020, XBM): the last ``size`` image and caption
    embeddings (detached) join every loss's reference set as extra negatives."""

    size: Annotated[int, NonNegative] = 0  # embeddings kept per side (0: off)
    warmup_steps: Annotated[int, NonNegative] = 0  # steps before the bank is used


@dataclass
class OffcandiConfig:
    """Offline candidates: how they are mined, and how retraining samples them."""

    dir: str = ""  # candidate folder; empty: offcandi/<data.name>
    k_i2t: Annotated[int, AtLeastOne] = 300  # captions kept per image
    k_t2i: Annotated[int, AtLeastOne] = 60  # images kept per caption
    # flat (exact) | hnsw | ivf | ivfpq (approximate, recall reported; ivfpq: product-
    # quantized codes, pq_m bytes a vector, for millions of items)
    index: Annotated[str, OneOf("flat", "hnsw", "ivf", "ivfpq")] = "flat"
    nlist: Annotated[int, NonNegative] = 0  # ivf, ivfpq: inverted lists (0: 4 * sqrt(items))
    nprobe: Annotated[int, AtLeastOne] = 32  # ivf, ivfpq: lists visited per query
    # ivfpq: sub-quantizers (code bytes a vector at 8 bits); they must divide the embedding
    # size (0: the largest of FAISS's GPU-supported counts leaving >= 8 dims each: 32 at 256)
    pq_m: Annotated[int, NonNegative] = 0
    pq_bits: Annotated[int, Range(min=1, max=16)] = 8  # ivfpq: bits per sub-quantizer code
    opq: bool = False  # ivfpq: learn an OPQ rotation first (better codes, slower training)
    # true: when FAISS is built for GPUs (faiss-gpu) and sees some, search there (the index
    # sharded over all of them, IVF lists in float16; hnsw stays on the CPU), else on the
    # CPU; false (the default): the CPU, so the candidates never depend on whether the
    # machine has faiss-gpu, which the settings stamp cannot see
    gpu: bool = False
    ef_search: Annotated[int, AtLeastOne] = 256  # hnsw: candidates kept per query (>= K)
    block_size: Annotated[int, AtLeastOne] = 4096  # queries per search block
    # queries on which an approximate index is checked
    recall_sample: Annotated[int, NonNegative] = 1000
    threads: Annotated[int, NonNegative] = 0  # FAISS threads (0: OMP_NUM_THREADS, else all)
    # h: a negative is drawn uniformly from the top h (t2i: top h / 5)
    hardest: Annotated[int, AtLeastOne] = 300
    # retrain refuses candidates not mined with this checkpoint (or text:<model folder>,
    # the pretrained text miner of `aoq embed-text`; clip:<arch>:<weights file>, the
    # pretrained open_clip miner of `aoq embed-clip`)
    base_ckpt: str = ""
    # False-negative-aware selection (stages/mining/selection.py), applied when retraining
    # draws, so changing it needs no mining; each is off at 0. Skip candidates scoring above
    # ratio x the query's positive score (i2t: mean over the image's captions) ...
    false_negative_ratio: Annotated[float, NonNegative] = 0.0
    # ... or above positive - margin ...
    false_negative_margin: Annotated[float, NonNegative] = 0.0
    # ... or whose words overlap the anchor's captions by at least this Jaccard ...
    duplicate_overlap: Annotated[float, Range(min=0, max=1)] = 0.0
    # ... and each row's skip_top hardest (sample from ranks skip_top.. of what remains).
    skip_top: Annotated[int, NonNegative] = 0
    # A second candidate folder (another miner's), mixed in: each caption takes its offline
    # negatives from it with probability mix_share; mix_base_ckpt checks its miner as
    # base_ckpt does. Empty: off.
    mix_dir: str = ""
    mix_base_ckpt: str = ""
    mix_share: Annotated[float, Range(min=0, max=1)] = 0.5
    # Hardness curriculum: the sampled window slides from each row's easiest eligible
    # candidates (epoch 1) to its hardest (epoch curriculum_epochs + 1 on); 0: off.
    curriculum_epochs: Annotated[int, NonNegative] = 0
    # Batches of groups of group_size captions whose images are each other's offline
    # candidates (a caption, then captions of its image's eligible candidates in the top
    # hardest), so the in-batch negatives are hard too; 0: random batches.
    group_size: Annotated[int, NonNegative] = 0
    # Re-mine inside the run: every N epochs the model being trained embeds the training
    # split and mines new candidates (the K and FAISS settings of offcandi.dir's files)
    # into <run>/remined/epoch-<k>/, which replace offcandi.dir's from then on; 0: off.
    remine_every: Annotated[int, NonNegative] = 0


@dataclass
class EvalConfig:
    """Evaluation protocol."""

    fold5: bool = False  # COCO 5-fold 1K on a 5000-image split, instead of the whole split
    block_size: Annotated[int, AtLeastOne] = 1024  # images per block of the similarity matrix
    # the encoders' precision when evaluating (the embeddings mining reads stay float32)
    precision: Annotated[str, OneOf("fp32", "bf16", "fp16")] = "fp32"


@dataclass
class RoundsConfig:
    """The mining-round recipe, read by make (`aoq rounds`) and by no stage: round 1 mines
    with the base model (or MINER) and retrains; each later round mines with the previous
    round's model and retrains again. ROUNDS= and RETRAIN_INIT= on make's command line
    answer instead."""

    count: Annotated[int, AtLeastOne] = 1  # mining rounds (make ROUNDS)
    # what each round's retraining starts from: scratch (as the reference) or the model
    # that mined its candidates (make RETRAIN_INIT)
    retrain_init: Annotated[str, OneOf("scratch", "miner")] = "scratch"


NAMED = ("model", "loss")


@dataclass
class Config:
    """The resolved configuration of a run; saved in run folders and checkpoints."""

    data: DataConfig = field(default_factory=DataConfig)
    model: NamedBlock = field(default_factory=lambda: NamedBlock("model", "vsepp"))
    loss: NamedBlock = field(default_factory=lambda: NamedBlock("loss", "vse_max"))
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    offcandi: OffcandiConfig = field(default_factory=OffcandiConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)

    def to_dict(self) -> dict:
        return {s: (getattr(self, s).to_dict() if s in NAMED
                    else dataclasses.asdict(getattr(self, s))) for s in SECTIONS}

    @classmethod
    def from_dict(cls, values: dict, source: str = "config",
                  stored: bool = False) -> "Config":
        """A config from a ``{section: {field: value}}`` mapping.

        ``stored``: the mapping comes from a checkpoint or run folder written by an older
        version; model/loss options its class no longer takes are dropped (and logged)
        instead of refused, since only the data and evaluation settings are reused.
        """
        config = cls()
        if stored:
            values = copy.deepcopy(values)
            for kind in NAMED:
                block = values.get(kind)
                if isinstance(block, dict) and "name" in block:
                    known = NamedBlock(kind, block["name"]).registry().options(block["name"])
                    dropped = [k for k in block if k != "name" and k not in known]
                    for key in dropped:
                        del block[key]
                    if dropped:
                        log.debug("%s: ignoring stored %s options %s", source, kind, dropped)
        apply_mapping(config, values, source)
        config.check(source)
        return config

    def check(self, source: str = "config") -> None:
        """Check the named blocks' options (fields are checked as they are set)."""
        for kind in NAMED:
            getattr(self, kind).options(source)

    def dataset_dir(self) -> Path:
        return Path(self.data.path) / self.data.name

    def candidates_dir(self) -> Path:
        return Path(self.offcandi.dir) if self.offcandi.dir else Path("offcandi") / self.data.name

    def text_cache_folder(self) -> Path | None:
        """The folder of the frozen text towers' output files (``data.text_cache_dir``), or
        None with ``data.text_cache`` false."""
        if not self.data.text_cache:
            return None
        from stages.data.dataset import TEXT_CACHE_FOLDER  # lazily: dataset.py imports torch

        return (Path(self.data.text_cache_dir) if self.data.text_cache_dir
                else self.dataset_dir() / TEXT_CACHE_FOLDER)

    def vocab_path(self) -> Path:
        return Path(self.data.vocab) if self.data.vocab else self.dataset_dir() / "vocab.json"


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def _field_types(section_obj) -> dict[str, type]:
    hints = typing.get_type_hints(type(section_obj), include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_obj)}


def _section_keys(config: Config, section: str) -> list[str]:
    """The keys a section takes now (a named block's: ``name`` and its class's options)."""
    obj = getattr(config, section)
    if section in NAMED:
        return ["name", *obj.registry().options(obj.name)]
    return list(_field_types(obj))


def set_value(config: Config, key: str, value, source: str, layer: int = 0) -> None:
    """Set ``section.field`` (or a bare field name unique across sections) to ``value``;
    ``layer`` numbers the file or override group it comes from (see :class:`NamedBlock`)."""
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise UserError(f"{source}: unknown section {section!r} in {key!r}; "
                            f"sections are {', '.join(SECTIONS)}")
    else:
        owners = [s for s in SECTIONS if key in _section_keys(config, s)]
        if not owners:
            known = sorted(f"{s}.{n}" for s in SECTIONS for n in _section_keys(config, s))
            raise UserError(f"{source}: unknown key {key!r}; known keys: {', '.join(known)}")
        if len(owners) > 1:
            raise UserError(f"{source}: {key!r} is ambiguous, write one of "
                            + ", ".join(f"{s}.{key}" for s in owners))
        section, name = owners[0], key
    section_obj = getattr(config, section)
    if section in NAMED:
        if name == "name":
            section_obj.rename(check_value(value, str, None, f"{section}.name", source), layer,
                               source)
        else:
            section_obj.values[name] = value  # checked by Config.check, once name is final
            section_obj.layers[name] = layer
        return
    types_ = _field_types(section_obj)
    if name not in types_:
        raise UserError(f"{source}: unknown key {section}.{name}; {section} has: "
                        f"{', '.join(types_)}")
    setattr(section_obj, name, check_value(value, types_[name], None, f"{section}.{name}",
                                           source))


def apply_mapping(config: Config, values: dict, source: str) -> None:
    """Apply a nested ``{section: {field: value}}`` mapping (a YAML file's content) as one
    layer.

    A named block's ``name`` is applied before its options.
    """
    layer = next(LAYERS)
    if not isinstance(values, dict):
        raise UserError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)})")
    for section, fields_ in values.items():
        if section not in SECTIONS:
            raise UserError(f"{source}: unknown section {section!r}; "
                            f"sections are {', '.join(SECTIONS)}")
        if not isinstance(fields_, dict):
            raise UserError(f"{source}: section {section!r} must be a mapping")
        for name in sorted(fields_, key=lambda n: n != "name"):
            set_value(config, f"{section}.{name}", fields_[name], source, layer)


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


RETRAIN_BLOCK = "retrain"
# The retrain stage's defaults, a config file shipped with the package.
RETRAIN_DEFAULTS = Path(__file__).with_name("retrain.yaml")
# Numbers the layers of settings (files, retrain: blocks, override groups) in the order they
# are applied, across nested loads (a base config's layers come first).
LAYERS = itertools.count(1)


def load_config(config_files: typing.Iterable[str | Path] = (),
                overrides: typing.Iterable[str] = (),
                base: Config | None = None, retrain: bool = False) -> Config:
    """Defaults (or a copy of ``base``), then each YAML file in order, then overrides.

    A file's top-level ``retrain:`` block (the same sections) holds settings of the retrain
    stage only, e.g. a model file's base schedule followed by the AOQ reference's retrain
    schedule; with ``retrain`` it is applied right after the rest of its file, otherwise it
    is only checked.
    """
    config = copy.deepcopy(base) if base is not None else Config()
    for path in config_files:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} not found; the shipped ones are under configs/")
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                            "config files are YAML") from exc
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UserError(f"{path}: not valid YAML{line}: {problem}") from exc
        retrain_values = values.pop(RETRAIN_BLOCK, None) if isinstance(values, dict) else None
        apply_mapping(config, values, str(path))
        if retrain_values is not None:
            apply_mapping(config if retrain else copy.deepcopy(config), retrain_values,
                          f"{path} ({RETRAIN_BLOCK}:)")
    overrides = list(overrides)
    layer = next(LAYERS)  # the overrides are one layer: their order does not matter
    for text in overrides:
        key, value = parse_override(text)
        set_value(config, key, value, f"--set {text}", layer)
    config.check(" ".join([*map(str, config_files), *(f"--set {o}" for o in overrides)])
                 or "config")
    return config


def retrain_defaults() -> Config:
    """The retrain stage's base config: the sections' defaults under
    :data:`RETRAIN_DEFAULTS` (AOQ's loss with offline negatives, on its schedule)."""
    return load_config([RETRAIN_DEFAULTS])


def config_diff(a: dict, b: dict) -> list[str]:
    """Keys (``section.field``) whose values differ between two config dicts."""
    diffs = []
    for section in SECTIONS:
        sa, sb = a.get(section, {}), b.get(section, {})
        for name in sorted(set(sa) | set(sb)):
            if sa.get(name) != sb.get(name):
                diffs.append(f"{section}.{name}: {sa.get(name)!r} -> {sb.get(name)!r}")
    return diffs
