"""Counter-based pseudo-random draws: a pure function of (seed, epoch, item), so a draw does
not depend on the order items are visited in, and a resumed run draws what an
uninterrupted one would (offline negatives' ranks, training crops)."""

import numpy as np


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays: a cheap, well-mixed counter-based hash."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_hash(seed: int, epoch: int, items: np.ndarray) -> np.ndarray:
    """(B,) uint64 pseudo-random words, a pure function of (seed, epoch, item)."""
    with np.errstate(over="ignore"):
        key = splitmix64(np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(epoch))
        return splitmix64(key + np.asarray(items, dtype=np.uint64))
