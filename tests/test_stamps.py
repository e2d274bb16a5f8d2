"""Settings stamps: what each stage's stamp holds, and when the stamp file changes."""

import dataclasses
import os
import subprocess
import sys
import time

import pytest
import yaml

from stages.config.sections import OffcandiConfig, load_config, retrain_defaults
from stages.core.errors import UserError
from stages.pipeline.stamps import (
    NO_EFFECT,
    SAMPLING_KEYS,
    check_retrain_set,
    clear_record,
    read_record,
    stage_settings,
    stamp_text,
    update_stamp,
    write_record,
)
from tests.run_helpers import second_run_output


def stamp(stage, *overrides, base=None):
    if stage == "retrain" and base is None:
        base = retrain_defaults()
    return stamp_text(stage, stage_settings(load_config(overrides=overrides, base=base), stage))


def test_a_stamp_holds_the_resolved_settings_its_stage_reads():
    assert stamp("train", "train.lr=2e-4", "lr=0.0002") == stamp("train")  # the default
    assert stamp("train", "train.lr=0.01") != stamp("train")
    for key in ("train.device=cpu", "data.workers=0", "data.path=/elsewhere",
                "eval.block_size=7", "data.eval_split=testall", "offcandi.k_i2t=400",
                "offcandi.hardest=100"):
        assert stamp("train", key) == stamp("train"), key  # train does not read these
    for key in ("offcandi.hardest=100", "offcandi.dir=x", "train.init_from=base.pt",
                "offcandi.false_negative_ratio=0.9", "loss.detach_weights=1"):
        assert stamp("retrain", key) != stamp("retrain"), key
    for key in ("offcandi.k_i2t=400", "offcandi.threads=2", "eval.fold5=1"):
        assert stamp("retrain", key) == stamp("retrain"), key  # mining and eval keys
    assert stamp("offcandi", "offcandi.k_i2t=400") != stamp("offcandi")
    assert stamp("offcandi", "offcandi.hardest=100", "train.lr=0.01") == stamp("offcandi")
    assert stamp("embed", "train.lr=0.01") == stamp("embed")
    assert stamp("vocab", "data.train_split=restval") != stamp("vocab")
    assert stamp("eval", "eval.fold5=1") != stamp("eval")
    assert stamp("eval", "train.lr=0.01", "eval.block_size=7") == stamp("eval")
    # The reference-fidelity settings (issue 19) are read by train and retrain alike.
    for key in ("train.select=r1r5", "train.drop_last=true", "model.name=vsrn",
                "model.caption_aug=0.1 model.name=vse_inf",
                "model.bn_padding=true model.name=vse_inf"):
        for stage in ("train", "retrain"):
            assert stamp(stage, *key.split()) != stamp(stage), (stage, key)
        assert stamp("offcandi", *key.split()) == stamp("offcandi"), key
    vsrn = ("model.name=vsrn",)
    for key in ("model.norm_axis=features", "model.caption_double_step=false"):
        assert stamp("train", *vsrn, key) != stamp("train", *vsrn), key
    content = yaml.safe_load(stamp("retrain", base=load_config(overrides=["loss.name=aoq"])))
    assert content["stage"] == "retrain" and content["loss"]["name"] == "aoq"
    assert "eval" not in content and "k_i2t" not in content["offcandi"]


def another_value(field: dataclasses.Field):
    """A valid value of an offcandi field other than its default."""
    if field.name == "index":
        return "hnsw"
    if isinstance(field.default, bool):
        return not field.default
    if isinstance(field.default, str):
        return "x"
    return field.default + (1 if isinstance(field.default, int) else 0.5)


@pytest.mark.parametrize("field", dataclasses.fields(OffcandiConfig), ids=lambda f: f.name)
def test_retrain_set_refuses_every_mining_setting(field):
    """make's RETRAIN_SET reaches the retrain stage only: a mining setting there (every
    offcandi key but those retrain reads) would be recorded in the run yet not mined with."""
    key = f"offcandi.{field.name}"
    base = retrain_defaults()
    given = load_config(overrides=[f"{key}={another_value(field)}"], base=base)
    if key in SAMPLING_KEYS or key in NO_EFFECT:
        check_retrain_set(base, given)
    else:
        with pytest.raises(UserError, match=f"RETRAIN_SET sets {key}, a mining setting: .*"
                                            "give it in SET="):
            check_retrain_set(base, given)


def test_retrain_set_takes_what_retrain_reads_and_refuses_the_rest():
    base = retrain_defaults()
    for text in ("loss.detach_weights=1", "hardest=100", "train.lr=0.01"):
        check_retrain_set(base, load_config(overrides=[text], base=base))
    with pytest.raises(UserError, match="RETRAIN_SET sets eval.fold5, which the retrain stage "
                                        "does not read; give it in SET="):
        check_retrain_set(base, load_config(overrides=["eval.fold5=1"], base=base))


def made(output, text, when):
    """``output`` written at ``when`` (ns) by its stage, with the settings ``text``."""
    output.write_bytes(b"output")
    os.utime(output, ns=(when, when))
    write_record(output, text)


def redo(path, output) -> bool:
    """Whether make would make ``output`` again because of its stamp ``path``."""
    return path.stat().st_mtime_ns > output.stat().st_mtime_ns


def test_the_stamp_is_dated_by_what_the_output_was_made_with(tmp_path):
    path, output = tmp_path / ".settings" / "base.train.yaml", tmp_path / "checkpoint.pt"
    assert update_stamp(path, stamp("train"), output, read_record(output)) == []  # none yet
    assert path.read_text() == stamp("train")
    made(output, stamp("train"), 10**18)
    assert update_stamp(path, stamp("train", "lr=0.0002"), output, read_record(output)) is None
    assert not redo(path, output)  # the same resolved settings: nothing to redo
    assert update_stamp(path, stamp("train", "lr=0.01"), output, read_record(output)) == [
        "train.lr: 0.0002 -> 0.01"]
    assert redo(path, output) and path.read_text() == stamp("train", "lr=0.01")
    update_stamp(path, stamp("train", "lr=0.05"), output, read_record(output))  # still not made
    assert redo(path, output)
    update_stamp(path, stamp("train"), output, read_record(output))  # back: nothing to redo
    assert not redo(path, output) and path.read_text() == stamp("train")


def test_settings_asked_by_a_refused_stage_are_not_taken_as_done(tmp_path):
    """While one stage holds the lock and makes the output with its settings, a second make
    asks for others and is refused; once the first has finished, the output is still out
    of date for the second's settings, and up to date for the first's."""
    path, output = tmp_path / "s.yaml", tmp_path / "t2i.h5"
    update_stamp(path, stamp("offcandi"), output, read_record(output))  # the first make
    update_stamp(path, stamp("offcandi", "k_i2t=30"), output, read_record(output))  # refused
    made(output, stamp("offcandi"), time.time_ns() + 10**9)  # the first stage finishes
    update_stamp(path, stamp("offcandi", "k_i2t=30"), output, read_record(output))
    assert redo(path, output)
    update_stamp(path, stamp("offcandi"), output, read_record(output))
    assert not redo(path, output)


def test_an_output_without_a_record_is_made_again(tmp_path):
    """A stage killed after replacing its output (or an output of an older version) has no
    record: whatever the stamp held, the output is made again."""
    path, output = tmp_path / "s.yaml", tmp_path / "embeddings_train.h5"
    made(output, stamp("embed"), 10**18)
    update_stamp(path, stamp("embed"), output, read_record(output))
    assert not redo(path, output)
    clear_record(output)
    assert read_record(output) is None
    update_stamp(path, stamp("embed"), output, read_record(output))
    assert redo(path, output)


@pytest.mark.parametrize("content", [b"my notes\n", b"- a list\n", b"stage: nope\n",
                                     b"a: [\n", b"\xff\xfe notes", b""])
def test_a_file_that_is_not_a_stamp_is_never_overwritten(tmp_path, content):
    path = tmp_path / "f.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"f.txt exists and is not a settings stamp.*move the "
                                        "file away"):
        update_stamp(path, stamp("train"), tmp_path / "out", None)
    assert path.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_the_settings_command_refuses_a_file_that_is_not_a_stamp(tmp_path):
    (tmp_path / "f.txt").write_text("my notes\n")
    result = subprocess.run([sys.executable, "-m", "stages.cli", "settings", "--stage", "train",
                             "--out", "f.txt", "--target", "out"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "f.txt exists and is not a settings stamp" in result.stderr
    assert (tmp_path / "f.txt").read_text() == "my notes\n"


def test_the_settings_command_resolves_the_retrain_defaults(tmp_path):
    code = ("import sys; from stages.cli import cli; "
            "cli(['settings', '--stage', 'retrain', '--set', 'train.lr=0.01', '--out', "
            f"{str(tmp_path / 's.yaml')!r}, '--target', {str(tmp_path / 'ckpt.pt')!r}], "
            "standalone_mode=False)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    content = yaml.safe_load((tmp_path / "s.yaml").read_text())
    assert content["train"]["lr"] == 0.01 and content["loss"]["name"] == "aoq"
    assert content["train"]["epochs"] == 20 and content["loss"]["alpha"] == 0.3


def test_the_settings_command_needs_no_torch_once_the_options_are_cached(tmp_path):
    code = ("import sys; from stages.cli import cli; "
            "cli(['settings', '--stage', 'retrain', '--set', 'loss.name=infonce', '--out', "
            f"{str(tmp_path / 's.yaml')!r}, '--target', {str(tmp_path / 'ckpt.pt')!r}], "
            "standalone_mode=False); "
            "print('torch' in sys.modules)")
    assert second_run_output(code).strip() == "False"  # the first run may have written the cache
    content = yaml.safe_load((tmp_path / "s.yaml").read_text())
    assert content["loss"]["temperature"] == 0.07


def test_cached_options_equal_the_live_registries(tmp_path, monkeypatch):
    from stages.config import options as options_cache
    from stages.losses import LOSSES
    from stages.models import MODELS

    monkeypatch.setattr(options_cache, "CACHE", tmp_path / "options.json")
    options_cache._write_cache("k")
    monkeypatch.setattr(options_cache, "_sources_key", lambda: "k")
    monkeypatch.delitem(sys.modules, "stages.losses")
    monkeypatch.delitem(sys.modules, "stages.models")
    for kind, live in (("loss", LOSSES), ("model", MODELS)):
        cached = options_cache.option_registry(kind)
        assert cached is not live and cached.options_table() == live.options_table()
    # What each model reads (make asks it): the class's image_input, answered by the cache.
    reads = {name: MODELS.class_of(name).image_input for name in MODELS.names()}
    assert set(reads.values()) == {"features", "pixels"}

    def no_live_registry(kind):
        raise AssertionError(f"the {kind} registry was imported: the cache did not answer")

    monkeypatch.setattr(options_cache, "_live_registry", no_live_registry)
    assert {name: options_cache.image_input(name) for name in MODELS.names()} == reads
    with pytest.raises(UserError, match="unknown model 'nope'; known: clip, "):
        options_cache.image_input("nope")
