"""Embedding models, picked by registered name; rebuilt from a checkpoint's ``model`` entry."""

from ..registry import Registry

MODELS = Registry("model")

from . import vsepp  # noqa: E402,F401  (registers "vsepp")


def build_model(name: str, **args):
    """Instantiate the registered model ``name`` with keyword ``args``."""
    return MODELS.get(name)(**args)
