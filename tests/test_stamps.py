"""Settings stamps: what each stage's stamp holds, and when the stamp file changes."""

import os
import subprocess
import sys

import pytest
import yaml

from stages.cli import RETRAIN_DEFAULTS
from stages.config import load_config
from stages.errors import UserError
from stages.stamps import stage_settings, stamp_text, write_stamp


def stamp(stage, *overrides, base=None):
    if stage == "retrain" and base is None:
        base = load_config(overrides=RETRAIN_DEFAULTS)
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
    content = yaml.safe_load(stamp("retrain", base=load_config(overrides=["loss.name=aoq"])))
    assert content["stage"] == "retrain" and content["loss"]["name"] == "aoq"
    assert "eval" not in content and "k_i2t" not in content["offcandi"]


def test_a_stamp_changes_only_with_its_content(tmp_path):
    path = tmp_path / ".settings" / "base.train.yaml"
    assert write_stamp(path, stamp("train")) == []  # new
    os.utime(path, ns=(1, 1))
    assert write_stamp(path, stamp("train", "lr=0.0002")) is None
    assert path.stat().st_mtime_ns == 1  # make sees nothing new
    assert write_stamp(path, stamp("train", "lr=0.01")) == ["train.lr: 0.0002 -> 0.01"]
    assert path.stat().st_mtime_ns > 1


def test_settings_back_to_those_of_the_output_take_back_its_date(tmp_path):
    """A refused change then a return to the old settings leaves the output up to date."""
    path, output = tmp_path / "base.train.yaml", tmp_path / "checkpoint.pt"
    write_stamp(path, stamp("train"), output)
    output.write_bytes(b"model")  # made with the default settings, after the stamp
    os.utime(path, ns=(10**18, 10**18))
    os.utime(output, ns=(10**18 + 5, 10**18 + 5))
    write_stamp(path, stamp("train", "lr=0.01"), output)
    assert path.stat().st_mtime_ns > output.stat().st_mtime_ns  # make redoes train
    write_stamp(path, stamp("train", "lr=0.05"), output)  # still not made
    write_stamp(path, stamp("train"), output)
    assert path.stat().st_mtime_ns == output.stat().st_mtime_ns  # up to date again
    assert path.read_text() == stamp("train")

    output.write_bytes(b"another model")  # remade since (e.g. its input changed)
    os.utime(output, ns=(10**18 + 9, 10**18 + 9))
    write_stamp(path, stamp("train", "lr=0.01"), output)
    write_stamp(path, stamp("train"), output)  # the settings it was remade with
    assert path.stat().st_mtime_ns == output.stat().st_mtime_ns


def test_a_changed_output_is_not_taken_for_the_one_made_with_old_settings(tmp_path):
    path, output = tmp_path / "s.yaml", tmp_path / "t2i.h5"
    write_stamp(path, stamp("offcandi"), output)
    output.touch()  # mined with the default K
    os.utime(path, ns=(10**18, 10**18))
    os.utime(output, ns=(10**18 + 5, 10**18 + 5))
    write_stamp(path, stamp("offcandi", "k_i2t=30"), output)
    os.utime(output, ns=(10**18 + 9, 10**18 + 9))  # mined again, with K=30
    write_stamp(path, stamp("offcandi"), output)
    assert path.stat().st_mtime_ns > output.stat().st_mtime_ns  # so mine again


@pytest.mark.parametrize("content", [b"my notes\n", b"- a list\n", b"stage: nope\n",
                                     b"a: [\n", b"\xff\xfe notes", b""])
def test_a_file_that_is_not_a_stamp_is_never_overwritten(tmp_path, content):
    path = tmp_path / "f.txt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"f.txt exists and is not a settings stamp.*move the "
                                        "file away"):
        write_stamp(path, stamp("train"))
    assert path.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_the_settings_command_refuses_a_file_that_is_not_a_stamp(tmp_path):
    (tmp_path / "f.txt").write_text("my notes\n")
    result = subprocess.run([sys.executable, "-m", "stages.cli", "settings", "--stage", "train",
                             "--out", "f.txt"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "f.txt exists and is not a settings stamp" in result.stderr
    assert (tmp_path / "f.txt").read_text() == "my notes\n"


def test_the_settings_command_resolves_the_retrain_defaults(tmp_path):
    code = ("import sys; from stages.cli import cli; "
            "cli(['settings', '--stage', 'retrain', '--set', 'train.lr=0.01', '--out', "
            f"{str(tmp_path / 's.yaml')!r}], standalone_mode=False)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    content = yaml.safe_load((tmp_path / "s.yaml").read_text())
    assert content["train"]["lr"] == 0.01 and content["loss"]["name"] == "aoq"
    assert content["train"]["epochs"] == 20 and content["loss"]["alpha"] == 0.3


def test_the_settings_command_needs_no_torch_once_the_options_are_cached(tmp_path):
    code = ("import sys; from stages.cli import cli; "
            "cli(['settings', '--stage', 'retrain', '--set', 'loss.name=infonce', '--out', "
            f"{str(tmp_path / 's.yaml')!r}], standalone_mode=False); "
            "print('torch' in sys.modules)")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    assert runs[1].stdout.strip() == "False"  # the first run may have written the cache
    content = yaml.safe_load((tmp_path / "s.yaml").read_text())
    assert content["loss"]["temperature"] == 0.07


def test_cached_options_equal_the_live_registries(tmp_path, monkeypatch):
    from stages import options_cache
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
