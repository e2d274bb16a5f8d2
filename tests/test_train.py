import numpy as np
import pytest
import torch

import stages.losses.base as losses_base
import stages.training.loop as loop_module
from stages.config.sections import load_config
from stages.core.errors import UserError
from stages.core.log import remove_file_handlers
from stages.data.synthetic import write_synthetic_dataset
from stages.data.vocab import build_vocab_file
from stages.io.checkpoint import load_checkpoint
from stages.pipeline.train import train
from stages.training.loop import learning_rate
from tests.conftest import TINY_SPLITS
from tests.io.test_scalars import raw_points
from tests.resume_helpers import (
    assert_resume_equals_uninterrupted,
    assert_same_training,
    train_killed_at_save,
)
from tests.run_helpers import imported_candidates, run_records


def _weights(path):
    return load_checkpoint(path)["state_dict"]


def test_training_learns_and_writes_the_run_folder(tiny_config, tmp_path):
    tiny_config.train.epochs = 3
    final = train(tiny_config, tmp_path / "run")
    run = tmp_path / "run"
    assert final == run / "checkpoint.pt"
    for name in ("config.yaml", "train.log", "metrics.jsonl", "last.pt", "best.pt"):
        assert (run / name).is_file(), name
    records = run_records(run)
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


def test_resume_after_interruption_gives_the_same_weights(tiny_config, tmp_path):
    tiny_config.train.ckpt_every = 5  # 200 captions / 16 = 13 steps per epoch
    train(tiny_config, tmp_path / "whole")
    killed = tmp_path / "killed"
    # The 5th save: last.pt at step 5 of epoch 2 (epoch 1: steps 5, 10, best, last).
    assert train_killed_at_save(tiny_config, killed, 5)["epoch_step"] == 5

    with pytest.raises(UserError, match="already exists; pass --resume"):
        train(tiny_config, killed)
    train(tiny_config, killed, resume=True)
    assert_same_training(tmp_path / "whole", killed)  # train_loss included
    # TensorBoard holds each step once, with the uninterrupted run's values.
    whole_points, killed_points = raw_points(tmp_path / "whole"), raw_points(killed)
    assert set(whole_points) >= {"train/loss", "train/i2t", "train/t2i", "val/rsum"}
    assert [s for s, _ in killed_points["train/loss"]] == list(range(1, 27))
    for tag, points in whole_points.items():
        if tag != "val/epoch_seconds":
            assert killed_points[tag] == points, tag


def test_a_kill_after_the_metrics_line_leaves_no_duplicate(tiny_config, tmp_path, monkeypatch):
    train(tiny_config, tmp_path / "whole")
    real_save = loop_module.save_checkpoint
    saves = []

    def die_at_epoch_2_end(path, state):
        saves.append(path.name)
        if state["epoch"] == 2:  # the metrics line of epoch 2 is written, last.pt is not
            raise KeyboardInterrupt
        real_save(path, state)

    monkeypatch.setattr(loop_module, "save_checkpoint", die_at_epoch_2_end)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config, tmp_path / "killed")
    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    assert [r["epoch"] for r in run_records(tmp_path / "killed")] == [1, 2]
    train(tiny_config, tmp_path / "killed", resume=True)
    assert_same_training(tmp_path / "whole", tmp_path / "killed")


def test_resume_with_the_memory_bank_equals_uninterrupted(tiny_config, tmp_path):
    config = load_config(base=tiny_config, overrides=["memory.size=24",
                                                      "memory.warmup_steps=3",
                                                      "train.ckpt_every=4"])
    # The 6th save: last.pt at step 4 of epoch 2, the bank full.
    whole, resumed = assert_resume_equals_uninterrupted(config, tmp_path, save=6, epoch_step=4)
    assert whole["memory"]["filled"] == 24 and whole["memory"]["steps"] == 26
    assert torch.equal(whole["memory"]["images"], resumed["memory"]["images"])
    # The bank changes training: the same run without it ends elsewhere.
    train(tiny_config, tmp_path / "plain")
    plain = load_checkpoint(tmp_path / "plain" / "last.pt")["state_dict"]
    assert not all(torch.equal(plain[n], whole["state_dict"][n]) for n in plain)


def test_resume_refuses_a_changed_experiment(tiny_config, tmp_path):
    train(tiny_config, tmp_path / "run")
    changed = load_config(base=tiny_config, overrides=["train.lr=1e-2", "train.epochs=3"])
    with pytest.raises(UserError, match=r"other settings: train.lr.*AOQ_RUN=<name>"):
        train(changed, tmp_path / "run", resume=True)
    shorter = load_config(base=tiny_config, overrides=["train.epochs=1"])
    with pytest.raises(UserError, match="already trained 2 epochs; give train.epochs >= 2"):
        train(shorter, tmp_path / "run", resume=True)
    longer = load_config(base=tiny_config, overrides=["train.epochs=3"])
    train(longer, tmp_path / "run", resume=True)  # more epochs: allowed
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 3


def _files(folder):
    """Each file of ``folder``: its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize("change", ["settings", "data", "vocab", "candidates"])
def test_a_refused_resume_leaves_the_run_folder_as_it_was(tiny_root, tiny_config, tmp_path,
                                                          change):
    """Whatever refuses a resume (other settings, data, vocabulary or candidates), the run
    folder keeps the files of the run it holds: config.yaml still says what it was made
    with, train.log has no line of the refused start."""
    base = tiny_config
    if change == "candidates":
        base = load_config(base=tiny_config, overrides=[
            "train.offline_negatives=true", "offcandi.hardest=20",
            f"offcandi.dir={imported_candidates(tiny_config, tmp_path / 'a')}"])
    train(base, tmp_path / "run")
    remove_file_handlers()  # as when the run's own process ends
    if change == "settings":
        again = load_config(base=base, overrides=["train.lr=1e-2"])
    elif change == "data":
        other = tmp_path / "other"
        write_synthetic_dataset(other / "tiny", TINY_SPLITS, seed=4, feature_dim=32)
        build_vocab_file(other / "tiny" / "train_caps.txt", other / "tiny" / "vocab.json",
                         threshold=1)
        again = load_config(base=base, overrides=[f"data.path={other}"])
    elif change == "vocab":
        build_vocab_file(tiny_root / "tiny" / "train_caps.txt", tiny_root / "tiny" / "vocab.json",
                         threshold=2)
        again = base
    else:  # mined again into the same folder
        imported_candidates(tiny_config, tmp_path / "a", k_i2t=31)
        again = base
    before = _files(tmp_path / "run")
    with pytest.raises(UserError, match="cannot resume"):
        train(again, tmp_path / "run", resume=True)
    assert _files(tmp_path / "run") == before


def test_nan_loss_stops_with_the_step(tiny_config, tmp_path, monkeypatch):
    """A loss that is not finite from finite features (a diverging run) names the step."""
    real = losses_base.similarities

    def nan_similarities(*args, **kwargs):
        sims = real(*args, **kwargs)
        sims.positive = sims.positive * np.nan
        return sims

    monkeypatch.setattr(losses_base, "similarities", nan_similarities)
    with pytest.raises(UserError, match=r"loss is nan \(.*\) at epoch 1, step 1 .*train_ims.npy"):
        train(tiny_config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_nan_in_the_training_features_names_the_image(tiny_root, tiny_config, tmp_path):
    """As validation and evaluation do: the split, the file and the row, not "lower lr"."""
    path = tiny_root / "tiny" / "train_ims.npy"
    feats = np.load(path)
    feats[7, 2] = np.nan
    np.save(path, feats)
    with pytest.raises(UserError, match=r"split 'train': .*train_ims.npy has NaN or inf "
                                        r"features for 1 of a batch of 16 images \(first: "
                                        r"image 7, 0-based row\); regenerate the features"):
        train(tiny_config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# --- what a run promotes and what it keeps after a kill -----------------------------------
@pytest.mark.parametrize("spoil", ["truncated", "missing", "other-run"])
def test_a_bad_best_pt_is_never_promoted_to_checkpoint_pt(tiny_config, tmp_path, spoil):
    """A finished run resumed without its checkpoint.pt copies best.pt again: a truncated
    (`head -c`), missing or foreign best.pt is one clear error, and no checkpoint.pt."""
    run = tmp_path / "run"
    train(tiny_config, run)
    best = run / "best.pt"
    if spoil == "truncated":
        best.write_bytes(best.read_bytes()[:len(best.read_bytes()) // 2])
    elif spoil == "missing":
        best.unlink()
    else:
        other = load_config(base=tiny_config, overrides=["model.embed_size=16"])
        train(other, tmp_path / "other")
        best.write_bytes((tmp_path / "other" / "best.pt").read_bytes())
    (run / "checkpoint.pt").unlink()
    with pytest.raises(UserError, match=rf"{best} (is missing|cannot be read|holds another "
                                        rf"run's model or data).*it cannot become "
                                        rf"{run / 'checkpoint.pt'}.*delete {run} and train it "
                                        "again") as info:
        train(tiny_config, run, resume=True)
    assert "\n" not in str(info.value)
    assert not (run / "checkpoint.pt").exists()


def test_a_kill_or_full_disk_before_the_first_last_pt_leaves_no_duplicate(tiny_config,
                                                                          tmp_path,
                                                                          monkeypatch):
    """The metrics line of epoch 1 is written, then best.pt or last.pt is not (a kill, a
    full disk): the rerun starts over without a last.pt and must not log epoch 1 twice."""
    from stages.core.errors import NoSpaceError

    train(tiny_config, tmp_path / "whole")
    real_save = loop_module.save_checkpoint
    for name, failure in (("best.pt", KeyboardInterrupt), ("last.pt", NoSpaceError)):
        run = tmp_path / name

        def fail(path, state, name=name, failure=failure):
            if path.name == name:
                raise failure("killed" if failure is KeyboardInterrupt else "disk full")
            real_save(path, state)

        monkeypatch.setattr(loop_module, "save_checkpoint", fail)
        with pytest.raises(failure):
            train(tiny_config, run)
        monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
        assert [r["epoch"] for r in run_records(run)] == [1]
        assert not (run / "last.pt").exists()
        train(tiny_config, run, resume=True)
        assert [r["epoch"] for r in run_records(run)] == [1, 2], name
        assert_same_training(tmp_path / "whole", run)


def test_a_metrics_line_cut_short_is_dropped_on_resume(tiny_config, tmp_path):
    """A full disk can cut the metrics line short: the resumed run drops it."""
    run = tmp_path / "run"
    train_killed_at_save(tiny_config, run, 2)  # epoch 1's best.pt and last.pt
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"stage": "train", "epoch": 2, "st')
    train(tiny_config, run, resume=True)
    assert [r["epoch"] for r in run_records(run)] == [1, 2]


def test_a_memory_bank_larger_than_an_epoch_is_refused_before_anything_is_made(tiny_config,
                                                                               tmp_path):
    config = load_config(base=tiny_config, overrides=["memory.size=100000000000"])
    with pytest.raises(UserError, match=r"memory.size=100000000000 is more than the 200 pairs "
                                        r"of an epoch of train \(.*train_caps.txt\).*give "
                                        r"memory.size <= 200"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    train(load_config(base=tiny_config, overrides=["memory.size=200"]), tmp_path / "run")


def test_vocab_of_another_dataset_is_refused(tiny_root, tiny_config, tmp_path):
    caps = tiny_root / "tiny" / "train_caps.txt"
    caps.write_text(caps.read_text().replace("a ", "one ", 1))
    with pytest.raises(UserError, match="vocab.json was built from other captions"):
        train(tiny_config, tmp_path / "run")


def test_learning_rate_schedule():
    config = load_config(overrides=["train.lr=1e-3", "train.lr_update=2"])
    assert [learning_rate(config.train, e) for e in range(5)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4, 1e-5])


@pytest.fixture
def candidates(tiny_root, tiny_config, tmp_path):
    """Published-style random candidates for the tiny training split (40 images)."""
    return imported_candidates(tiny_config, tmp_path)


def test_any_loss_trains_with_offline_negatives(tiny_config, candidates, tmp_path,
                                                monkeypatch):
    offline = load_config(base=tiny_config, overrides=[
        "train.offline_negatives=true", f"offcandi.dir={candidates}", "offcandi.hardest=20"])
    seen = []
    real = losses_base.similarities

    def spy(img_emb, cap_emb, image_ids, extra, mask_same_image):
        seen.append(None if extra is None else extra.captions.shape[0])
        return real(img_emb, cap_emb, image_ids, extra, mask_same_image)

    monkeypatch.setattr(losses_base, "similarities", spy)
    train(offline, tmp_path / "vse_offline")
    # Every batch's references: its B captions plus 2B offline ones (T', T'').
    assert seen and all(n is not None for n in seen)
    state = load_checkpoint(tmp_path / "vse_offline" / "checkpoint.pt")
    assert state["data_fingerprint"]["candidates"]["i2t"]["k"] == 30
    train(tiny_config, tmp_path / "plain")
    plain = _weights(tmp_path / "plain" / "last.pt")
    trained = _weights(tmp_path / "vse_offline" / "last.pt")
    assert not all(torch.equal(plain[n], trained[n]) for n in plain)


def test_a_curriculum_with_nowhere_to_slide_is_refused(tiny_config, tmp_path):
    """With the window as wide as the candidates mined (hardest = K i2t, hardest / 5 = K
    t2i, as AOQ's 300 / 60) the curriculum would change nothing: an error before the run
    folder is made, not a setting ignored."""
    candidates = imported_candidates(tiny_config, tmp_path / "k30", k_i2t=30, k_t2i=6)
    settings = ["train.offline_negatives=true", f"offcandi.dir={candidates}",
                "offcandi.curriculum_epochs=1"]
    with pytest.raises(UserError, match="nowhere|nothing would change"):
        train(load_config(base=tiny_config, overrides=[*settings, "offcandi.hardest=30"]),
              tmp_path / "full")
    assert not (tmp_path / "full").exists()
    train(load_config(base=tiny_config, overrides=[*settings, "offcandi.hardest=20"]),
          tmp_path / "slides")  # a window of 20 of the 30 mined slides


def test_aoq_needs_offline_negatives(tiny_config, tmp_path):
    aoq = load_config(base=tiny_config, overrides=["loss.name=aoq"])
    with pytest.raises(UserError, match="needs offline negatives: train it with `aoq retrain`"):
        train(aoq, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_optimizer_settings_reach_the_trainer(tiny_config, tmp_path):
    tiny_config.train.epochs = 1
    tiny_config.train.optimizer = "adamw"
    tiny_config.train.weight_decay = 0.05
    group = load_checkpoint(train(tiny_config, tmp_path / "run"))["optimizer"]["param_groups"][0]
    assert (group["weight_decay"], group["decoupled_weight_decay"]) == (0.05, True)


def test_a_resume_from_other_initial_weights_is_refused(tiny_config, tmp_path):
    """train.init_from names a file: when it holds other weights than the run started from
    (the base model retrained), the finished continuation is not taken as done."""
    import shutil

    base = train(tiny_config, tmp_path / "base")
    remove_file_handlers()
    more = load_config(base=tiny_config, overrides=[f"train.init_from={base}"])
    train(more, tmp_path / "more")
    remove_file_handlers()
    other = train(load_config(base=tiny_config, overrides=["train.seed=5"]), tmp_path / "b2")
    remove_file_handlers()
    shutil.copyfile(other, base)
    with pytest.raises(UserError, match=r"initial weights .*changed: init_weights"):
        train(more, tmp_path / "more", resume=True)


def test_retraining_mixes_a_second_candidate_source(tiny_config, tmp_path):
    first = imported_candidates(tiny_config, tmp_path / "a")
    second = imported_candidates(tiny_config, tmp_path / "b", k_i2t=31)
    settings = ["train.offline_negatives=true", "loss.name=aoq", "offcandi.hardest=20",
                f"offcandi.dir={first}", f"offcandi.mix_dir={second}", "offcandi.mix_share=0.5"]
    path = train(load_config(base=tiny_config, overrides=settings), tmp_path / "run")
    fingerprint = load_checkpoint(path)["data_fingerprint"]
    assert fingerprint["candidates_mix"]["i2t"]["k"] == 31
    assert fingerprint["candidates"]["i2t"]["k"] == 30
    remove_file_handlers()
    wrong = load_config(base=tiny_config, overrides=[*settings, f"offcandi.mix_base_ckpt={path}"])
    with pytest.raises(UserError, match="mined with model weights"):
        train(wrong, tmp_path / "run2")


def _scripted_metrics(script):
    """evaluate_embeddings' stand-in: epoch k's validation gives script[k]'s recalls
    (R@1, R@5, R@10 each direction)."""
    calls = iter(script)

    def evaluate(img, cap, layout, folds, block_size):
        r1, r5, r10, r1i, r5i, r10i = next(calls)
        return {"r1_i2t": r1, "r5_i2t": r5, "r10_i2t": r10, "r1_t2i": r1i, "r5_t2i": r5i,
                "r10_t2i": r10i, "rsum": r1 + r5 + r10 + r1i + r5i + r10i}
    return evaluate


@pytest.mark.parametrize("select, best", [("rsum", 2), ("r1r5", 1)])
def test_the_best_model_is_kept_by_train_select(tiny_config, tmp_path, monkeypatch, select,
                                                best):
    """Epoch 1 has the best R@1 + R@5 both ways, epoch 2 the best rsum (its R@10 makes
    up): VSRN's rule keeps epoch 1, VSE++'s epoch 2; a resume goes on with the rule."""
    import stages.pipeline.train as train_module

    script = [(30, 60, 70, 20, 50, 60), (20, 50, 95, 15, 45, 95), (10, 20, 30, 5, 10, 20)]
    monkeypatch.setattr(train_module, "evaluate_embeddings", _scripted_metrics(script))
    config = load_config(base=tiny_config, overrides=["train.epochs=3", f"train.select={select}"])
    state = load_checkpoint(train(config, tmp_path / "run"))
    assert state["epoch"] == best and state["best_epoch"] == best
    scores = {"rsum": [sum(r) for r in script], "r1r5": [r[0] + r[1] + r[3] + r[4]
                                                         for r in script]}[select]
    assert state["best_score"] == max(scores) and state["best_rsum"] == sum(script[best - 1])
    with pytest.raises(UserError, match="train.select"):
        load_config(overrides=["train.select=r10"])


def test_drop_last_leaves_out_each_epochs_last_batch(tiny_config, tmp_path):
    """200 pairs in batches of 16: 12 full batches and one of 8, which drop_last leaves
    out; fewer pairs than a batch would train on nothing, and are refused."""
    config = load_config(base=tiny_config, overrides=["train.epochs=2", "train.drop_last=true"])
    train(config, tmp_path / "run")
    assert [r["step"] for r in run_records(tmp_path / "run")] == [12, 24]
    remove_file_handlers()
    big = load_config(base=config, overrides=["train.batch_size=256"])
    with pytest.raises(UserError, match="drop_last=true drops every batch.*256.*200 pairs"):
        train(big, tmp_path / "big")
    assert not (tmp_path / "big").exists()


def test_a_last_pt_from_before_train_select_resumes_with_its_best_rsum(tiny_config, tmp_path):
    """Its best model was kept by rsum and it records no best_score: the resumed run
    compares later epochs with that best rsum, not with -inf (which would replace best.pt
    by the next epoch whatever its score)."""
    from stages.io.checkpoint import save_checkpoint

    config = load_config(base=tiny_config, overrides=["train.epochs=2"])
    train_killed_at_save(config, tmp_path / "run", 2)  # epoch 1's best.pt and last.pt
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    del last["best_score"]
    last["best_rsum"] = 1e9  # no later epoch beats it
    save_checkpoint(tmp_path / "run" / "last.pt", last)
    final = load_checkpoint(train(config, tmp_path / "run", resume=True))
    assert final["epoch"] == 1
    assert load_checkpoint(tmp_path / "run" / "last.pt")["best_score"] == 1e9
