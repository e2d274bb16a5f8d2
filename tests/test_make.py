"""The Makefile's own checks: its variables' values, the files it takes from the user, and
the virtual environment it uses."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def make(cwd, *args):
    return subprocess.run(["make", "-f", str(REPO / "Makefile"), "--no-print-directory", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("values, allowed", [
    (["RETRAIN_INIT=mine"], "use one of scratch miner"),
    (["RETRAIN_INIT=scratch miner"], "use one of scratch miner"),
    (["FOLD5=2"], "use one of 0 1"),
    (["FOLD5=true"], "use one of 0 1"),
    (["ROUNDS=0"], "a whole number >= 1"),
    (["ROUNDS=two"], "a whole number >= 1"),
    (["ROUNDS=-1"], "a whole number >= 1"),
    (["ROUNDS="], "a whole number >= 1"),
    (["RUN=a/b"], "one name"),
    (["AOQ_RUN="], "one name"),
    (["EXP=nope"], "configs/experiment/ has"),
    (["RUN=aoq"], "name them apart"),
    (["RUN=aoq_round2", "ROUNDS=2"], "name them apart"),
    # Paths with spaces: make's "mixed implicit and normal rules", click's "unexpected extra
    # arguments" otherwise.
    (["DATA_PATH=my data"], "give one path without spaces"),
    (["DATA_PATH="], "give one path without spaces"),
    (["VOCAB=my vocab.json"], "give one path without spaces"),
    (["OFFCANDI_DIR=my cands"], "give one path without spaces"),
    (["CKPT=runs/my run/checkpoint.pt"], "'runs/my' not found; CKPT is one checkpoint, or "
                                         "several separated by spaces (an ensemble)"),
])
def test_unknown_values_are_errors_that_list_the_allowed_ones(values, allowed):
    result = make(REPO, "help", *values)
    assert result.returncode != 0
    assert values[0].split("=")[0] in result.stderr and allowed in result.stderr
    assert "variables:" not in result.stdout


@pytest.mark.parametrize("value", ["RETRAIN_INIT=miner", "FOLD5=1", "ROUNDS=12", "EXP=demo",
                                   "RUN=warm", "DATA_PATH=/datasets/scan_data",
                                   "CKPT=runs/a/checkpoint.pt runs/b/checkpoint.pt",
                                   "CKPT=Makefile README.md", "CKPT=runs/x/best.pt"])
def test_allowed_values_pass(value):
    result = make(REPO, "help", value)
    assert result.returncode == 0, result.stderr


def fake_venv(folder: Path, stages_dir: str = "") -> Path:
    """A venv whose python prints ``stages_dir`` for the package check and whose pip only
    logs its arguments to ``folder/pip.log``."""
    bin_ = folder / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "python").write_text(f"#!/bin/sh\necho '{stages_dir}'\n")
    (bin_ / "pip").write_text(f"#!/bin/sh\necho \"$*\" >> '{folder}/pip.log'\n")
    for tool in ("python", "pip"):
        (bin_ / tool).chmod(0o755)
    return folder


@pytest.fixture
def checkout(tmp_path):
    """A folder with the files the environment step reads, newer than any venv's stamp."""
    work = tmp_path / "checkout"
    work.mkdir()
    for name in ("setup.cfg", "pyproject.toml"):
        (work / name).touch()
    return work


def install(checkout, venv):
    return make(checkout, "install", f"VENV={venv}", "TORCH=torch-wheels")


def test_install_goes_only_into_a_venv_this_checkout_made(checkout, tmp_path):
    here = os.path.realpath(checkout)
    ours = fake_venv(tmp_path / "ours")
    (ours / ".aoq-checkout").write_text(here + "\n")
    result = install(checkout, ours)
    assert result.returncode == 0, result.stderr
    assert (ours / "pip.log").read_text().splitlines() == ["install --quiet torch-wheels",
                                                           "install --quiet -e .[test]"]
    assert (ours / ".installed").exists()

    # Another checkout's venv, with its stamp older than this checkout's files: refused,
    # nothing installed.
    theirs = fake_venv(tmp_path / "theirs", "/elsewhere/stages")
    (theirs / ".aoq-checkout").write_text("/elsewhere\n")
    (theirs / ".installed").touch()
    os.utime(theirs / ".installed", (0, 0))
    result = install(checkout, theirs)
    assert result.returncode != 0
    assert "was not made by this checkout" in result.stderr and "/elsewhere" in result.stderr
    assert not (theirs / "pip.log").exists()

    # A venv of the user's own without this checkout's package: refused likewise.
    own = fake_venv(tmp_path / "own")
    result = install(checkout, own)
    assert result.returncode != 0 and "no checkout" in result.stderr
    assert not (own / "pip.log").exists()


def test_a_venv_with_this_checkouts_package_is_used_as_it_is(checkout, tmp_path):
    venv = fake_venv(tmp_path / "torch-env", os.path.realpath(checkout) + "/stages")
    result = install(checkout, venv)
    assert result.returncode == 0, result.stderr
    assert "as it is" in result.stdout
    assert not (venv / "pip.log").exists() and not (venv / ".installed").exists()


def test_a_new_venv_is_made_and_marked(checkout, tmp_path):
    """A VENV that does not exist is created with PYTHON and marked as this checkout's."""
    python = fake_venv(tmp_path / "system")  # its "python -m venv DIR" makes a fake venv
    (python / "bin" / "python").write_text(
        "#!/bin/sh\nmkdir -p \"$3/bin\" && cp \"$0\" \"$3/bin/python\" && "
        f"cp '{python}/bin/pip' \"$3/bin/pip\"\n")
    venv = tmp_path / "new"
    result = make(checkout, "install", f"VENV={venv}", f"PYTHON={python}/bin/python",
                  "TORCH=torch-wheels")
    assert result.returncode == 0, result.stderr
    assert (venv / ".aoq-checkout").read_text().strip() == os.path.realpath(checkout)
    assert (venv / ".installed").exists()


# Every make variable that names a file of the user's, with a goal that reads it: the
# file is an input, never a target make would write. {i}: the inputs' folder.
USER_INPUTS = [
    ("VOCAB={i}/my_vocab.json", "train"),
    ("KARPATHY={i}/dataset_x.json", "features"),
    ("COCO_JSON={i}/captions_train.json COCO_SPLITS=train={i}/train_ids.txt", "features"),
    ("TSV={i}/feats.tsv", "features"),
    ("IMAGES={i}/images WEIGHTS={i}/w.pth", "features"),
    ("IMAGES={i}/images MODEL=vse_cnn", "train"),
    ("CKPT={i}/model.pt", "eval"),
    ("CKPT={i}/model.pt", "export"),
]


@pytest.mark.parametrize("values, goal", USER_INPUTS)
def test_a_users_input_file_is_never_remade(tmp_path, values, goal):
    """Whatever its date (older than everything make writes), a file the user names is used
    as it is: make never plans to remake it (`make -n --debug=b` lists what it would)."""
    inputs = tmp_path / "inputs"
    (inputs / "images").mkdir(parents=True)
    args = [a.format(i=inputs) for a in values.split()]
    files = [inputs / "images"] + [Path(a.split("=")[-1]) for a in args
                                   if a.split("=")[-1].startswith(str(inputs))]
    for path in files:
        if not path.exists():
            path.write_text("the user's\n")
    dataset = tmp_path / "data" / ("d" if goal == "train" else "new")
    dataset.mkdir(parents=True)
    for name in ("train_caps.txt", "train_ims.npy", "train_images.txt"):
        (dataset / name).write_text("x\n")
    for path in files:
        os.utime(path, (1577836800, 1577836800))  # 2020-01-01
    for name in ("setup.cfg", "pyproject.toml", "stamp"):  # a ready environment
        (tmp_path / name).touch()
    result = make(tmp_path, "-n", "--debug=b", goal, *args, f"DATA_PATH={tmp_path / 'data'}",
                  f"DATA={dataset.name}", "STAMP=stamp", "AOQ=true")
    assert result.returncode == 0, result.stderr
    for path in files:
        assert f"Must remake target '{path}'" not in result.stdout, (path, result.stdout)
