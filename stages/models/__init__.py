"""Embedding models, picked by registered name; rebuilt from a checkpoint's ``model`` entry."""

from ..registry import Registry

MODELS = Registry("model")

from . import vse_cnn, vse_inf, vsepp, vsrn  # noqa: E402,F401  (each registers its name)
from .base import EmbeddingModel, ModelOutput  # noqa: E402,F401


def build_model(name: str, options: dict, **data_args) -> EmbeddingModel:
    """The registered model ``name`` with checked ``options`` (its config block) and the
    data-derived constructor arguments (``img_dim``, ``vocab_size``)."""
    return MODELS.build(name, options, f"model {name}", **data_args)
