"""Settings stamps: the resolved settings a stage's output depends on, as a file for make.

The Makefile makes each stage's output depend on a stamp file holding the part of the
resolved config (defaults, ``--config`` files, ``--set`` overrides) that the stage reads,
and the stage records beside its output the settings it made that output with
(``.<output>.settings.yaml``; the features stage in the attributes of its files, see
:mod:`stages.features.identity`). `aoq settings`, which make runs for every stamp on every
call, compares the two: when the output was made with the settings asked for, the stamp
is dated like the output (nothing to redo); otherwise it is dated after it, so make reruns
the stage. ``SET=train.lr=2e-4`` (the default) changes nothing, ``SET=train.lr=0.01``
reruns train (which then refuses to resume a finished run under another config), and going
back to the settings the output was made with redoes nothing.

Only a stage that holds the lock of its output's folder writes that record: it removes it
before it starts replacing the output and writes it once the output is complete. A stage
that is refused (another process holds the lock, or its checks refuse the settings) or
killed records nothing, so no settings are ever taken as done that its output was not made
with: a ``make train SET=train.lr=0.01`` refused while another ``make train`` runs is not
"nothing to do" once that one has finished.

Make runs this once per stamp on every call (resolving the model and loss blocks imports
their registries, and so torch, unless their options are cached: about a second each).
"""

import logging
import os
import time
from pathlib import Path

import yaml

from stages.config.sections import SECTIONS, Config
from stages.core.errors import UserError
from stages.io.atomic import write_text

# Keys that never change any stage's output: paths (make tracks the files they name as
# prerequisites) and how the work is executed (data.text_cache*: whether and where a frozen
# text tower's outputs are kept on disk; a kept output is the one computed).
NO_EFFECT = {"data.path", "data.vocab", "data.images", "data.workers", "data.text_cache",
             "data.text_cache_dir", "train.device", "train.ckpt_every", "offcandi.threads",
             "offcandi.block_size", "eval.block_size"}
# Offline-candidate keys that only the retrain stage reads (how candidates are sampled
# and checked); the others say how candidates are mined.
SAMPLING_KEYS = {"offcandi.dir", "offcandi.base_ckpt", "offcandi.hardest",
                 "offcandi.false_negative_ratio", "offcandi.false_negative_margin",
                 "offcandi.duplicate_overlap", "offcandi.skip_top",
                 "offcandi.curriculum_epochs", "offcandi.mix_dir", "offcandi.mix_base_ckpt",
                 "offcandi.mix_share", "offcandi.group_size", "offcandi.remine_every"}
# What each stage reads. An unlisted key of a stage's sections counts (a new config field
# reruns a stage rather than leaving a stale output). No stage reads the rounds section
# (make's recipe of which runs exist).
STAGE_KEYS = {
    "vocab": lambda key: key in ("data.name", "data.train_split"),
    "embed": lambda key: key in ("data.name", "data.train_split"),
    "train": lambda key: key.split(".")[0] not in ("offcandi", "eval", "rounds")
    and key != "data.eval_split",
    "retrain": lambda key: key.split(".")[0] not in ("eval", "rounds")
    and key != "data.eval_split"
    and (not key.startswith("offcandi.") or key in SAMPLING_KEYS),
    "offcandi": lambda key: key.startswith("offcandi.") and key not in SAMPLING_KEYS,
    "eval": lambda key: key.startswith("eval.") or key in ("data.name", "data.eval_split"),
}
STAGES = tuple(STAGE_KEYS)
# What a stamp file may be of: the stages above and the features stage, whose stamp holds
# the options a features file records (stages/features/identity.py), not config settings.
STAMPED_STAGES = (*STAGES, "features")

log = logging.getLogger(__name__)


def run_stage(config: Config) -> str:
    """The stage whose settings a training run reads: retrain when it trains with offline
    negatives (make's table trains such cells with ``aoq train``), else train."""
    return "retrain" if config.train.offline_negatives else "train"


def stage_settings(config: Config | dict, stage: str) -> dict:
    """The settings of ``config`` (or of its ``{section: {field: value}}`` mapping, for a
    stage that has only its own sections) that ``stage`` reads:
    ``{section: {field: value}}``."""
    uses = STAGE_KEYS[stage]
    out: dict = {}
    sections = config.to_dict() if isinstance(config, Config) else config
    for section, values in sections.items():
        for name, value in values.items():
            key = f"{section}.{name}"
            if key not in NO_EFFECT and uses(key):
                out.setdefault(section, {})[name] = value
    return {section: out[section] for section in SECTIONS if section in out}


def check_retrain_set(config: Config, with_retrain_set: Config) -> None:
    """Refuse what make's RETRAIN_SET (settings of the retrain stage only) sets that the
    retrain stage does not read: recorded in the run's config yet ignored, it would claim
    an experiment that was not run. ``config``: the retrain settings without RETRAIN_SET;
    ``with_retrain_set``: with it. Mining settings are those of SAMPLING_KEYS' complement."""
    before, after = _flat(config.to_dict()), _flat(with_retrain_set.to_dict())
    for key in sorted(k for k in after if after[k] != before.get(k)):
        if key in NO_EFFECT or STAGE_KEYS["retrain"](key):
            continue
        if key.startswith("offcandi."):
            raise UserError(f"RETRAIN_SET sets {key}, a mining setting: the offcandi stage "
                            "reads it, retrain does not; give it in SET= (which the offcandi "
                            "stage reads), with its own OFFCANDI_DIR= and AOQ_RUN=")
        raise UserError(f"RETRAIN_SET sets {key}, which the retrain stage does not read; "
                        "give it in SET=")


def stamp_text(stage: str, settings: dict) -> str:
    return yaml.safe_dump({"stage": stage, **settings}, sort_keys=True)


def settings_text(config: Config | dict, stage: str) -> str:
    """The stamp (and record) content of ``stage`` under ``config``."""
    return stamp_text(stage, stage_settings(config, stage))


def record_path(output: str | os.PathLike) -> Path:
    """Where the stage that made ``output`` records the settings it made it with: beside it,
    in the folder whose lock the stage holds."""
    output = Path(output)
    return output.with_name(f".{output.name}.settings.yaml")


def clear_record(output: str | os.PathLike) -> None:
    """Forget what ``output`` was made with: its stage is about to replace it."""
    record_path(output).unlink(missing_ok=True)


def write_record(output: str | os.PathLike, text: str) -> None:
    """Record that ``output``, now complete, was made with the settings ``text``."""
    write_text(record_path(output), text)


def read_record(output: str | os.PathLike) -> str | None:
    """The settings ``output`` was made with, or None (no record: made by an older version,
    or its stage was stopped before it finished)."""
    return _read(record_path(output))


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
    not a stamp (a mapping whose ``stage`` is one of :data:`STAMPED_STAGES`, as :func:`stamp_text`
    writes) is a :class:`UserError`: it is someone else's file, never overwritten."""
    try:
        text = _read(path)
        values = yaml.safe_load(text) if text is not None else None
    except (UnicodeDecodeError, yaml.YAMLError):
        values = text = ""
    if text is not None and not (isinstance(values, dict)
                                 and values.get("stage") in STAMPED_STAGES):
        raise UserError(f"{path} exists and is not a settings stamp (no 'stage: <one of "
                        f"{', '.join(STAMPED_STAGES)}>'); refusing to overwrite it: give --out a "
                        "stamp's path, or move the file away")
    return text


def update_stamp(path: str | os.PathLike, text: str, target: str | os.PathLike,
                 made_with: str | None) -> list[str] | None:
    """Make the stamp ``path`` say whether ``target`` is to be made again.

    ``text``: the settings asked for now (the stamp's content); ``made_with``: those the
    stage recorded when it made ``target``. The stamp is dated like an existing target made
    with ``text``, after any other one. Returns None when ``target`` is up to date with the
    settings, else what changed, ``section.field: old -> new`` (logged; empty for a missing
    target or a missing record).
    """
    path, target = Path(path), Path(target)
    asked_before = _read_stamp(path)
    if asked_before != text:
        write_text(path, text)
    target_time = _mtime_ns(target)
    if target_time is None:
        return []
    stamp_time = _mtime_ns(path)
    if made_with == text:
        if stamp_time > target_time:
            os.utime(path, ns=(target_time, target_time))
        if asked_before is not None and asked_before != text:
            log.info("%s: back to the settings %s was made with: nothing to redo", path,
                     target)
        return None
    if stamp_time <= target_time:
        now = max(time.time_ns(), target_time + 1)
        os.utime(path, ns=(now, now))
    if made_with is None:
        log.info("%s: no record of the settings %s was made with: making it again", path,
                 target)
        return []
    changes = changed_keys(yaml.safe_load(made_with) or {}, yaml.safe_load(text) or {})
    log.info("%s: %s was made with other settings (%s): making it again", path, target,
             "; ".join(changes))
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
