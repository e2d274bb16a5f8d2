import json

import numpy as np
import pytest
import torch

import stages.train as train_module
from stages.config import load_config
from stages.errors import UserError
from stages.io.checkpoint import load_checkpoint
from stages.train import learning_rate, train


def _weights(path):
    return load_checkpoint(path)["state_dict"]


def test_training_learns_and_writes_the_run_folder(tiny_config, tmp_path):
    tiny_config.train.epochs = 3
    final = train(tiny_config, tmp_path / "run")
    run = tmp_path / "run"
    assert final == run / "checkpoint.pt"
    for name in ("config.yaml", "train.log", "metrics.jsonl", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(r["split"] == "dev" and "rsum" in r for r in records)
    state = load_checkpoint(final)
    assert state["epoch"] == max(records, key=lambda r: r["rsum"])["epoch"]
    assert state["config"] == tiny_config.to_dict()
    assert state["data_fingerprint"]["dataset"] == "tiny"
    assert state["vocab"]["idx2word"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    # Chance-level rsum on 10 dev images is about 6 * 100 * K/10 ~ 160; a trained model
    # on this easy tiny split beats it.
    assert max(r["rsum"] for r in records) > 200


def test_resume_after_interruption_gives_the_same_weights(tiny_config, tmp_path,
                                                          monkeypatch):
    tiny_config.train.ckpt_every = 5  # 200 captions / 16 = 13 steps per epoch
    train(tiny_config, tmp_path / "whole")

    real_save = train_module.save_checkpoint
    saves = []

    def save_then_die(path, state):
        real_save(path, state)
        saves.append(path.name)
        if len(saves) == 5:  # last.pt at step 5 of epoch 2: mid-epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config, tmp_path / "killed")
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    killed = tmp_path / "killed"
    assert not (killed / "checkpoint.pt").exists()  # make must not take it as done
    assert load_checkpoint(killed / "last.pt")["epoch_step"] == 5

    with pytest.raises(UserError, match="already exists; pass --resume"):
        train(tiny_config, killed)
    train(tiny_config, killed, resume=True)
    whole, resumed = _weights(tmp_path / "whole" / "last.pt"), _weights(killed / "last.pt")
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_resume_refuses_a_changed_experiment(tiny_config, tmp_path):
    train(tiny_config, tmp_path / "run")
    changed = load_config(base=tiny_config, overrides=["train.lr=1e-2", "train.epochs=3"])
    with pytest.raises(UserError, match=r"config differs.*train.lr"):
        train(changed, tmp_path / "run", resume=True)
    longer = load_config(base=tiny_config, overrides=["train.epochs=3"])
    train(longer, tmp_path / "run", resume=True)  # more epochs: allowed
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 3


def test_nan_loss_stops_with_the_step(tiny_root, tiny_config, tmp_path):
    path = tiny_root / "tiny" / "train_ims.npy"
    feats = np.load(path)
    feats[:] = np.nan
    np.save(path, feats)
    with pytest.raises(UserError, match=r"loss is nan at epoch 1, step 1 .*train_ims.npy"):
        train(tiny_config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_vocab_of_another_dataset_is_refused(tiny_root, tiny_config, tmp_path):
    caps = tiny_root / "tiny" / "train_caps.txt"
    caps.write_text(caps.read_text().replace("a ", "one ", 1))
    with pytest.raises(UserError, match="vocab.json was built from other captions"):
        train(tiny_config, tmp_path / "run")


def test_learning_rate_schedule():
    config = load_config(overrides=["train.lr=1e-3", "train.lr_update=2"])
    assert [learning_rate(config, e) for e in range(5)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4, 1e-5])
