"""The batch order of an epoch: a pure function of (seed, epoch), so a resumed run sees
exactly the batches an uninterrupted one would, and every rank agrees on it."""

import numpy as np


def epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled item order of an epoch, (num_items,) int64."""
    return np.random.default_rng([seed, epoch]).permutation(num_items)


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1, drop_last: bool = False) -> list[list[int]]:
    """This rank's batches of an epoch: the epoch's order cut into global batches of
    ``batch_size * world_size`` items (the last may be smaller; with ``drop_last`` it is left
    out, as VSE-infinity's training loader does), rank r taking items ``r, r + world_size,
    ...`` of each. With one process: consecutive ``batch_size`` slices.
    """
    order = epoch_permutation(num_items, seed, epoch).tolist()
    step = batch_size * world_size
    end = len(order) - len(order) % step if drop_last else len(order)
    batches = [order[i:i + step][rank::world_size] for i in range(0, end, step)]
    return [b for b in batches if b]
