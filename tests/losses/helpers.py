"""Helpers for the loss tests."""

import torch

from stages.losses.base import OfflineNegatives


def total(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss: the sum of a loss's named terms."""
    return sum(terms.values())


def offline_negatives(off: dict[str, torch.Tensor], first_id: int = 1000) -> OfflineNegatives:
    """OfflineNegatives from a dict of (B, E) ``captions``, ``images``, ``captions2``,
    ``images2``, each showing an image no anchor shows (ids from ``first_id`` on)."""
    size = off["captions"].shape[0]
    ids = [torch.arange(size) + first_id + g * size for g in range(4)]
    return OfflineNegatives(off["captions"], off["images"], off["captions2"], off["images2"],
                            *ids)
