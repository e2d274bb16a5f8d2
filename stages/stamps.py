"""Settings stamps: the resolved settings a stage's output depends on, as a file for make.

The Makefile makes each stage's output depend on a stamp file holding the part of the
resolved config (defaults, ``--config`` files, ``--set`` overrides) that the stage reads.
The stamp is rewritten only when that content changes, so its modification time moves
only then and ``make`` reruns the stage exactly when a setting that matters changed:
``SET=train.lr=2e-4`` (the default) changes nothing, ``SET=train.lr=0.01`` reruns train
(which then refuses to resume a finished run under another config).

Going back to the settings the existing output was made with makes no work: before a
stamp is overwritten while its output is up to date, the old content is kept beside it
(``<stamp>.done``, dated like the output); a stamp rewritten to that content takes that
date back. So a refused ``make train SET=train.lr=0.01`` followed by ``make train``
rebuilds nothing.

Make runs this once per stamp on every call (resolving the model and loss blocks imports
their registries, and so torch: about a second each).
"""

import logging
import os
from pathlib import Path

import yaml

from .config import SECTIONS, Config
from .errors import UserError
from .io.atomic import write_text

# Keys that never change any stage's output: paths (make tracks the files they name as
# prerequisites) and how the work is executed.
NO_EFFECT = {"data.path", "data.vocab", "data.images", "data.workers", "train.device",
             "train.ckpt_every", "offcandi.threads", "offcandi.block_size", "eval.block_size"}
# Offline-candidate keys that only the retrain stage reads (how candidates are sampled
# and checked); the others say how candidates are mined.
SAMPLING_KEYS = {"offcandi.dir", "offcandi.base_ckpt", "offcandi.hardest",
                 "offcandi.false_negative_ratio", "offcandi.false_negative_margin",
                 "offcandi.duplicate_overlap", "offcandi.skip_top",
                 "offcandi.curriculum_epochs"}
# What each stage reads. An unlisted key of a stage's sections counts (a new config field
# reruns a stage rather than leaving a stale output).
STAGE_KEYS = {
    "vocab": lambda key: key in ("data.name", "data.train_split"),
    "embed": lambda key: key in ("data.name", "data.train_split"),
    "train": lambda key: key.split(".")[0] not in ("offcandi", "eval")
    and key != "data.eval_split",
    "retrain": lambda key: key.split(".")[0] != "eval" and key != "data.eval_split"
    and (not key.startswith("offcandi.") or key in SAMPLING_KEYS),
    "offcandi": lambda key: key.startswith("offcandi.") and key not in SAMPLING_KEYS,
}
STAGES = tuple(STAGE_KEYS)

log = logging.getLogger(__name__)


def stage_settings(config: Config, stage: str) -> dict:
    """The settings of ``config`` that ``stage`` reads: ``{section: {field: value}}``."""
    uses = STAGE_KEYS[stage]
    out: dict = {}
    for section, values in config.to_dict().items():
        for name, value in values.items():
            key = f"{section}.{name}"
            if key not in NO_EFFECT and uses(key):
                out.setdefault(section, {})[name] = value
    return {section: out[section] for section in SECTIONS if section in out}


def stamp_text(stage: str, settings: dict) -> str:
    return yaml.safe_dump({"stage": stage, **settings}, sort_keys=True)


def _mtime_ns(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _read_stamp(path: Path) -> str | None:
    """The content of the stamp ``path`` (None when there is none); a file there that is
    not a stamp (a mapping whose ``stage`` is one of :data:`STAGES`, as :func:`stamp_text`
    writes) is a :class:`UserError`: it is someone else's file, never overwritten."""
    try:
        text = _read(path)
        values = yaml.safe_load(text) if text is not None else None
    except (UnicodeDecodeError, yaml.YAMLError):
        values = text = ""
    if text is not None and not (isinstance(values, dict) and values.get("stage") in STAGES):
        raise UserError(f"{path} exists and is not a settings stamp (no 'stage: <one of "
                        f"{', '.join(STAGES)}>'); refusing to overwrite it: give --out a "
                        "stamp's path, or move the file away")
    return text


def write_stamp(path: str | os.PathLike, text: str, target: str | os.PathLike | None = None
                ) -> list[str] | None:
    """Write ``text`` to the stamp ``path`` unless it already holds it.

    ``target`` is the stage's output. Returns None when nothing changed, else the settings
    that changed, ``section.field: old -> new`` (none for a new stamp), which are logged.
    """
    path = Path(path)
    done = path.with_name(path.name + ".done")
    old = _read_stamp(path)
    if old == text:
        return None
    target_time = _mtime_ns(Path(target)) if target is not None else None
    stamp_time = _mtime_ns(path)
    if old is not None and target_time is not None and target_time >= stamp_time:
        write_text(done, old)  # the output is up to date with the old settings: keep them
        os.utime(done, ns=(target_time, target_time))
    write_text(path, text)
    changes = [] if old is None else changed_keys(yaml.safe_load(old) or {},
                                                    yaml.safe_load(text) or {})
    if (target_time is not None and _mtime_ns(done) == target_time
            and _read(done) == text):  # back to the output's settings: back to its date
        os.utime(path, ns=(target_time, target_time))
        log.info("%s: %s; as %s was made with: nothing to redo", path, "; ".join(changes),
                 target)
    elif changes:
        log.info("%s: %s", path, "; ".join(changes))
    return changes


def changed_keys(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every setting that differs between two stamps' contents."""
    a, b = _flat(old), _flat(new)
    return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(set(a) | set(b))
            if a.get(key) != b.get(key)]


def _flat(values: dict) -> dict:
    """``{section: {field: value}}`` -> ``{"section.field": value}`` (top-level scalars kept)."""
    out = {}
    for section, fields in values.items():
        if isinstance(fields, dict):
            out.update({f"{section}.{name}": value for name, value in fields.items()})
        else:
            out[section] = fields
    return out
