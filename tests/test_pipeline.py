"""The Makefile chain (train -> embed -> offcandi -> retrain -> compare) on tiny data."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import yaml

from stages.data.vocab import build_vocab_file, file_sha256
from stages.io.checkpoint import load_checkpoint
from stages.io.lock import LOCK_NAME, folder_lock
from tests.features.test_annotations import karpathy_entry
from tests.features.test_butd_tsv import make_images, write_tsv

REPO = Path(__file__).resolve().parents[1]
TINY_EXPERIMENT = """\
model: {embed_size: 32, word_dim: 16}
train: {batch_size: 16, epochs: 1, device: cpu}
data: {workers: 0}
offcandi: {k_i2t: 25, k_t2i: 6, hardest: 20, false_negative_ratio: 0.9}
"""


@pytest.fixture
def workdir(tiny_root):
    """``tiny_root/work``: the Makefile's inputs (configs, a ready environment stamp); the
    dataset is ``tiny_root/tiny``."""
    work = tiny_root / "work"
    (work / "configs" / "data").mkdir(parents=True)
    (work / "configs" / "experiment").mkdir(parents=True)
    (work / "configs" / "data" / "tiny.yaml").write_text("data: {name: tiny}\n")
    (work / "configs" / "experiment" / "tiny.yaml").write_text(TINY_EXPERIMENT)
    shutil.copytree(REPO / "configs" / "model", work / "configs" / "model")
    for name in ("setup.cfg", "pyproject.toml", "stamp"):  # stamp newer: nothing to install
        (work / name).touch()
    return work


def make(work, *args, dry_run=False, check=True):
    """Run make in ``work``; returns its stdout (with ``check=False``, the whole result)."""
    command = ["make", "-f", str(REPO / "Makefile"), "--no-print-directory",
               *(["-n"] if dry_run else []), f"AOQ={sys.executable} -m stages.cli",
               "STAMP=stamp", "DATA=tiny", "EXP=tiny", f"DATA_PATH={work.parent}", *args]
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600)
    if not check:
        return result
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def stages_to_run(work, *args, goal="compare") -> list[str]:
    """The aoq sub-commands `make compare` would run now (the settings checks left out)."""
    commands = [line.split("stages.cli ")[1].split()[0]
                for line in make(work, goal, *args, dry_run=True).splitlines()
                if "stages.cli " in line]
    return [c for c in commands if c != "settings"]


def test_chain_end_to_end_then_only_missing_stages_rerun(workdir):
    work = workdir
    out = make(work, "compare")
    for path in ("runs/tiny/base/checkpoint.pt", "runs/tiny/base/embeddings_train.h5",
                 "offcandi/tiny/i2t.h5", "offcandi/tiny/t2i.h5",
                 "runs/tiny/aoq/checkpoint.pt"):
        assert (work / path).is_file(), path
    assert "base" in out and "aoq" in out and "rsum" in out
    assert stages_to_run(work) == ["eval", "plot"]  # everything is up to date

    (work / "runs/tiny/aoq/checkpoint.pt").unlink()  # retrain killed before it finished
    assert stages_to_run(work) == ["retrain", "eval", "plot"]
    make(work, "compare")
    assert stages_to_run(work) == ["eval", "plot"]

    (work / "offcandi/tiny/t2i.h5").unlink()  # mining killed between the two files
    shutil.rmtree(work / "runs/tiny/aoq")
    assert stages_to_run(work) == ["offcandi", "retrain", "eval", "plot"]

    (work / "runs/tiny/base/embeddings_train.h5").unlink()
    assert stages_to_run(work) == ["embed", "offcandi", "retrain", "eval", "plot"]


def test_changed_settings_redo_exactly_the_stages_that_read_them(workdir):
    """Settings stamps: a setting that changes a stage's resolved config redoes that stage
    (train and retrain then refuse to resume their finished run); one that resolves to the
    same value, or to the one the output was made with, redoes nothing."""
    work = workdir
    make(work, "compare")
    ckpt = work / "runs/tiny/base/checkpoint.pt"
    made = ckpt.stat().st_mtime_ns
    # Same resolved settings (the default lr, a device, a path): nothing to redo.
    same = "SET=train.lr=2e-4 train.device=cpu data.workers=0"
    assert stages_to_run(work, same) == ["eval", "plot"]
    assert stages_to_run(work, "SET=eval.block_size=7") == ["eval", "plot"]  # read by eval only

    # Another lr after a finished train: train runs again and refuses to resume the run
    # under another config, naming RUN= for a new experiment.
    result = make(work, "train", "SET=train.lr=0.01", check=False)
    assert result.returncode != 0
    assert "cannot resume runs/tiny/base" in result.stderr and "train.lr" in result.stderr
    assert "RUN=<name>" in result.stderr
    assert ckpt.stat().st_mtime_ns == made
    # Back to the settings the run was made with: nothing to redo (no cascade).
    assert stages_to_run(work) == ["eval", "plot"]
    # Under another run name the new settings train a new run.
    assert stages_to_run(work, "SET=train.lr=0.01", "RUN=lr01", goal="train") == ["train"]

    # A retrain-only setting: retrain only, refused for the finished run, fine under a name.
    detach = "RETRAIN_SET=loss.detach_weights=1"
    assert stages_to_run(work, detach) == ["retrain", "eval", "plot"]
    result = make(work, "retrain", detach, check=False)
    assert result.returncode != 0 and "cannot resume runs/tiny/aoq" in result.stderr
    assert stages_to_run(work, detach, "AOQ_RUN=detach") == ["retrain", "eval", "plot"]

    # A mining setting re-mines (overwriting the candidates); the retrain on the old ones
    # is then out of date and refuses to resume.
    k30 = "SET=offcandi.k_i2t=30"
    assert stages_to_run(work, k30) == ["offcandi", "retrain", "eval", "plot"]
    make(work, "offcandi", k30)
    with h5py.File(work / "offcandi/tiny/i2t.h5", "r") as f:
        assert f.attrs["k"] == 30
    assert stages_to_run(work) == ["offcandi", "retrain", "eval", "plot"]  # default K: mine again
    result = make(work, "retrain", k30, check=False)
    assert result.returncode != 0 and "cannot resume runs/tiny/aoq" in result.stderr
    assert stages_to_run(work, k30) == ["retrain", "eval", "plot"]
    assert ckpt.stat().st_mtime_ns == made  # the base model was never touched


def test_only_a_stage_holding_its_lock_records_its_settings(workdir):
    """For every stage with a settings stamp: a make that asks for other settings while
    another process holds the stage's lock is refused, and once that process has finished
    (its output made anew), the refused settings are still to be done, never "nothing to
    do"; the settings the output was made with are done."""
    work = workdir
    make(work, "retrain")
    features = raw_sources(work)
    make(work, "features", *features)
    dataset, base, aoq = work.parent / "tiny", work / "runs/tiny/base", work / "runs/tiny/aoq"
    old_ckpt = ["-o", "runs/tiny/base/checkpoint.pt"]  # embed alone, not train before it
    # Later stages first: an output made anew leaves the stages before it up to date.
    cases = [  # stage, the folder and lock file it holds, its output, a setting it reads
        ("retrain", aoq, LOCK_NAME, aoq / "checkpoint.pt", "RETRAIN_SET=loss.detach_weights=1"),
        ("offcandi", work / "offcandi/tiny", LOCK_NAME, work / "offcandi/tiny/t2i.h5",
         "SET=offcandi.k_i2t=30"),
        ("embed", base, LOCK_NAME, base / "embeddings_train.h5", "SET=data.train_split=dev",
         *old_ckpt),
        ("train", base, LOCK_NAME, base / "checkpoint.pt", "SET=train.lr=1e-3"),
        ("vocab", dataset, ".vocab.json.lock", dataset / "vocab.json",
         "SET=data.train_split=dev"),
        ("features", work.parent / "kp", LOCK_NAME, work.parent / "kp/train.h5",
         "FEATURE_OPTS=--feature-dim 8 --max-regions 5", *features),
    ]
    for stage, folder, lock, output, other, *args in cases:  # other: the last, it wins
        with folder_lock(folder, "another make", name=lock):
            result = make(work, stage, *args, other, check=False)
            os.utime(output)  # the process holding the lock finishes its output
        assert result.returncode != 0, (stage, result.stdout)
        assert "being written by another process" in result.stderr, (stage, result.stderr)
        assert stage in stages_to_run(work, *args, other, goal=stage), stage
        assert stage not in stages_to_run(work, *args, goal=stage), stage


def test_a_vocabulary_given_is_used_as_it_is(workdir):
    """VOCAB= names the user's file: however old, make trains with it and never rewrites
    it; one built from other captions is refused in one line, and left as it was."""
    work, old = workdir, (1577836800, 1577836800)  # 2020-01-01
    mine, stale = work / "my_vocab.json", work / "stale.json"
    build_vocab_file(work.parent / "tiny" / "train_caps.txt", mine, threshold=2)
    (work / "other_caps.txt").write_text("a caption of another dataset\n")
    build_vocab_file(work / "other_caps.txt", stale, threshold=1)
    given = {}
    for path in (mine, stale):
        os.utime(path, old)
        given[path] = path.read_bytes()
    make(work, "train", "RUN=uv", "VOCAB=my_vocab.json")
    state = load_checkpoint(work / "runs/tiny/uv/checkpoint.pt")
    assert state["data_fingerprint"]["vocab_sha256"] == file_sha256(mine)
    result = make(work, "train", "RUN=stale", "VOCAB=stale.json", check=False)
    assert result.returncode != 0
    assert "stale.json was built from other captions" in result.stderr
    assert "`aoq vocab --out FILE` builds one" in result.stderr
    for path, content in given.items():
        assert path.read_bytes() == content and path.stat().st_mtime == old[0], path
    assert stages_to_run(work, "RUN=uv", "VOCAB=my_vocab.json", goal="train") == []


def test_a_mining_setting_in_retrain_set_is_an_error_before_any_work(workdir):
    """RETRAIN_SET reaches retrain only: a mining setting there would be recorded in the
    run yet not mined with. It is refused by retrain's settings stamp, first thing."""
    result = make(workdir, "retrain", "AOQ_RUN=aoq_k", "RETRAIN_SET=offcandi.k_i2t=5",
                  check=False)
    assert result.returncode != 0
    assert "RETRAIN_SET sets offcandi.k_i2t, a mining setting" in result.stderr
    assert "give it in SET=" in result.stderr
    assert not (workdir / "runs").exists() or not list((workdir / "runs").rglob("*.pt"))


def test_rounds_mine_again_with_the_retrained_model(workdir):
    work = workdir
    variant = ["RETRAIN_INIT=miner", "RETRAIN_SET=loss.detach_weights=1"]
    make(work, "compare", *variant)
    assert stages_to_run(work, "ROUNDS=2", *variant) == ["embed", "offcandi", "retrain", "eval",
                                                         "plot"]
    out = make(work, "compare", "ROUNDS=2", *variant)
    for path in ("runs/tiny/aoq/embeddings_train.h5", "offcandi/tiny/round2/t2i.h5",
                 "runs/tiny/aoq_round2/checkpoint.pt"):
        assert (work / path).is_file(), path
    assert "aoq_round2" in out
    summary = json.loads((work / "runs/tiny/compare/diagnostics.json").read_text())["rounds"]
    assert [(r["embeddings"], r["candidates"]) for r in summary] == [
        ("runs/tiny/base/embeddings_train.h5", "offcandi/tiny"),
        ("runs/tiny/aoq/embeddings_train.h5", "offcandi/tiny/round2")]
    assert summary[0]["i2t"]["sampled_range"] == 20  # offcandi.hardest of the experiment
    for name in ("similarities.png", "positive_rank.png", "rounds.png"):
        assert (work / "runs/tiny/compare" / name).read_bytes()[:4] == b"\x89PNG"
    with h5py.File(work / "offcandi/tiny/round2/i2t.h5", "r") as f:
        miner = f.attrs["checkpoint"]
    assert miner.endswith("runs/tiny/aoq/checkpoint.pt")
    config = yaml.safe_load((work / "runs/tiny/aoq_round2/config.yaml").read_text())
    assert config["train"]["init_from"] == "runs/tiny/aoq/checkpoint.pt"  # from its miner
    assert config["loss"]["detach_weights"] is True
    base = yaml.safe_load((work / "runs/tiny/base/config.yaml").read_text())
    assert base["loss"]["name"] == "vse_max"  # RETRAIN_SET is for retrain only
    assert "detach_weights" not in base["loss"] and not base["train"]["offline_negatives"]
    assert stages_to_run(work, "ROUNDS=2", *variant) == ["eval", "plot"]


def raw_sources(work) -> list[str]:
    """A Karpathy split file and a BUTD TSV of 20 images (4 regions of 8-d) beside ``work``;
    returns the make arguments that build dataset ``kp`` from them."""
    sources = work.parent / "sources"
    sources.mkdir()
    splits = ["train"] * 16 + ["val"] * 2 + ["test"] * 2
    entries = [karpathy_entry(i, split, 5, filename=f"{1000 + i}.jpg")
               for i, split in enumerate(splits)]
    (sources / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    ids = [1000 + i for i in range(len(splits))]
    write_tsv(sources / "feats.tsv", make_images(ids, [4] * len(ids)), order=ids[::-1])
    return ["DATA=kp", f"KARPATHY={sources / 'dataset_flickr30k.json'}",
            f"TSV={sources / 'feats.tsv'}", "FEATURE_OPTS=--feature-dim 8 --max-regions 4"]


def test_features_from_karpathy_json_and_butd_tsv_then_train(workdir):
    """`make features` builds the dataset folder from raw sources; `make train` uses it."""
    work = workdir
    args = raw_sources(work)
    make(work, "features", *args)
    dataset = work.parent / "kp"
    for name in ("train_caps.txt", "dev_ids.txt", "test_images.txt", "train.h5", "dev.h5",
                 "test.h5"):
        assert (dataset / name).is_file(), name
    assert stages_to_run(work, *args, goal="features") == []  # up to date
    make(work, "train", *args)
    assert (work / "runs/kp/base/checkpoint.pt").is_file()


def test_miner_picks_what_mines_round_one(workdir):
    """MINER=text:<folder> embeds the captions with it and retraining checks its weights;
    MINER=<run> mines with that run; each into its own candidate folder."""
    work = workdir
    out = make(work, "retrain", "MINER=text:/models/minilm", dry_run=True)
    assert "embed-text --text-model /models/minilm" in out
    assert "--out runs/tiny/text-minilm/embeddings_train.h5" in out
    assert "--embeddings runs/tiny/text-minilm/embeddings_train.h5" in out
    assert "--out-dir offcandi/tiny/miner-text-minilm" in out
    assert "--set offcandi.base_ckpt=text:/models/minilm" in out
    out = make(work, "retrain", "MINER=other", "RETRAIN_INIT=miner", dry_run=True, check=False)
    assert "runs/tiny/other/embeddings_train.h5" in out.stdout + out.stderr
    refused = make(work, "retrain", "MINER=text:/m", "RETRAIN_INIT=miner", dry_run=True,
                   check=False)
    assert refused.returncode != 0 and "needs a trained miner" in refused.stderr


def test_mining_round_recipe_comes_from_the_configs(workdir):
    """The mining-round recipe is config policy (rounds.count, rounds.retrain_init), which
    make asks aoq for; ROUNDS= and RETRAIN_INIT= on the command line answer instead."""
    work = workdir
    two = make(work, "retrain", "SET=rounds.count=2 rounds.retrain_init=miner", dry_run=True)
    assert "--run-dir runs/tiny/aoq_round2 " in two
    assert "--out-dir offcandi/tiny/round2" in two
    assert "--set train.init_from=runs/tiny/aoq/checkpoint.pt" in two
    # eval's default CKPT is the last round's model
    assert "--ckpt runs/tiny/aoq_round2/checkpoint.pt" in make(
        work, "eval", "SET=rounds.count=2", dry_run=True)
    one = make(work, "retrain", "SET=rounds.count=2", "ROUNDS=1", dry_run=True)
    assert "aoq_round2" not in one and "--run-dir runs/tiny/aoq " in one
    assert "train.init_from" not in one
    refused = make(work, "retrain", "SET=rounds.retrain_init=best", dry_run=True, check=False)
    assert refused.returncode != 0
    assert "rounds.retrain_init must be one of scratch, miner" in refused.stderr
    assert "mining-round recipe" in refused.stderr


def test_clip_miner_embeds_the_images_with_its_arch_and_weights(workdir):
    """MINER=clip:<arch>:<weights>: `aoq embed-clip` over IMAGES, its own candidate folder,
    retraining checks it; a miner without weights, or RETRAIN_INIT=miner, is refused."""
    clip = "clip:ViT-B-32:/models/laion/open_clip_model.safetensors"
    out = make(workdir, "retrain", f"MINER={clip}", "IMAGES=/dl/images", dry_run=True)
    assert ("embed-clip --arch ViT-B-32 --weights /models/laion/open_clip_model.safetensors"
            in out)
    assert "--set data.images=/dl/images" in out
    assert "--out runs/tiny/clip-ViT-B-32-open_clip_model/embeddings_train.h5" in out
    assert "--embeddings runs/tiny/clip-ViT-B-32-open_clip_model/embeddings_train.h5" in out
    assert "--out-dir offcandi/tiny/miner-clip-ViT-B-32-open_clip_model" in out
    assert f"--set offcandi.base_ckpt={clip}" in out
    for bad in ("MINER=clip:ViT-B-32", "MINER=clip:ViT-B-32:", "MINER=clip::w.pt"):
        refused = make(workdir, "retrain", bad, dry_run=True, check=False)
        assert refused.returncode != 0 and "clip:<arch>:<weights file>" in refused.stderr
    refused = make(workdir, "retrain", f"MINER={clip}", "RETRAIN_INIT=miner", dry_run=True,
                   check=False)
    assert refused.returncode != 0 and "needs a trained miner" in refused.stderr
