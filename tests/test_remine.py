"""Re-mining inside a run (offcandi.remine_every) on tiny data: the candidates each epoch
draws from, kill and resume, the runs it leaves alone, and what it refuses."""

import h5py
import numpy as np
import pytest

import stages.pipeline.remine as remine_module
import stages.training.loop as loop_module
from stages.config.sections import OffcandiConfig, load_config
from stages.core.errors import UserError
from stages.core.log import remove_file_handlers
from stages.data.dataset import open_split
from stages.io.checkpoint import load_checkpoint, weights_hash
from stages.mining.candidate_files import DIRECTIONS, candidate_path
from stages.mining.sampler import OfflineNegativeSampler
from stages.mining.selection import CaptionWords, SelectionRules, load_selections
from stages.pipeline.embed import embed
from stages.pipeline.offcandi import offcandi
from stages.pipeline.train import train
from tests.resume_helpers import assert_same_training, train_killed_at_save
from tests.run_helpers import aoq_ok, imported_candidates, run_records

K_I2T, K_T2I = 25, 6
# The filters apply to re-mined candidates as to the run's first ones.
FILTERS = ["offcandi.skip_top=1", "offcandi.duplicate_overlap=0.6"]


@pytest.fixture
def mined(tiny_config, tmp_path):
    """Candidates of the tiny training split mined (K 25 / 6, exact) by a one-epoch base
    model, as `aoq embed` + `aoq offcandi` make them; returns (folder, base checkpoint)."""
    base = train(load_config(base=tiny_config, overrides=["train.epochs=1"]),
                 tmp_path / "base")
    remove_file_handlers()
    folder = tmp_path / "cands"
    offcandi(embed(base), folder, OffcandiConfig(k_i2t=K_I2T, k_t2i=K_T2I))
    return folder, base


def offline_config(tiny_config, mined, *overrides):
    folder, base = mined
    return load_config(base=tiny_config, overrides=[
        "train.offline_negatives=true", "loss.name=aoq", "offcandi.hardest=20",
        f"offcandi.dir={folder}", f"offcandi.base_ckpt={base}", *FILTERS, *overrides])


def read_candidates(folder):
    """Each direction's indices, scores and positive scores, and its attributes."""
    out = {}
    for direction in DIRECTIONS:
        with h5py.File(candidate_path(folder, direction), "r") as f:
            out[direction] = ({k: np.asarray(f[k]) for k in ("indices", "scores",
                                                             "positive_scores")},
                              dict(f.attrs))
    return out


def test_the_candidates_of_epoch_2_are_those_aoq_mines_from_the_epoch_1_model(
        tiny_config, mined, tmp_path, monkeypatch):
    """remine_every=1: epoch 2 draws from the candidates `aoq embed` + `aoq offcandi` make
    from the model after epoch 1 (same indices and scores), filtered by the run's filters;
    epoch 1 from the run's own candidates; the files say what mined them."""
    drawn = {}
    real_draw = OfflineNegativeSampler.draw

    def spy(self, captions):
        drawn.setdefault(self.epoch, (self.i2t, self.t2i))
        return real_draw(self, captions)

    monkeypatch.setattr(OfflineNegativeSampler, "draw", spy)
    config = offline_config(tiny_config, mined, "offcandi.remine_every=1", "train.epochs=2")
    run = tmp_path / "run"
    train(config, run)
    remove_file_handlers()
    # The model after epoch 1, as a checkpoint of its own (epoch 1 never draws re-mined
    # candidates, so a one-epoch run trains the same weights).
    first = train(load_config(base=config, overrides=["train.epochs=1",
                                                      "offcandi.remine_every=0"]),
                  tmp_path / "epoch1")
    assert not (tmp_path / "epoch1" / "remined").exists()
    aoq_ok("embed", "--ckpt", first, "--out", tmp_path / "e1.h5", cwd=tmp_path)
    aoq_ok("offcandi", "--embeddings", tmp_path / "e1.h5", "--out-dir", tmp_path / "by_aoq",
           "--set", f"offcandi.k_i2t={K_I2T}", "--set", f"offcandi.k_t2i={K_T2I}",
           cwd=tmp_path)

    remined = run / "remined" / "epoch-1"
    ours, theirs = read_candidates(remined), read_candidates(tmp_path / "by_aoq")
    weights = weights_hash(load_checkpoint(first)["state_dict"])
    for direction in DIRECTIONS:
        for name, array in theirs[direction][0].items():
            assert np.array_equal(ours[direction][0][name], array), (direction, name)
        attrs = ours[direction][1]
        assert (attrs["weights"], attrs["epoch"], attrs["run"]) == (weights, 1,
                                                                    str(run.resolve()))
        assert attrs["checkpoint"] == f"{run} (epoch 1)" and attrs["k"] == theirs[
            direction][1]["k"]
    assert not (remined / "embeddings_train.h5").exists()  # removed once mined
    assert (remined / ".t2i.h5.settings.yaml").is_file()  # the mining settings, recorded

    # What each epoch drew from: the run's candidates, then aoq's, each filtered alike.
    config_rules = SelectionRules.from_config(config.offcandi)
    split = open_split(tiny_config.dataset_dir(), "train")
    words = CaptionWords(split.captions)
    for epoch, folder in ((0, mined[0]), (1, tmp_path / "by_aoq")):
        expected, _ = load_selections(folder, "tiny", split, 20, "", config_rules, words)
        for direction, used in zip(DIRECTIONS, drawn[epoch], strict=True):
            want = expected[direction]
            assert np.array_equal(used.indices, want.indices), (epoch, direction)
            assert np.array_equal(used.counts, want.counts), (epoch, direction)
            assert np.array_equal(used.eligible, want.eligible), (epoch, direction)
            assert (want.counts < want.k).any()  # the filters dropped some
    history = load_checkpoint(run / "last.pt")["remined"]
    assert [(h["epoch"], h["weights"]) for h in history] == [(1, weights)]


def _remined_arrays(run):
    """The indices and scores of each re-mine of ``run``, by epoch."""
    return {p.name: {d: read_candidates(p)[d][0] for d in DIRECTIONS}
            for p in sorted((run / "remined").iterdir())}


def _assert_same_remines(whole, resumed):
    a, b = _remined_arrays(whole), _remined_arrays(resumed)
    assert a.keys() == b.keys() == {"epoch-1", "epoch-2"}
    for epoch in a:
        for direction in DIRECTIONS:
            for name in a[epoch][direction]:
                assert np.array_equal(a[epoch][direction][name], b[epoch][direction][name])
    history = [[(h["epoch"], h["weights"]) for h in load_checkpoint(r / "last.pt")["remined"]]
               for r in (whole, resumed)]
    assert history[0] == history[1] and [e for e, _ in history[0]] == [1, 2]


@pytest.mark.parametrize("save, epoch_step", [(4, 0), (5, 5)],
                         ids=["killed-before-the-re-mine", "killed-within-the-re-mined-epoch"])
def test_a_killed_run_resumes_to_the_uninterrupted_one(tiny_config, mined, tmp_path, save,
                                                       epoch_step):
    """Saves in epoch 1: steps 5 and 10, best.pt, last.pt. Killed after the 4th (epoch 1
    done, its re-mine not yet made) the resumed run re-mines; killed after the 5th (step 5
    of epoch 2) it takes the recorded re-mine's files. Either ends as the uninterrupted
    run: weights, metrics, the candidates of each re-mine."""
    config = offline_config(tiny_config, mined, "offcandi.remine_every=1", "train.epochs=3",
                            "train.ckpt_every=5")
    train(config, tmp_path / "whole")
    remove_file_handlers()
    killed = tmp_path / "killed"
    state = train_killed_at_save(config, killed, save)
    assert (state["epoch"], state["epoch_step"]) == (1, epoch_step)
    assert [h["epoch"] for h in state["remined"]] == ([1] if epoch_step else [])
    remove_file_handlers()
    train(config, killed, resume=True)
    assert_same_training(tmp_path / "whole", killed)
    _assert_same_remines(tmp_path / "whole", killed)


def test_a_run_resumed_between_re_mines_takes_the_latest(tiny_config, mined, tmp_path,
                                                          monkeypatch):
    """remine_every=2 in 4 epochs, killed once epoch 3 is saved: the resumed run starts
    epoch 4, which re-mines nothing, with the candidates re-mined after epoch 2."""
    config = offline_config(tiny_config, mined, "offcandi.remine_every=2", "train.epochs=4")
    train(config, tmp_path / "whole")
    remove_file_handlers()
    real = loop_module.save_checkpoint

    def save_then_die(path, state):
        real(path, state)
        if path.name == "last.pt" and state["epoch"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed")
    monkeypatch.setattr(loop_module, "save_checkpoint", real)
    remove_file_handlers()
    train(config, tmp_path / "killed", resume=True)
    assert_same_training(tmp_path / "whole", tmp_path / "killed")
    assert [p.name for p in (tmp_path / "killed" / "remined").iterdir()] == ["epoch-2"]
    assert "resumed with the candidates re-mined after epoch 2" in (
        tmp_path / "killed" / "train.log").read_text()


def test_a_run_killed_while_re_mining_resumes_to_the_uninterrupted_one(tiny_config, mined,
                                                                       tmp_path, monkeypatch):
    """Killed once the first re-mine's files are written, before the sampler takes them:
    the resumed run mines them again and ends as the uninterrupted one."""
    config = offline_config(tiny_config, mined, "offcandi.remine_every=1", "train.epochs=3")
    train(config, tmp_path / "whole")
    remove_file_handlers()
    real = remine_module.offcandi

    def mine_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(remine_module, "offcandi", mine_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed")
    monkeypatch.setattr(remine_module, "offcandi", real)
    assert candidate_path(tmp_path / "killed" / "remined" / "epoch-1", "t2i").is_file()
    remove_file_handlers()
    train(config, tmp_path / "killed", resume=True)
    assert_same_training(tmp_path / "whole", tmp_path / "killed")
    _assert_same_remines(tmp_path / "whole", tmp_path / "killed")


def test_a_resume_whose_re_mined_files_changed_is_refused(tiny_config, mined, tmp_path):
    """The model that mined them is gone: changed or missing files cannot be made again,
    and the refusal leaves the run folder as it was."""
    config = offline_config(tiny_config, mined, "offcandi.remine_every=1", "train.epochs=3",
                            "train.ckpt_every=5")
    run = tmp_path / "run"
    train_killed_at_save(config, run, 5)  # within epoch 2, on epoch 1's re-mine
    remove_file_handlers()
    i2t = candidate_path(run / "remined" / "epoch-1", "i2t")
    with h5py.File(i2t, "a") as f:
        f["indices"][0, :2] = f["indices"][0, :2][::-1]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=rf"cannot resume {run}: the candidates it re-mined "
                                        rf"after epoch 1 are missing or were changed "
                                        rf"\({i2t}\).*delete {run}"):
        train(config, run, resume=True)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns)
            for p in run.rglob("*") if p.is_file()} == before


def test_re_mining_leaves_training_as_it_was(tiny_config, mined, tmp_path, monkeypatch):
    """remine_every=0 trains as a run without the setting, making no remined/ and no
    checkpoint entry. A run that re-mines every epoch but keeps its first candidates (the
    sampler's swap disabled) trains exactly as one that never re-mines: embedding and
    mining leave the RNG, the model's mode and its weights alone."""
    never = offline_config(tiny_config, mined, "train.epochs=3")
    zero = load_config(base=never, overrides=["offcandi.remine_every=0"])
    train(never, tmp_path / "never")
    remove_file_handlers()
    train(zero, tmp_path / "zero")
    remove_file_handlers()
    assert_same_training(tmp_path / "never", tmp_path / "zero")
    assert not (tmp_path / "zero" / "remined").exists()
    assert "remined" not in load_checkpoint(tmp_path / "zero" / "last.pt")

    monkeypatch.setattr(OfflineNegativeSampler, "set_candidates", lambda self, i2t, t2i: None)
    every = load_config(base=never, overrides=["offcandi.remine_every=1"])
    train(every, tmp_path / "every")
    assert sorted(p.name for p in (tmp_path / "every" / "remined").iterdir()) == [
        "epoch-1", "epoch-2"]
    assert_same_training(tmp_path / "never", tmp_path / "every")


def test_re_mining_changes_the_run_from_its_first_re_mine_on(tiny_config, mined, tmp_path):
    """remine_every=2 in 3 epochs: epochs 1 and 2 are those of the run without re-mining,
    epoch 3 draws other negatives."""
    never = offline_config(tiny_config, mined, "train.epochs=3")
    train(never, tmp_path / "never")
    remove_file_handlers()
    train(load_config(base=never, overrides=["offcandi.remine_every=2"]), tmp_path / "two")
    records = [run_records(tmp_path / r, timings=False) for r in ("never", "two")]
    assert records[0][:2] == records[1][:2]
    assert records[0][2] != records[1][2]
    assert [p.name for p in (tmp_path / "two" / "remined").iterdir()] == ["epoch-2"]


def test_imported_candidates_are_re_mined_exactly_with_their_k(tiny_config, tmp_path, caplog):
    """Files without a record of their mining settings (AOQ's published ones): exact
    search, their K."""
    folder = imported_candidates(tiny_config, tmp_path / "imported", k_i2t=30, k_t2i=8)
    config = load_config(base=tiny_config, overrides=[
        "train.offline_negatives=true", "offcandi.hardest=20", f"offcandi.dir={folder}",
        "offcandi.remine_every=1", "offcandi.index=hnsw"])
    train(config, tmp_path / "run")
    assert "no record of the settings that mined these files: re-mining with exact search " \
           "and their K (i2t 30, t2i 8)" in caplog.text
    attrs = read_candidates(tmp_path / "run" / "remined" / "epoch-1")
    assert [(a[1]["index"], a[1]["k"]) for a in attrs.values()] == [("flat", 30), ("flat", 8)]


def test_re_mining_uses_the_mining_settings_of_the_run_s_candidates(tiny_config, tmp_path):
    """An approximate index's settings come from the record beside the run's files, not
    from the run's offcandi.* mining keys (which the retrain stage does not read)."""
    base = train(load_config(base=tiny_config, overrides=["train.epochs=1"]),
                 tmp_path / "base")
    remove_file_handlers()
    options = OffcandiConfig(k_i2t=K_I2T, k_t2i=K_T2I, index="hnsw", ef_search=40)
    offcandi(embed(base), tmp_path / "cands", options)
    config = offline_config(tiny_config, (tmp_path / "cands", base),
                            "offcandi.remine_every=1", "offcandi.k_i2t=300")
    train(config, tmp_path / "run")
    attrs = read_candidates(tmp_path / "run" / "remined" / "epoch-1")
    assert [(a[1]["index"], a[1]["k"], a[1]["ef_search"]) for a in attrs.values()] == [
        ("hnsw", K_I2T, 40), ("hnsw", K_T2I, 40)]


@pytest.mark.parametrize("overrides, message", [
    (["offcandi.remine_every=1"],
     r"offcandi.remine_every=1 re-mines a run's offline negatives, and this run trains "
     r"without them \(train.offline_negatives=false\): give it to the retrain stage only "
     r"\(`aoq retrain`; make: RETRAIN_SET=offcandi.remine_every=N, not SET=\)"),
    (["offcandi.remine_every=2", "train.offline_negatives=true"],
     r"offcandi.remine_every=2 would never re-mine in a run of train.epochs=2 \(the first "
     r"re-mine is at the start of epoch 3\): give remine_every < 2, or 0"),
])
def test_re_mining_is_refused_where_it_makes_no_sense(tiny_config, tmp_path, overrides,
                                                      message):
    folder = imported_candidates(tiny_config, tmp_path / "c")
    config = load_config(base=tiny_config, overrides=[
        f"offcandi.dir={folder}", "offcandi.hardest=20", *overrides])
    with pytest.raises(UserError, match=message):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_negative_period_is_refused():
    with pytest.raises(UserError, match=r"offcandi.remine_every.*-1"):
        load_config(overrides=["offcandi.remine_every=-1"])


def test_the_period_is_a_sampling_setting_a_resume_checks(tiny_config, mined, tmp_path):
    config = offline_config(tiny_config, mined, "offcandi.remine_every=1")
    train(config, tmp_path / "run")
    remove_file_handlers()
    with pytest.raises(UserError, match=r"other settings: offcandi.remine_every: 1 -> 0"):
        train(load_config(base=config, overrides=["offcandi.remine_every=0", "train.epochs=3"]),
              tmp_path / "run", resume=True)
