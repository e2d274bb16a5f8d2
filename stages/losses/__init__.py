"""Training losses, one per module, picked by registered name (``loss.name`` in configs)."""

import dataclasses

from ..registry import Registry

LOSSES = Registry("loss")

from . import aoq, vse_hinge  # noqa: E402,F401  (register aoq, offquin, offtri, vse_*)
from .base import RetrievalLoss  # noqa: E402


def build_loss(loss_config) -> RetrievalLoss:
    """The loss named ``loss_config.name``, given the config fields its constructor takes."""
    return LOSSES.build(loss_config.name, dataclasses.asdict(loss_config))
