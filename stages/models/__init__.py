"""Embedding models, picked by registered name; rebuilt from a checkpoint's ``model`` entry."""

from stages.models import (  # (each module registers its model by name)
    clip,  # noqa: F401
    vse_cnn,  # noqa: F401
    vse_inf,  # noqa: F401
    vse_transformer,  # noqa: F401
    vsepp,  # noqa: F401
    vsrn,  # noqa: F401
)
from stages.models.base import MODELS, EmbeddingModel, ModelOutput  # noqa: F401


def build_model(name: str, options: dict, **data_args) -> EmbeddingModel:
    """The registered model ``name`` with checked ``options`` (its config block) and the
    data-derived constructor arguments (``img_dim``, ``vocab_size``)."""
    return MODELS.build(name, options, f"model {name}", **data_args)
