"""Resume checks shared by the training tests: kill a run right after one of its checkpoint
saves, resume it, and compare it with the same run left uninterrupted.

The kill is a ``KeyboardInterrupt`` raised just after :func:`stages.io.checkpoint.save_checkpoint`
returns (as the training loop calls it: ``last.pt`` every ``train.ckpt_every`` steps, then
``best.pt`` and ``last.pt`` at an epoch's end), so the killed run's folder holds exactly
what a real kill at that moment would leave.
"""

from pathlib import Path

import pytest
import torch

import stages.training.loop as loop_module
from stages.io.checkpoint import load_checkpoint
from stages.pipeline.train import train
from tests.run_helpers import run_records


def train_killed_at_save(config, run_dir: Path, save: int) -> dict:
    """Train ``config`` into ``run_dir``, killed right after its ``save``-th checkpoint
    write (counted from 1 over every file the loop saves); returns the ``last.pt`` it left.
    The killed run has no ``checkpoint.pt`` (make must not take it as done)."""
    real_save = loop_module.save_checkpoint
    saves = []

    def save_then_die(path, state):
        real_save(path, state)
        saves.append(path.name)
        if len(saves) == save:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop_module, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train(config, run_dir)
    assert not (run_dir / "checkpoint.pt").exists()
    return load_checkpoint(run_dir / "last.pt")


def assert_same_training(whole_dir: Path, resumed_dir: Path) -> tuple[dict, dict]:
    """Assert that the two runs' ``last.pt`` hold the same weights (bit for bit, buffers
    included) and their ``metrics.jsonl`` the same records (timings aside); returns the two
    ``last.pt`` states (whole, resumed) for further checks."""
    whole = load_checkpoint(whole_dir / "last.pt")
    resumed = load_checkpoint(resumed_dir / "last.pt")
    assert whole["state_dict"].keys() == resumed["state_dict"].keys()
    for name, tensor in whole["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    assert run_records(resumed_dir, timings=False) == run_records(whole_dir, timings=False)
    return whole, resumed


def assert_resume_equals_uninterrupted(config, tmp_path: Path, save: int = 5,
                                       epoch_step: int = 5) -> tuple[dict, dict]:
    """Train ``config`` uninterrupted into ``tmp_path/whole``; train it again into
    ``tmp_path/killed``, killed after its ``save``-th checkpoint write, which must have left
    ``epoch_step`` batches of an epoch done (a mid-epoch kill); resume that run and assert it
    ends as the uninterrupted one (:func:`assert_same_training`). Returns (whole, resumed)
    ``last.pt`` states."""
    train(config, tmp_path / "whole")
    killed = train_killed_at_save(config, tmp_path / "killed", save)
    assert killed["epoch_step"] == epoch_step
    train(config, tmp_path / "killed", resume=True)
    return assert_same_training(tmp_path / "whole", tmp_path / "killed")
