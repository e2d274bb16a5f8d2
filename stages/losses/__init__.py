"""Training losses, one per module, picked by registered name (``loss.name`` in configs)."""

from ..registry import Registry

LOSSES = Registry("loss")

from . import (  # noqa: E402,F401  (each module registers its losses by name)
    aoq,
    contrastive,
    focal_infonce,
    focal_triplet,
    focal_triplet_mlp,
    infonce,
    triplet_random,
    triplet_semihard,
    triplet_topk,
    vse_hinge,
)
from .base import OfflineNegatives, References, RetrievalLoss  # noqa: E402,F401


def build_loss(name: str, options: dict | None = None) -> RetrievalLoss:
    """The registered loss ``name`` with checked ``options`` (its config block's keys)."""
    return LOSSES.build(name, options or {}, f"loss {name}")
