"""torchvision CNNs cut into ordered stages, for image towers trained from raw images.

Each backbone is the classifier up to the global feature ``aoq features cnn`` takes (same
cut, same weights rules: :func:`stages.models.cnn.torchvision_model`):

* ``resnet152`` / ``resnet101`` / ``resnet50`` / ``resnet18``: stem (conv1, bn1, relu,
  maxpool), layer1 .. layer4, then the average pool: 5 stages, (B, 2048) (512 for 18);
* ``vgg19``: its 5 conv blocks (each ending with its max pool), fc6 (with ReLU and dropout),
  fc7 (with ReLU), VSE++'s image feature: 7 stages, (B, 4096);
* ``mobilenet_v3_large``: its 17 feature blocks, then pool + the 1280-d layer with its
  Hardswish: 18 stages, (B, 1280);
* ``efficientnet_lite0`` (timm, :mod:`stages.models.efficientnet_lite`): stem, 7 block
  stages, then the 1280-d head conv with its ReLU6 and the average pool: 9 stages,
  (B, 1280). Its ImageNet weights expect mean/std 0.5
  (:func:`stages.models.cnn.normalisation`).

Freezing is by stages from the input side: ``frozen`` stages get ``requires_grad=False`` and
stay in eval mode under ``train()`` (batch norm keeps its running statistics, dropout is
off), so a frozen stage computes the same in training as in evaluation; the stages after
them train normally, their batch norm included.
"""

import torch
from torch import nn

from stages.core.errors import UserError
from stages.models import efficientnet_lite
from stages.models.cnn import BACKBONES, torchvision_model

ARCHS = ("vgg19", "resnet152", "mobilenet_v3_large", "resnet101", "resnet50", "resnet18",
         efficientnet_lite.ARCH)


def _resnet(m: nn.Module) -> list[nn.Module]:
    return [nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool), m.layer1, m.layer2, m.layer3,
            m.layer4, nn.Sequential(m.avgpool, nn.Flatten())]


def _vgg(m: nn.Module) -> list[nn.Module]:
    blocks, block = [], []
    for layer in m.features.children():
        block.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append(nn.Sequential(*block))
            block = []
    fc = list(m.classifier.children())
    return [*blocks, nn.Sequential(m.avgpool, nn.Flatten(), *fc[:3]), nn.Sequential(*fc[3:5])]


def _mobilenet(m: nn.Module) -> list[nn.Module]:
    fc = list(m.classifier.children())
    return [*m.features.children(), nn.Sequential(m.avgpool, nn.Flatten(), *fc[:2])]


CUTS = {"vgg19": _vgg, "mobilenet_v3_large": _mobilenet,
        **{name: _resnet for name in ("resnet152", "resnet101", "resnet50", "resnet18")}}


def cut_stages(arch: str, model: nn.Module) -> nn.Sequential:
    """The stages of torchvision's ``arch`` classifier ``model``, as one Sequential."""
    return nn.Sequential(*CUTS[arch](model))


class Backbone(nn.Module):
    """Normalised images (B, 3, S, S) -> global features (B, ``feature_dim``).

    ``frozen``: how many of the stages with parameters are frozen, from the input side
    (None: all of them, a fixed feature extractor).
    """

    def __init__(self, arch: str, frozen: int | None = None):
        super().__init__()
        import torchvision

        if arch == efficientnet_lite.ARCH:
            self.stages = nn.Sequential(*efficientnet_lite.cut(efficientnet_lite.timm_model()))
        elif arch in CUTS:
            self.stages = cut_stages(arch, torchvision.models.get_model(arch, weights=None))
        else:
            raise UserError(f"unknown backbone {arch!r}; known: {', '.join(ARCHS)}")
        self.arch = arch
        self.feature_dim = BACKBONES[arch].feature_dim
        with_params = [i for i, s in enumerate(self.stages)
                       if any(True for _ in s.parameters())]
        self.num_stages = len(with_params)
        frozen = self.num_stages if frozen is None else frozen
        if not 0 <= frozen <= self.num_stages:
            raise UserError(f"{arch} has {self.num_stages} stages; cannot freeze {frozen}")
        self.frozen = frozen
        # The stages before the first trainable one (all of them when all are frozen).
        self.frozen_prefix = (len(self.stages) if frozen == self.num_stages
                              else with_params[frozen])
        self.stages[:self.frozen_prefix].requires_grad_(False)
        self.train()

    def load_weights(self, weights: str) -> None:
        """Load ``weights`` (a state-dict file of torchvision's classifier, or ``imagenet``
        from torchvision's cache; efficientnet_lite0's:
        :func:`stages.models.efficientnet_lite.load_weights`) with the rules and errors of
        ``aoq features cnn``."""
        classifier = torchvision_model(self.arch, weights, option="model.weights=")
        source = (nn.Sequential(*efficientnet_lite.cut(classifier))
                  if self.arch == efficientnet_lite.ARCH else cut_stages(self.arch, classifier))
        self.stages.load_state_dict(source.state_dict())

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode and self.frozen < self.num_stages)
        self.stages[:self.frozen_prefix].eval()  # frozen batch norm keeps its statistics
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(images)
