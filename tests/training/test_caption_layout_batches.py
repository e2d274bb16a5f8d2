"""Tasks and grouped batches map captions to images by the split's caption layout."""

from types import SimpleNamespace

import numpy as np
import torch

from stages.core.layout import CaptionLayout
from stages.data.dataset import open_split
from stages.data.vocab import Vocab
from stages.models.base import ModelOutput
from stages.training.batches import epoch_batches, grouped_epoch_batches
from stages.training.tasks import OfflineTask
from tests.conftest import write_precomp
from tests.training.test_grouped_batches import random_neighbours

COUNTS = [1, 3, 5, 2, 7, 1, 4, 6, 2, 2, 1, 3]


def naive_owner(counts):
    """The image of each caption, one caption at a time."""
    owner = []
    for image, n in enumerate(counts):
        owner += [image] * n
    return owner


def variable_neighbours(counts, width, seed=0):
    """Each image's (W,) candidate captions of other images, and how many are eligible."""
    rng = np.random.default_rng(seed)
    owner = np.array(naive_owner(counts))
    neighbours = np.stack([rng.choice(np.flatnonzero(owner != i), width, replace=False)
                           for i in range(len(counts))])
    return neighbours, rng.integers(0, width + 1, len(counts))


def test_grouped_batches_group_captions_of_distinct_images_by_the_layout():
    counts = COUNTS * 3
    owner = naive_owner(counts)
    num_captions = len(owner)
    neighbours, eligible = variable_neighbours(counts, 10)
    group = 3
    layout = CaptionLayout.from_counts(counts)
    batches = grouped_epoch_batches(neighbours, eligible, group, 8, seed=5, epoch=2,
                                    layout=layout)
    order = [c for b in batches for c in b]
    assert sorted(order) == list(range(num_captions))  # every caption, once
    assert [len(b) for b in batches] == [len(b) for b in epoch_batches(num_captions, 8, 5, 2)]
    permutation = np.random.default_rng([5, 2]).permutation(num_captions).tolist()
    placed, k, grouped = set(), 0, 0
    while k < len(order):
        anchor = next(c for c in permutation if c not in placed)
        assert order[k] == anchor
        placed.add(anchor)
        images = {owner[anchor]}
        allowed = set(neighbours[owner[anchor], :eligible[owner[anchor]]].tolist())
        k += 1
        # The group's other captions: eligible neighbours of the anchor's image, of images
        # the group does not hold yet, up to the group size; then the next anchor.
        while (k < len(order) and len(images) < group and order[k] in allowed
               and order[k] not in placed and owner[order[k]] not in images):
            images.add(owner[order[k]])
            placed.add(order[k])
            k += 1
            grouped += 1
    assert grouped > len(counts)


def test_five_per_image_given_as_a_layout_gives_the_same_batches():
    neighbours, counts = random_neighbours(30, 12)
    assert (grouped_epoch_batches(neighbours, counts, 4, 16, 3, 1,
                                  layout=CaptionLayout.uniform(30, 5))
            == grouped_epoch_batches(neighbours, counts, 4, 16, 3, 1))


def test_offline_negatives_get_the_images_owning_their_captions(tmp_path):
    captions = [f"image {i} caption {j}" for i, n in enumerate(COUNTS) for j in range(n)]
    write_precomp(tmp_path, "train", np.zeros((len(COUNTS), 4), np.float32)
                  + np.arange(len(COUNTS), dtype=np.float32)[:, None], captions)
    (tmp_path / "train_ids.txt").write_text("".join(f"{i}\n" * n for i, n in enumerate(COUNTS)))
    split = open_split(tmp_path, "train")
    # loss_inputs reads the batch alone: the sampler stands in for its layout only
    task = OfflineTask(split, Vocab.build(captions, threshold=1),
                       sampler=SimpleNamespace(layout=split.layout))
    b = 4
    caption_ids = torch.tensor([0, 5, 11, 28, 3, 9, 1, 33, 34, 17, 6, 2])
    batch = {"image_ids": torch.arange(3 * b), "caption_ids": caption_ids}
    output = ModelOutput(torch.randn(3 * b, 8), torch.randn(3 * b, 8))
    inputs = task.loss_inputs(output, batch)
    owner = naive_owner(COUNTS)
    assert inputs.offline.caption_ids.tolist() == [owner[c] for c in caption_ids[b:2 * b]]
    assert inputs.offline.caption2_ids.tolist() == [owner[c] for c in caption_ids[2 * b:]]
    assert inputs.image_ids.tolist() == list(range(b))
