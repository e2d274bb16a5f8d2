"""Which image input a model reads, and the split source that gives it: every runner (train,
retrain, embed, eval) opens its splits here, so models that read raw images need no special
case anywhere else.

A model class says what it reads (:attr:`stages.models.base.EmbeddingModel.image_input`):
``features`` (the dataset folder's precomputed features) or ``pixels`` (the split's images,
``{split}_images.txt`` under the ``data.images`` root, made as the model class's
``image_preprocessing`` says). :func:`image_input` (from :mod:`stages.config.options`,
where it needs no torch: make asks it through ``aoq model-input``) says which.
"""

from stages.config.options import image_input
from stages.config.sections import Config
from stages.data.dataset import Split, open_split
from stages.data.images import open_images
from stages.models import MODELS

__all__ = ["image_input", "open_model_split"]


def open_model_split(config: Config, split: str, model: dict, augment: bool = False) -> Split:
    """Open ``split`` of the config's dataset as the model ``model`` (``{"name", "args"}``:
    a checkpoint's model entry, or a run's name and options) reads it. ``augment``: training
    crops (raw images only; seeded by ``train.seed`` and the epoch)."""
    if image_input(model["name"]) == "features":
        return open_split(config.dataset_dir(), split)
    preprocessing = MODELS.class_of(model["name"]).image_preprocessing(model["args"])
    images = open_images(config.dataset_dir(), split, config.data.images, preprocessing,
                         augment, config.train.seed)
    return open_split(config.dataset_dir(), split, images)
