"""Batches of mutually hard captions (``offcandi.group_size``): the grouping against its
definition, and training with it end to end (resumed exactly)."""

import numpy as np
import pytest

import stages.training.tasks as tasks_module
from stages.config.sections import load_config
from stages.core.errors import UserError
from stages.pipeline.train import train
from stages.training.batches import epoch_batches, grouped_epoch_batches
from tests.resume_helpers import assert_resume_equals_uninterrupted
from tests.run_helpers import imported_candidates

PER_IMAGE = 5


def random_neighbours(num_images: int, width: int, seed: int = 0):
    """Each image's (W,) candidate captions of other images, and how many are eligible."""
    rng = np.random.default_rng(seed)
    neighbours = np.empty((num_images, width), dtype=np.int64)
    for i in range(num_images):
        others = np.setdiff1d(np.arange(num_images * PER_IMAGE),
                              np.arange(i * PER_IMAGE, (i + 1) * PER_IMAGE))
        neighbours[i] = rng.choice(others, width, replace=False)
    return neighbours, rng.integers(0, width + 1, num_images)


def test_groups_place_every_caption_once_with_its_anchor_s_neighbours():
    neighbours, counts = random_neighbours(30, 12)
    group = 4
    batches = grouped_epoch_batches(neighbours, counts, group, batch_size=16, seed=3, epoch=1)
    order = [c for b in batches for c in b]
    assert sorted(order) == list(range(30 * PER_IMAGE))  # every caption, once
    assert [len(b) for b in batches] == [len(b) for b in epoch_batches(150, 16, 3, 1)]
    # Walk the order as groups: an anchor (the first caption not yet placed in the epoch's
    # permutation), then captions of its image's eligible neighbours, of distinct images.
    permutation = np.random.default_rng([3, 1]).permutation(150).tolist()
    placed, k, groups = set(), 0, 0
    while k < len(order):
        anchor = next(c for c in permutation if c not in placed)
        assert order[k] == anchor
        placed.add(anchor)
        image = anchor // PER_IMAGE
        allowed = set(neighbours[image, :counts[image]].tolist())
        images = {image}
        k += 1
        while k < len(order) and order[k] in allowed and order[k] not in placed:
            assert order[k] // PER_IMAGE not in images
            images.add(order[k] // PER_IMAGE)
            placed.add(order[k])
            k += 1
        assert len(images) <= group
        groups += 1
    assert groups < 150  # captions were grouped, not all alone
    assert grouped_epoch_batches(neighbours, counts, group, 16, 3, 1) == batches
    assert grouped_epoch_batches(neighbours, counts, group, 16, 3, 2) != batches


def test_groups_are_split_across_ranks_as_random_batches_are():
    neighbours, counts = random_neighbours(30, 12)
    single = grouped_epoch_batches(neighbours, counts, 3, 8, seed=2, epoch=0)
    ranks = [grouped_epoch_batches(neighbours, counts, 3, 4, 2, 0, rank=r, world_size=2)
             for r in (0, 1)]
    assert [sorted(a + b) for a, b in zip(*ranks, strict=True)] == [sorted(b) for b in single]


def test_no_eligible_neighbour_leaves_each_caption_alone():
    neighbours, _ = random_neighbours(10, 5)
    batches = grouped_epoch_batches(neighbours, np.zeros(10, np.int64), 4, 8, seed=0, epoch=0)
    assert batches == epoch_batches(50, 8, 0, 0)


@pytest.fixture
def grouped_config(tiny_config, tmp_path):
    return load_config(base=tiny_config, overrides=[
        "train.offline_negatives=true", "offcandi.hardest=20", "offcandi.group_size=4",
        f"offcandi.dir={imported_candidates(tiny_config, tmp_path / 'candidates')}"])


def test_training_uses_grouped_batches_and_resumes_exactly(grouped_config, tmp_path,
                                                           monkeypatch):
    seen = []
    real = tasks_module.grouped_epoch_batches

    def spy(neighbours, counts, *args):
        seen.append((neighbours.shape, args[0]))
        return real(neighbours, counts, *args)

    monkeypatch.setattr(tasks_module, "grouped_epoch_batches", spy)
    grouped_config.train.ckpt_every = 1
    assert_resume_equals_uninterrupted(grouped_config, tmp_path, save=5, epoch_step=5)
    assert seen and all(shape == (40, 20) and group == 4 for shape, group in seen)


@pytest.mark.parametrize("group", [1, 17])
def test_a_group_size_that_cannot_group_is_refused(grouped_config, tmp_path, group):
    grouped_config.offcandi.group_size = group
    with pytest.raises(UserError, match=f"offcandi.group_size={group}: give 0"):
        train(grouped_config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_group_size_without_offline_negatives_is_refused(tiny_config, tmp_path):
    plain = load_config(base=tiny_config, overrides=["offcandi.group_size=4"])
    with pytest.raises(UserError, match="offcandi.group_size=4 makes batches from a run's "
                                        "offline candidates"):
        train(plain, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_grouped_batches_re_mined_with_drop_last_resume_exactly(grouped_config, tmp_path):
    """The seams together: batches grouped from candidates re-mined after epoch 1, the last
    incomplete batch dropped; killed in epoch 2, resumed, equal to the uninterrupted run."""
    config = load_config(base=grouped_config, overrides=[
        "offcandi.remine_every=1", "train.drop_last=true", "train.ckpt_every=1"])
    # 200 captions in batches of 16: 12 steps in epoch 1, then best.pt and last.pt; the
    # 16th save is epoch 2's second step.
    whole, _ = assert_resume_equals_uninterrupted(config, tmp_path, save=16, epoch_step=2)
    assert [r["epoch"] for r in whole["remined"]] == [1]
