"""The Makefile's own checks: its variables' values, the files it takes from the user, and
the virtual environment it uses."""

import os
import shutil
import subprocess
import sys
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
    # MODEL_INPUT answers what the model reads: AOQ=true cannot.
    ("VOCAB={i}/my_vocab.json MODEL_INPUT=features", "train"),
    ("KARPATHY={i}/dataset_x.json", "features"),
    ("COCO_JSON={i}/captions_train.json COCO_SPLITS=train={i}/train_ids.txt", "features"),
    ("TSV={i}/feats.tsv", "features"),
    ("IMAGES={i}/images WEIGHTS={i}/w.pth", "features"),
    ("IMAGES={i}/images MODEL=vse_cnn MODEL_INPUT=pixels", "train"),
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


def dataset_with_captions(tmp_path) -> Path:
    """``tmp_path/data/d`` holding training captions only (no features, no image list), and
    in ``tmp_path`` the shipped model configs."""
    dataset = tmp_path / "data" / "d"
    dataset.mkdir(parents=True)
    (dataset / "train_caps.txt").write_text("x\n")
    shutil.copytree(REPO / "configs" / "model", tmp_path / "configs" / "model")
    return dataset


def make_run(tmp_path, *args):
    """make in ``tmp_path`` with this package's aoq and a ready environment, on dataset d."""
    for name in ("setup.cfg", "pyproject.toml", "stamp"):
        (tmp_path / name).touch()
    return make(tmp_path, *args, "DATA=d", f"DATA_PATH={tmp_path / 'data'}", "EXP=",
                "STAMP=stamp", f"AOQ={sys.executable} -m stages.cli")


@pytest.mark.parametrize("values, reads", [
    (["MODEL=vse_cnn"], "pixels"),
    (["MODEL=clip"], "pixels"),
    (["MODEL=vsepp"], "features"),
    (["MODEL=vsrn"], "features"),
    (["MODEL=vsepp", "SET=model.name=vse_cnn"], "pixels"),  # the resolved config's model
])
def test_a_run_of_a_model_that_reads_pixels_depends_on_the_image_list(tmp_path, values, reads):
    """make asks what the config's model reads (`aoq model-input`): a model of pixels makes
    the run depend on train_images.txt, a model of features on the split's features. Neither
    is there, so `make -n` shows the recipe of the one it depends on, saying it is missing."""
    dataset = dataset_with_captions(tmp_path)
    result = make_run(tmp_path, "-n", "train", *values)
    assert result.returncode == 0, result.stderr
    assert (f"{dataset}/train_images.txt not found" in result.stdout) == (reads == "pixels")
    assert (f"no features in {dataset}" in result.stdout) == (reads == "features")
    assert "stages.cli train " in result.stdout


def test_a_model_make_cannot_ask_about_stops_make(tmp_path):
    """aoq's own message (an unknown model), then make's, naming MODEL."""
    dataset_with_captions(tmp_path)
    vocab = tmp_path / "vocab.json"  # the user's: no vocab stamp asks aoq first
    vocab.write_text("{}\n")
    result = make_run(tmp_path, "-n", "train", "SET=model.name=nope", f"VOCAB={vocab}")
    assert result.returncode != 0
    assert "unknown model 'nope'; known: clip" in result.stderr
    assert "MODEL=vsepp: cannot tell whether its model reads features or pixels" in result.stderr


def test_a_fresh_clone_asks_what_the_model_reads_once_its_environment_is_made(tmp_path):
    """Before the environment exists there is no aoq to ask: the run's input waits for the
    environment, then a make of its own asks and makes the input (here: finds the image list
    missing); the next make asks at once."""
    python = tmp_path / "system" / "python"  # its "python -m venv DIR" makes a fake venv
    python.parent.mkdir()
    log = tmp_path / "aoq.log"
    python.write_text(
        "#!/bin/sh\nmkdir -p \"$3/bin\" && cd \"$3/bin\" && printf '#!/bin/sh\\n' > pip && "
        f"printf '#!/bin/sh\\necho $1 >> {log}\\n"
        "[ $1 = model-input ] && echo pixels\\nexit 0\\n' > aoq && chmod +x pip aoq\n")
    python.chmod(0o755)
    work = tmp_path / "checkout"
    dataset = dataset_with_captions(work)
    for name in ("setup.cfg", "pyproject.toml"):
        (work / name).touch()
    vocab = tmp_path / "vocab.json"  # the user's: nothing but the run's input needs aoq
    vocab.write_text("{}\n")
    venv = tmp_path / "venv"
    args = ["train", "DATA=d", f"DATA_PATH={work / 'data'}", f"VOCAB={vocab}", f"VENV={venv}",
            f"PYTHON={python}", "TORCH=torch-wheels"]
    result = make(work, *args)
    assert result.returncode != 0
    assert f"{dataset}/train_images.txt not found" in result.stderr
    assert (venv / ".installed").exists() and "train-input-after-setup" in result.stdout
    asked = log.read_text().split()
    assert asked.count("model-input") == 1 and "train" not in asked

    (dataset / "train_images.txt").write_text("0.jpg\n")
    result = make(work, *args)
    assert result.returncode == 0, result.stderr
    assert "train-input-after-setup" not in result.stdout
    again = log.read_text().split()[len(asked):]
    assert sorted(again) == ["model-input", "settings", "train"] and again[-1] == "train"


FAKE_AOQ = """#!/bin/sh
# A stand-in for aoq that writes what each command's make rule expects.
command=$1; shift
out=""; vocab=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift ;;
        --run-dir) out=$2/checkpoint.pt; shift ;;
        --set) case "$2" in data.vocab=*) vocab=${2#data.vocab=} ;; esac; shift ;;
    esac
    shift
done
case "$command" in
    demo-data) mkdir -p "$out"
               for f in train_caps.txt train_ims.npy train_ids.txt; do echo x > "$out/$f"; done ;;
    vocab) echo x > "$vocab" ;;
    settings|train) mkdir -p "$(dirname "$out")"; echo x > "$out" ;;
esac
echo "$command" >> "$(dirname "$0")/commands"
"""


def test_a_dataset_made_in_the_same_call_is_a_training_input(tmp_path):
    """The demo makes its dataset and trains on it in one make call: the ids file the
    run's input includes is then not in make's cache of the folder, which must not stop
    the chain ("No rule to make target .train-input")."""
    aoq = tmp_path / "bin" / "aoq"
    aoq.parent.mkdir()
    aoq.write_text(FAKE_AOQ)
    aoq.chmod(0o755)
    for name in ("setup.cfg", "pyproject.toml", "stamp"):  # a ready environment
        (tmp_path / name).touch()
    result = make(tmp_path, "runs/demo/base/checkpoint.pt", "DATA=demo", "DATA_PATH=data",
                  "STAMP=stamp", f"AOQ={aoq}", "MODEL_INPUT=features")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs/demo/base/checkpoint.pt").is_file()
    assert "train" in (aoq.parent / "commands").read_text().split()
