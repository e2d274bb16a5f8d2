"""Which image input a model reads, and the split source that gives it: every runner (train,
retrain, embed, eval) opens its splits here, so models that read raw images need no special
case anywhere else.

A model class says what it reads (:attr:`stages.models.base.EmbeddingModel.image_input`):
``features`` (the dataset folder's precomputed features) or ``pixels`` (the split's images,
``{split}_images.txt`` under the ``data.images`` root, at the model's ``image_size``,
normalised as its ``pixel_normalisation`` says).
"""

from .config import Config
from .data.dataset import Split, open_split
from .data.images import open_images
from .models import MODELS


def image_input(model_name: str) -> str:
    """``"features"`` or ``"pixels"``: what the registered model ``model_name`` reads."""
    return MODELS.class_of(model_name).image_input


def open_model_split(config: Config, split: str, model: dict, augment: bool = False) -> Split:
    """Open ``split`` of the config's dataset as the model ``model`` (``{"name", "args"}``:
    a checkpoint's model entry, or a run's name and options) reads it. ``augment``: training
    crops (raw images only; seeded by ``train.seed`` and the epoch)."""
    if image_input(model["name"]) == "features":
        return open_split(config.dataset_dir(), split)
    mean, std = MODELS.class_of(model["name"]).pixel_normalisation(model["args"])
    images = open_images(config.dataset_dir(), split, config.data.images,
                         model["args"]["image_size"], augment, config.train.seed, mean, std)
    return open_split(config.dataset_dir(), split, images)
