"""The options of every registered model and loss, and what each model reads (its class's
``image_input``), cached on disk, so that checking and resolving a config (``aoq settings``,
which make runs for every stage on every call) and telling make a model's input (``aoq
model-input``) do not import torch (about 4 s of CPU here).

The cache is ``stages/__pycache__/registry-options.json``, keyed by the size and mtime of
every source file the options come from; a stale or unreadable cache is rebuilt by importing
the registries (a read-only install simply goes without it). The cached options are the
registries' own (``Registry.options``) and the cached inputs the classes' own attributes, so
both give the same answers.
"""

import hashlib
import json
import logging
import sys
from pathlib import Path

from stages.core.registry import Option, Registry
from stages.core.values import OneOf, Range

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).parents[1]  # stages/
CACHE = PACKAGE / "__pycache__" / "registry-options.json"
KINDS = ("model", "loss")
TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _live_registry(kind: str) -> Registry:
    if kind == "model":
        from stages.models import MODELS
        return MODELS
    from stages.losses import LOSSES
    return LOSSES


def _sources_key() -> str:
    """Size and mtime of every file the options come from."""
    files = sorted([*PACKAGE.glob("models/*.py"), *PACKAGE.glob("losses/*.py"),
                    PACKAGE / "core" / "registry.py", PACKAGE / "core" / "values.py",
                    Path(__file__)])
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def _encode(option: Option) -> dict:
    constraint = option.constraint
    if isinstance(constraint, Range):
        constraint = {"range": [constraint.min, constraint.max, constraint.min_open]}
    elif isinstance(constraint, OneOf):
        constraint = {"one_of": list(constraint.values)}
    return {"type": option.type.__name__, "default": option.default, "constraint": constraint}


def _decode(data: dict) -> Option:
    constraint = data["constraint"]
    if constraint and "range" in constraint:
        low, high, open_ = constraint["range"]
        constraint = Range(low, high, open_)
    elif constraint and "one_of" in constraint:
        constraint = OneOf(*constraint["one_of"])
    return Option(TYPES[data["type"]], data["default"], constraint)


def _live_image_inputs() -> dict[str, str]:
    """Every registered model's ``image_input``: ``features`` or ``pixels``."""
    models = _live_registry("model")
    return {name: models.class_of(name).image_input for name in models.names()}


def _write_cache(key: str) -> None:
    table = {kind: {name: {opt: _encode(o) for opt, o in options.items()}
                    for name, options in _live_registry(kind).options_table().items()}
             for kind in KINDS}
    try:
        CACHE.parent.mkdir(exist_ok=True)
        tmp = CACHE.with_name(f".{CACHE.name}.tmp")
        tmp.write_text(json.dumps({"key": key, "options": table,
                                   "image_input": _live_image_inputs()}), encoding="utf-8")
        tmp.replace(CACHE)
    except OSError as exc:  # a read-only install: no cache
        log.debug("options cache not written: %s", exc)


def _cached(kind: str, table: str) -> dict | None:
    """The cache's ``table`` (``options`` of ``kind``, or ``image_input``) when neither
    ``kind``'s modules are imported (then the live registry answers) nor the cache is stale;
    else None, the stale cache rebuilt."""
    module = "stages.models" if kind == "model" else "stages.losses"
    if module in sys.modules:
        return None
    key = _sources_key()
    try:
        cached = json.loads(CACHE.read_text(encoding="utf-8"))
        if cached["key"] == key:
            return cached[table][kind] if table == "options" else cached[table]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    _write_cache(key)
    return None


def option_registry(kind: str) -> Registry:
    """The ``kind`` registry's names and options: the live registry when its modules are
    already imported or the cache is stale, else the cached copy (no torch import)."""
    options = _cached(kind, "options")
    if options is None:
        return _live_registry(kind)
    return Registry.from_options(kind, {name: {opt: _decode(o) for opt, o in table.items()}
                                        for name, table in options.items()})


def image_input(model_name: str) -> str:
    """``"features"`` or ``"pixels"``: what the registered model ``model_name`` reads (its
    class's ``image_input``), from the cache as :func:`option_registry` (no torch import);
    an unknown name is the registry's error, listing the known ones."""
    inputs = _cached("model", "image_input")
    if inputs is None:
        return _live_registry("model").class_of(model_name).image_input
    if model_name not in inputs:
        Registry.from_options("model", dict.fromkeys(inputs, {})).check_name(model_name)
    return inputs[model_name]
