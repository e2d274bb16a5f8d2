"""vse_transformer through the real stages on tiny data: every loss with offline negatives
and the memory bank, resume, and train -> embed -> offcandi -> eval -> retrain -> eval
through the CLI with the text model's folder moved away after training."""

import math
import shutil

import h5py
import pytest
import torch

from stages.cli import cli
from stages.io.checkpoint import load_checkpoint
from stages.losses import LOSSES
from stages.models.restore import model_from_checkpoint
from stages.pipeline.train import train
from tests import run_helpers
from tests.models.text_tower import text_tower_config, tiny_bert_for
from tests.resume_helpers import assert_resume_equals_uninterrupted
from tests.run_helpers import imported_candidates, run_records

OFFLINE = ["train.offline_negatives=true", "offcandi.hardest=20", "memory.size=16"]


@pytest.fixture
def candidates(tiny_root, tmp_path):
    """Published-style random candidates for the tiny training split (40 images)."""
    return imported_candidates(text_tower_config(tiny_root, tiny_bert_for(tiny_root)), tmp_path)


@pytest.mark.parametrize("loss", LOSSES.names())
def test_every_loss_trains_with_offline_negatives_and_the_memory_bank(tiny_root, candidates,
                                                                      tmp_path, loss):
    bert = tiny_bert_for(tiny_root)
    config = text_tower_config(tiny_root, bert, f"loss.name={loss}", f"offcandi.dir={candidates}",
                               "model.text_freeze_layers=1", *OFFLINE)
    train(config, tmp_path / "run")
    [record] = run_records(tmp_path / "run")
    assert all(math.isfinite(record[k]) for k in ("train_loss", "rsum"))
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["memory"]["filled"] == 16
    assert state["data_fingerprint"]["candidates"]["i2t"]["k"] == 30
    fresh, _ = model_from_checkpoint(state)
    fresh.load_pretrained()  # the weights the run started from
    start = fresh.state_dict()
    changed = {k for k, v in state["state_dict"].items() if not torch.equal(v, start[k])}
    assert any(k.startswith("text_encoder.encoder.encoder.layer.1.") for k in changed), loss
    assert not any(k.startswith(("text_encoder.encoder.embeddings.",
                                 "text_encoder.encoder.encoder.layer.0.")) for k in changed)


def test_resume_after_interruption_gives_the_same_weights(tiny_root, tmp_path):
    bert = tiny_bert_for(tiny_root)
    config = text_tower_config(tiny_root, bert, "train.epochs=2", "train.ckpt_every=5")
    # The 5th save: last.pt at step 5 of epoch 2 (13 steps an epoch), mid-epoch.
    assert_resume_equals_uninterrupted(config, tmp_path, save=5, epoch_step=5)


def aoq(*args):
    """Run an ``aoq`` sub-command in this process (as ``python -m stages.cli`` would; a
    subprocess: :func:`tests.run_helpers.aoq`)."""
    cli.main([str(a) for a in args], standalone_mode=False)


def test_train_embed_offcandi_retrain_eval_through_the_cli(tiny_root, tmp_path):
    bert = tiny_bert_for(tiny_root, "models/bert")
    (tiny_root / "tiny" / "vocab.json").unlink()  # a pretrained tokenizer needs none
    data = ["--set", f"data.path={tiny_root}", "--set", "data.name=tiny"]
    tiny = ["--set", "model.name=vse_transformer", "--set", "model.embed_size=32",
            "--set", "train.batch_size=16", "--set", "train.epochs=1", "--set",
            "data.workers=0", "--set", "train.device=cpu", "--set", "model.max_length=24"]
    mining = ["--set", "offcandi.k_i2t=25", "--set", "offcandi.k_t2i=6",
              "--set", "offcandi.hardest=20"]
    base, aoq_run = tmp_path / "runs" / "base", tmp_path / "runs" / "aoq"
    aoq("train", *data, *tiny, "--set", f"model.text_model={bert}", "--run-dir", base)
    ckpt = base / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    assert state["vocab"]["format"] == "aoq-hf-tokenizer"
    assert "text_config" in state["model"]["args"] and "vocab_size" not in state["model"]["args"]
    model, tokenizer = model_from_checkpoint(state)
    captions = (tiny_root / "tiny" / "train_caps.txt").read_text().splitlines()
    ids = tokenizer.encode_many(captions)
    assert max(map(len, ids)) <= 24 and ids[0][0] == 2  # [CLS] first, truncated to 24

    moved = tmp_path / "elsewhere"
    shutil.move(bert.parent, moved)  # later stages rebuild everything from the checkpoint
    aoq("embed", "--ckpt", ckpt, *data)
    rebuilt, rebuilt_tokenizer = model_from_checkpoint(load_checkpoint(ckpt))
    assert rebuilt_tokenizer.encode_many(captions) == ids
    with h5py.File(base / "embeddings_train.h5", "r") as f:
        stored = torch.from_numpy(f["captions"][:5])
    tokens = torch.nn.utils.rnn.pad_sequence([torch.tensor(t) for t in ids[:5]],
                                             batch_first=True, padding_value=tokenizer.pad_id)
    with torch.no_grad():
        direct = model.encode_captions(tokens, torch.tensor([len(t) for t in ids[:5]]))
    torch.testing.assert_close(stored, direct, atol=1e-5, rtol=1e-4)
    aoq("offcandi", "--embeddings", base / "embeddings_train.h5", *data, *mining,
        "--out-dir", tmp_path / "cands")
    aoq("eval", "--ckpt", ckpt, *data)

    aoq("retrain", *data, *tiny, *mining, "--set", f"model.text_model={moved / 'bert'}",
        "--set", f"offcandi.dir={tmp_path / 'cands'}", "--set", f"offcandi.base_ckpt={ckpt}",
        "--run-dir", aoq_run)
    aoq("eval", "--ckpt", aoq_run / "checkpoint.pt", *data)
    assert [r["stage"] for r in run_records(aoq_run)] == ["train", "eval"]
    assert load_checkpoint(aoq_run / "checkpoint.pt")["loss_state"] is not None
    evals = run_records(base)
    assert evals[-1]["stage"] == "eval" and math.isfinite(evals[-1]["rsum"])


@pytest.mark.parametrize("setting, message", [
    ("model.text_model={missing}", "text model {missing}: no such folder {missing}; on a "
                                   "machine with network save it"),
    ("model.text_freeze_layers=3", "text_freeze_layers=3, but the text model {bert} has 2 "
                                   "layers"),
])
def test_a_bad_text_model_is_one_line_and_leaves_no_run_folder(tiny_root, tmp_path, setting,
                                                                message):
    bert = tiny_bert_for(tiny_root)
    paths = {"missing": tmp_path / "no" / "bert", "bert": bert}
    result = run_helpers.aoq("train", "--set", f"data.path={tiny_root}", "--set",
                             "data.name=tiny", "--set", "model.name=vse_transformer", "--set",
                             f"model.text_model={bert}", "--set", setting.format(**paths),
                             "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 2
    assert message.format(**paths) in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
