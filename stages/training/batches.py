"""The batch order of an epoch: a pure function of (seed, epoch), so a resumed run sees
exactly the batches an uninterrupted one would, and every rank agrees on it."""

import numpy as np

from stages.core.layout import CaptionLayout


def epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled item order of an epoch, (num_items,) int64."""
    return np.random.default_rng([seed, epoch]).permutation(num_items)


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1, drop_last: bool = False) -> list[list[int]]:
    """This rank's batches of an epoch: the epoch's order cut into global batches of
    ``batch_size * world_size`` items (the last may be smaller; with ``drop_last`` it is left
    out, as VSE-infinity's training loader does), rank r taking items ``r, r + world_size,
    ...`` of each. With one process: consecutive ``batch_size`` slices. With several, a last
    global batch of fewer items than processes is left out (a rank would have none, and
    every rank takes the same number of steps).
    """
    return _cut(epoch_permutation(num_items, seed, epoch).tolist(), batch_size, rank,
                world_size, drop_last)


def _cut(order: list[int], batch_size: int, rank: int, world_size: int,
         drop_last: bool) -> list[list[int]]:
    """Rank ``rank``'s share of ``order`` cut into global batches (see
    :func:`epoch_batches`)."""
    step = batch_size * world_size
    end = len(order) - len(order) % step if drop_last else len(order)
    if world_size > 1 and 0 < end % step < world_size:
        end -= end % step
    batches = [order[i:i + step][rank::world_size] for i in range(0, end, step)]
    return [b for b in batches if b]


def grouped_epoch_batches(neighbours: np.ndarray, counts: np.ndarray, group_size: int,
                          batch_size: int, seed: int, epoch: int, rank: int = 0,
                          world_size: int = 1, drop_last: bool = False,
                          layout: CaptionLayout | None = None) -> list[list[int]]:
    """This rank's batches of an epoch made of groups of mutually hard captions.

    ``neighbours`` (N, W) int: for each image, caption ids it may be grouped with, hardest
    first (its offline i2t candidates that the filters keep, padded past ``counts`` (N,)).
    ``layout``: which image owns each caption (None: 5 per image, as before layouts).
    Captions are visited in the epoch's order (:func:`epoch_permutation`); the first one
    not yet placed starts a group, which takes up to ``group_size`` − 1 more captions among
    its image's first W neighbours, in an order drawn afresh each epoch, each neither placed
    already nor of an image the group holds. The groups, in order, are cut into global
    batches as :func:`epoch_batches` cuts items (``drop_last`` too), so every caption is
    placed once per epoch, the number of steps is that of random batches, and the order is
    a pure function of (seed, epoch, neighbours): a resumed run sees the same batches.

    Topic-aware batches (Hofstätter et al., "Efficiently Teaching an Effective Dense
    Retriever with Balanced Topic Aware Sampling", SIGIR 2021), with the mined neighbours
    in place of query clusters: the in-batch negatives of every caption include captions
    its image's miner found hard.
    """
    if layout is None:
        layout = CaptionLayout.uniform(neighbours.shape[0])
    owner = layout.owner
    num_items = layout.num_captions
    rng = np.random.default_rng([seed, epoch, 1])
    # Each image's neighbours in a random order of the epoch (its padding last).
    width = neighbours.shape[1]
    keys = rng.random(neighbours.shape)
    keys[np.arange(width)[None, :] >= counts[:, None]] = np.inf
    shuffled = np.take_along_axis(neighbours, np.argsort(keys, axis=1), axis=1)
    placed = np.zeros(num_items, dtype=bool)
    order: list[int] = []
    permutation = epoch_permutation(num_items, seed, epoch)
    for anchor, image in zip(permutation.tolist(), owner[permutation].tolist(), strict=True):
        if placed[anchor]:
            continue
        placed[anchor] = True
        order.append(anchor)
        images = {image}
        row = shuffled[image, :min(int(counts[image]), width)]
        for caption, its_image in zip(row.tolist(), owner[row].tolist(), strict=True):
            if len(images) == group_size:
                break
            if placed[caption] or its_image in images:
                continue
            placed[caption] = True
            images.add(its_image)
            order.append(caption)
    return _cut(order, batch_size, rank, world_size, drop_last)
