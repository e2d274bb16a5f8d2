"""Training losses, one per module, picked by registered name (``loss.name`` in configs)."""

from stages.losses import (  # noqa: F401  (each module registers its losses by name)
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
from stages.losses.base import LOSSES, OfflineNegatives, References, RetrievalLoss  # noqa: F401


def build_loss(name: str, options: dict | None = None) -> RetrievalLoss:
    """The registered loss ``name`` with checked ``options`` (its config block's keys)."""
    return LOSSES.build(name, options or {}, f"loss {name}")
