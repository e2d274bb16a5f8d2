"""Training from raw images (vse_cnn): resume, the whole chain through the CLI, make."""

import shutil
from pathlib import Path

import h5py
import pytest

from stages.config.sections import load_config
from stages.core.errors import UserError
from stages.io.checkpoint import load_checkpoint
from stages.models import MODELS
from stages.pipeline.inputs import image_input
from stages.pipeline.table import finetune
from stages.pipeline.train import train
from tests.raw_images import TINY_CNN, write_image_dataset
from tests.resume_helpers import assert_resume_equals_uninterrupted
from tests.run_helpers import aoq, aoq_ok, run_records, second_run_output
from tests.test_pipeline import make

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def pixels(tmp_path):
    return write_image_dataset(tmp_path)


def config_for(root, images, *more):
    return load_config(overrides=[f"data.path={root}", "data.name=pix", f"data.images={images}",
                                  *TINY_CNN, *more])


def test_resume_equals_uninterrupted_with_crops_and_finetuning(pixels, tmp_path):
    images, dataset = pixels
    # 120 captions / 8 = 15 steps an epoch; layer3 and layer4 train, batch norm included.
    config = config_for(tmp_path, images, "model.finetune=true", "model.freeze_stages=3",
                        "model.backbone_lr_scale=0.5", "train.epochs=2", "train.ckpt_every=4",
                        "train.lr=1e-3")
    # The 7th save, last.pt at step 8 of epoch 2 (epoch 1: steps 4, 8, 12, best, last).
    whole, _ = assert_resume_equals_uninterrupted(config, tmp_path, save=7, epoch_step=8)
    assert whole["data_fingerprint"]["train_features"]["kind"] == "images"
    assert whole["config"]["data"]["images"] == str(images.resolve())  # stored absolute
    assert whole["model"]["args"]["finetune"] is True


def test_resume_refuses_other_images(pixels, tmp_path):
    images, dataset = pixels
    config = config_for(tmp_path, images)
    train(config, tmp_path / "run")
    (images / "train" / "0000.jpg").write_bytes((images / "train" / "0001.jpg").read_bytes())
    config.train.epochs = 2
    with pytest.raises(UserError, match="other data.*train_features"):
        train(config, tmp_path / "run", resume=True)


def test_a_feature_dataset_without_image_list_is_a_clear_error(tiny_root, tmp_path):
    config = load_config(overrides=[f"data.path={tiny_root}", "data.name=tiny",
                                    f"data.images={tmp_path}", *TINY_CNN])
    with pytest.raises(UserError, match="train_images.txt not found"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_chain_train_embed_offcandi_retrain_eval_through_the_cli(pixels, tmp_path):
    images, dataset = pixels
    sets = [a for s in [f"data.path={tmp_path}", "data.name=pix", f"data.images={images}",
                        *TINY_CNN, "model.finetune=true", "model.freeze_stages=4",
                        "offcandi.k_i2t=20", "offcandi.k_t2i=5", "offcandi.hardest=10"]
            for a in ("--set", s)]
    base, aoq_run = tmp_path / "runs" / "base", tmp_path / "runs" / "aoq"
    steps = [
        ["train", *sets, "--run-dir", base],
        ["embed", "--ckpt", base / "checkpoint.pt"],
        ["offcandi", "--embeddings", base / "embeddings_train.h5", *sets,
         "--out-dir", tmp_path / "cand"],
        ["retrain", *sets, "--set", f"offcandi.dir={tmp_path / 'cand'}",
         "--set", f"offcandi.base_ckpt={base / 'checkpoint.pt'}", "--set", "train.epochs=1",
         "--run-dir", aoq_run],
        ["eval", "--ckpt", base / "checkpoint.pt", "--ckpt", aoq_run / "checkpoint.pt",
         "--each"],
    ]
    for step in steps:
        result = aoq_ok(*step, cwd=tmp_path)
    assert "base" in result.stdout and "aoq" in result.stdout and "rsum" in result.stdout
    records = run_records(aoq_run)
    assert records[-1]["stage"] == "eval" and records[-1]["images"] == 6
    state = load_checkpoint(aoq_run / "checkpoint.pt")
    assert state["model"]["name"] == "vse_cnn"
    assert set(state["data_fingerprint"]["candidates"]) == {"i2t", "t2i"}
    with h5py.File(base / "embeddings_train.h5") as f:
        assert f["images"].shape == (24, 16) and f["captions"].shape == (120, 16)


def test_an_unreadable_image_stops_training_with_one_line(pixels, tmp_path):
    images, dataset = pixels
    (images / "train" / "0005.jpg").write_bytes(b"not a jpeg")
    result = aoq("train", *[a for s in [f"data.path={tmp_path}", "data.name=pix",
                                        f"data.images={images}", *TINY_CNN, "data.workers=1"]
                            for a in ("--set", s)], "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "| ERROR |" in line]
    assert len(errors) == 1 and "cannot read image" in errors[0] and "0005.jpg" in errors[0]
    assert "Traceback" not in result.stderr


def test_make_trains_pixel_models_on_the_image_list(pixels, tmp_path):
    images, dataset = pixels
    work = tmp_path / "work"
    work.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "stamp"):
        (work / name).touch()
    shutil.copytree(REPO / "configs" / "model", work / "configs" / "model")
    common = ["DATA=pix", f"DATA_PATH={tmp_path}", "EXP="]
    out = make(work, "train", "MODEL=vse_cnn", f"IMAGES={images}", *common, dry_run=True)
    assert "stages.cli train" in out and "features cnn" not in out
    assert "--config configs/model/vse_cnn.yaml" in out and f"--set data.images={images}" in out
    # A feature model with IMAGES= gets CNN features first, as before.
    out = make(work, "train", f"IMAGES={images}", *common, dry_run=True)
    assert "features cnn" in out
    (dataset / "train_images.txt").unlink()
    result = make(work, "train", "MODEL=vse_cnn", f"IMAGES={images}", *common, check=False)
    assert result.returncode != 0 and "train_images.txt not found" in result.stderr


def test_make_features_refuses_another_extractor_for_existing_features(pixels, tmp_path):
    """Features made with one CNN are not kept silently when another is asked for: make
    runs the features stage, which refuses to replace them; the settings they were made
    with are up to date, whatever other options (workers) are given."""
    images, dataset = pixels
    work = tmp_path / "work"
    work.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "stamp"):
        (work / name).touch()
    common = ["DATA=pix", f"DATA_PATH={tmp_path}", "EXP=", f"IMAGES={images}",
              "WEIGHTS=random", "FEATURE_OPTS=--crop-size 32 --workers 0 --device cpu"]
    make(work, "features", "CNN=resnet18", *common)
    made = (dataset / "train.h5").read_bytes()
    result = make(work, "features", "CNN=resnet50", *common, check=False)
    assert result.returncode != 0
    assert "holds features made with other settings (arch: 'resnet18' -> 'resnet50')" in \
        result.stderr and "DATA=<new name>" in result.stderr
    assert (dataset / "train.h5").read_bytes() == made
    with h5py.File(dataset / "train.h5", "r") as f:
        assert f.attrs["arch"] == "resnet18"
    faster = [*common[:-1], "FEATURE_OPTS=--crop-size 32 --workers 1 --device cpu"]
    assert "features cnn" not in make(work, "features", "CNN=resnet18", *faster, dry_run=True)


def test_make_asks_the_code_what_each_model_reads():
    """The Makefile keeps no list of the models that read pixels: it asks `aoq model-input`,
    which answers each registered model's own image_input, without torch once the options
    are cached (the first run may write the cache)."""
    assert "PIXEL_MODELS" not in (REPO / "Makefile").read_text()
    names = MODELS.names()
    code = ("import sys; from stages.cli import cli\n"
            f"for name in {names!r}:\n"
            "    cli(['model-input', '--set', f'model.name={name}'], standalone_mode=False)\n"
            "print('torch' in sys.modules)")
    *answers, torch_imported = second_run_output(code).split()
    assert answers == [MODELS.class_of(n).image_input for n in names]
    assert answers == [image_input(n) for n in names]
    assert {"features", "pixels"} == set(answers) and torch_imported == "False"


def test_table_finetune_column_comes_from_the_checkpoint():
    assert finetune({"name": "vsepp", "args": {"img_dim": 32, "embed_size": 8}}) == "no"
    assert finetune({"name": "vse_cnn", "args": {"finetune": False}}) == "no"
    assert finetune({"name": "vse_cnn", "args": {"finetune": True}}) == "yes"
