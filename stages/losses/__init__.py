"""Training losses, one per module, picked by registered name (``loss.name`` in configs)."""

from ..registry import Registry

LOSSES = Registry("loss")

from . import aoq, vse_hinge  # noqa: E402,F401  (register aoq, offquin, offtri, vse_*)
from .base import OfflineNegatives, References, RetrievalLoss  # noqa: E402,F401


def build_loss(name: str, options: dict | None = None) -> RetrievalLoss:
    """The registered loss ``name`` with checked ``options`` (its config block's keys)."""
    return LOSSES.build(name, options or {}, f"loss {name}")
