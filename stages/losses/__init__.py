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
    """The registered loss ``name`` (``LOSSES.names()``) with checked ``options`` (its config
    block's keys, e.g. ``{"margin": 0.2}``; an unknown one is an error naming the losses that
    take it). Call it as ``loss(img_emb (B, E), cap_emb (B, E), image_ids (B,), extra=None,
    offline=None) -> {term name: scalar}`` (:class:`RetrievalLoss`)."""
    return LOSSES.build(name, options or {}, f"loss {name}")
