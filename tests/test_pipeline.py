"""The Makefile chain (train -> embed -> offcandi -> retrain -> compare) on tiny data."""

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

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
    for name in ("setup.cfg", "pyproject.toml", "stamp"):  # stamp newer: nothing to install
        (work / name).touch()
    return work


def make(work, *args, dry_run=False):
    command = ["make", "-f", str(REPO / "Makefile"), "--no-print-directory",
               *(["-n"] if dry_run else []), *args,
               f"AOQ={sys.executable} -m stages.cli", "STAMP=stamp", "DATA=tiny", "EXP=tiny",
               f"DATA_PATH={work.parent}"]
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def stages_to_run(work, *args) -> list[str]:
    """The aoq sub-commands `make compare` would run now."""
    return [line.split("stages.cli ")[1].split()[0]
            for line in make(work, "compare", *args, dry_run=True).splitlines()
            if "stages.cli " in line]


def test_chain_end_to_end_then_only_missing_stages_rerun(workdir):
    work = workdir
    out = make(work, "compare")
    for path in ("runs/tiny/base/checkpoint.pt", "runs/tiny/base/embeddings_train.h5",
                 "offcandi/tiny/i2t.h5", "offcandi/tiny/t2i.h5",
                 "runs/tiny/aoq/checkpoint.pt"):
        assert (work / path).is_file(), path
    assert "base" in out and "aoq" in out and "rsum" in out
    assert stages_to_run(work) == ["eval"]  # everything is up to date

    (work / "runs/tiny/aoq/checkpoint.pt").unlink()  # retrain killed before it finished
    assert stages_to_run(work) == ["retrain", "eval"]
    make(work, "compare")
    assert stages_to_run(work) == ["eval"]

    (work / "offcandi/tiny/t2i.h5").unlink()  # mining killed between the two files
    shutil.rmtree(work / "runs/tiny/aoq")
    assert stages_to_run(work) == ["offcandi", "retrain", "eval"]

    (work / "runs/tiny/base/embeddings_train.h5").unlink()
    assert stages_to_run(work) == ["embed", "offcandi", "retrain", "eval"]


def test_rounds_mine_again_with_the_retrained_model(workdir):
    work = workdir
    make(work, "compare")
    assert stages_to_run(work, "ROUNDS=2") == ["embed", "offcandi", "retrain", "eval"]
    out = make(work, "compare", "ROUNDS=2")
    for path in ("runs/tiny/aoq/embeddings_train.h5", "offcandi/tiny/round2/t2i.h5",
                 "runs/tiny/aoq_round2/checkpoint.pt"):
        assert (work / path).is_file(), path
    assert "aoq_round2" in out
    with h5py.File(work / "offcandi/tiny/round2/i2t.h5", "r") as f:
        miner = f.attrs["checkpoint"]
    assert miner.endswith("runs/tiny/aoq/checkpoint.pt")
    assert stages_to_run(work, "ROUNDS=2") == ["eval"]
