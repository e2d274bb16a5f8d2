"""CLIP-style models (Radford et al. 2021; OpenCLIP; TinyCLIP): both towers of an open_clip
model, fine-tuned into the joint space, embeddings L2-normalised.

Image side: raw images (B, 3, S, S), preprocessed as the architecture says (its image size,
CLIP's mean/std, bicubic resize to S then center crop: :meth:`CLIPModel.image_preprocessing`)
-> ``encode_image`` -> (B, E). Text side: CLIP's BPE tokens
(:class:`~stages.data.clip_tokenizer.ClipTokenizer`, at most the tower's context length of
77) padded to that length -> ``encode_text`` (pooled at the end token) -> (B, E). E is the
architecture's ``embed_dim``.

``model.arch``: an open_clip architecture name or model-config JSON file (see
:mod:`stages.data.clip_tokenizer` for which work offline); its config is a constructor
argument (``clip_config``) stored in the checkpoint. ``model.weights``: an open_clip
checkpoint file (``.bin``/``.pt``/``.safetensors``, as open_clip's hub repositories hold
them), ``random`` for tests; a pretrained tag cannot be downloaded here and is an error.

Freezing: ``image_freeze_blocks`` = N keeps the image tower's stem (patch/conv embedding,
class and positional embeddings, pre-norm; ModifiedResNet's three-conv stem) and its first N
blocks (ViT: ``visual.transformer.resblocks``; ModifiedResNet: ``layer1..layer4``) fixed,
batch norm of frozen parts in eval mode; ``text_freeze_blocks`` likewise the token and
positional embeddings and the first N blocks of the text transformer. Frozen parameters get
no gradients and are left out of the optimiser.

The model's learnable ``logit_scale`` (log 1/T) is InfoNCE's temperature when the loss has
a learnable one (``loss.learnable_temperature=true``): :meth:`CLIPModel.bind_loss` hands
the loss this parameter, so one value is optimised and checkpointed; with any other loss it
is unused (frozen, and logged as such).
"""

import inspect
import logging
import math
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from stages.core.errors import UserError
from stages.core.values import Range
from stages.data.clip_tokenizer import ClipTokenizer, arch_config
from stages.data.images import ImagePreprocessing
from stages.models.base import MODELS, EmbeddingModel

log = logging.getLogger(__name__)


def build_open_clip(config: dict) -> nn.Module:
    """An open_clip model (``CLIP``, or ``CustomTextCLIP`` for configs with ``custom_text``)
    with random weights, from its model config (``embed_dim``, ``vision_cfg``, ...)."""
    from open_clip.model import CLIP, CustomTextCLIP

    config = {k: v for k, v in config.items()}
    config["vision_cfg"] = dict(config["vision_cfg"])
    if "timm_model_name" in config["vision_cfg"]:
        config["vision_cfg"]["timm_model_pretrained"] = False  # nothing downloaded
    custom_text = config.pop("custom_text", False)
    return (CustomTextCLIP if custom_text else CLIP)(**config)


def _tower_parts(clip: nn.Module) -> dict[str, tuple[list[str], list[str]] | None]:
    """Per tower (``image``, ``text``): (its stem's parameter prefixes, each block's prefix),
    names relative to the open_clip model; None for a tower whose blocks are not known
    (timm image towers)."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    visual = clip.visual
    if isinstance(visual, VisionTransformer):
        image = (["visual.conv1", "visual.class_embedding", "visual.positional_embedding",
                  "visual.ln_pre"],
                 [f"visual.transformer.resblocks.{i}"
                  for i in range(len(visual.transformer.resblocks))])
    elif isinstance(visual, ModifiedResNet):
        image = ([f"visual.{m}{i}" for m in ("conv", "bn") for i in (1, 2, 3)],
                 [f"visual.layer{i}" for i in range(1, 5)])
    else:
        image = None
    text_root = "text." if hasattr(clip, "text") else ""
    text_tower = clip.text if text_root else clip
    text = ([f"{text_root}token_embedding", f"{text_root}positional_embedding",
             f"{text_root}cls_emb"],
            [f"{text_root}transformer.resblocks.{i}"
             for i in range(len(text_tower.transformer.resblocks))])
    return {"image": image, "text": text}


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@MODELS.register("clip")
class CLIPModel(EmbeddingModel):
    """Both towers of an open_clip model. Options: ``arch`` (an open_clip architecture name
    or model-config JSON file), ``weights`` (an open_clip checkpoint file; ``random``:
    tests), ``image_freeze_blocks`` / ``text_freeze_blocks`` (each tower's embeddings and
    first N blocks stay fixed), ``image_lr_scale`` / ``text_lr_scale`` (each tower's
    learning rate = ``train.lr`` x this; ``logit_scale`` trains at ``train.lr``)."""

    image_input = "pixels"

    def __init__(self, img_dim: int, clip_config: dict,
                 arch: str = "ViT-B-32",
                 weights: str = "",
                 image_freeze_blocks: Annotated[int, Range(min=0)] = 0,
                 text_freeze_blocks: Annotated[int, Range(min=0)] = 0,
                 image_lr_scale: Annotated[float, Range(min=0, min_open=True)] = 1.0,
                 text_lr_scale: Annotated[float, Range(min=0, min_open=True)] = 1.0):
        super().__init__()
        if img_dim != 3:
            raise UserError(f"clip reads raw images (3 channels), not {img_dim}-d features; "
                            "train it on a split's images (data.images)")
        if not weights:
            raise UserError("model.weights is empty: give the path of an open_clip checkpoint "
                            f"file for {arch} (or random, for tests)")
        self.arch = arch
        self.weights = weights
        self.image_lr_scale = image_lr_scale
        self.text_lr_scale = text_lr_scale
        self.clip = build_open_clip(clip_config)
        self.context_length = int(clip_config["text_cfg"].get("context_length", 77))
        self.frozen: list[str] = []  # parameter prefixes (relative to self.clip) kept fixed
        parts = _tower_parts(self.clip)
        for tower, count in (("image", image_freeze_blocks), ("text", text_freeze_blocks)):
            if not count:
                continue
            if parts[tower] is None:
                raise UserError(f"model.{tower}_freeze_blocks={count}: the image tower of "
                                f"{arch} ({type(self.clip.visual).__name__}) has no blocks "
                                "known here; give 0 (freezing covers ViT and ModifiedResNet "
                                "towers)")
            stem, blocks = parts[tower]
            if count > len(blocks):
                raise UserError(f"model.{tower}_freeze_blocks={count}, but the {tower} tower "
                                f"of {arch} has {len(blocks)} blocks; give 0 to {len(blocks)}")
            self.frozen += stem + blocks[:count]
        for name, param in self.clip.named_parameters():
            if _under(name, self.frozen):
                param.requires_grad_(False)

    @classmethod
    def caption_tokenizer(cls, options: dict) -> ClipTokenizer:
        """open_clip's tokenizer for ``arch``; its ``model_args`` give ``clip_config``."""
        return ClipTokenizer.for_arch(options["arch"])

    @classmethod
    def image_preprocessing(cls, args: dict) -> ImagePreprocessing:
        """open_clip's defaults (OpenAI's mean/std, bicubic, shorter side resized to S)
        with the architecture's image size S (``clip_config``, or resolved from ``arch``
        for a run's options)."""
        from open_clip.transform import PreprocessCfg

        config = args.get("clip_config") or arch_config(args["arch"])
        size = config["vision_cfg"].get("image_size", 224)
        if not isinstance(size, int):
            if len(set(size)) != 1:
                raise UserError(f"model.arch={args['arch']}: non-square images {size} are "
                                "not supported")
            size = size[0]
        pre = PreprocessCfg()
        return ImagePreprocessing(size, tuple(pre.mean), tuple(pre.std), resize=size,
                                  interpolation=pre.interpolation)

    def load_pretrained(self) -> None:
        """The open_clip checkpoint ``weights`` (nothing for ``random``)."""
        if self.weights == "random":
            log.warning("clip: %s with random weights: for tests only", self.arch)
            return
        path = Path(self.weights).expanduser()
        if not path.is_file():
            raise UserError(
                f"model.weights={self.weights}: no such file. Pretrained tags and hub names "
                "cannot be downloaded here: on a machine with network download the "
                f"checkpoint (e.g. python -c \"import open_clip; open_clip.create_model("
                f"'{self.arch}', pretrained='{self.weights}')\" caches it under "
                "~/.cache/huggingface; or the open_clip_pytorch_model.bin/.safetensors file "
                "of its hub repository), copy it here and set model.weights=PATH")
        import open_clip

        try:
            open_clip.load_checkpoint(self.clip, str(path))
        except Exception as exc:  # noqa: BLE001  (torch/safetensors raise many kinds)
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            raise UserError(f"model.weights={path}: cannot be loaded into {self.arch} "
                            f"({first}); give a checkpoint of that architecture") from exc
        log.info("clip: %s weights from %s (logit_scale %.3f: T = %.4f)", self.arch, path,
                 float(self.clip.logit_scale.detach().reshape(-1)[0]), self._temperature())

    def _temperature(self) -> float:
        return math.exp(-float(self.clip.logit_scale.detach().reshape(-1)[0]))

    def bind_loss(self, loss: nn.Module) -> str:
        """A loss with a learnable temperature (infonce, focal_infonce with
        ``learnable_temperature``) uses ``logit_scale`` as it; otherwise it is unused and
        frozen. An explicit, different ``loss.temperature`` with a learnable one is refused:
        the start is the weights' logit_scale. Returns the line the run's log gets."""
        name = type(loss).__name__
        if getattr(loss, "learnable_temperature", False) and hasattr(loss, "share_logit_scale"):
            default = inspect.signature(type(loss)).parameters["temperature"].default
            if not math.isclose(loss.temperature, default):
                raise UserError(f"loss.temperature={loss.temperature} is not used by clip with "
                                "loss.learnable_temperature=true: the temperature is the "
                                "model's logit_scale, from model.weights; drop "
                                "loss.temperature, or set loss.learnable_temperature=false "
                                "for a fixed one")
            loss.share_logit_scale(self.clip.logit_scale)
            return (f"clip: {name}'s learnable temperature is the model's logit_scale "
                    f"(T = {self._temperature():.4f} now)")
        self.clip.logit_scale.requires_grad_(False)
        return (f"clip: the model's logit_scale (T = {self._temperature():.4f}) is unused: "
                f"{name} has no learnable temperature (loss.name=infonce with "
                "loss.learnable_temperature=true trains it)")

    def train(self, mode: bool = True) -> "CLIPModel":
        """Training mode, but batch norm (and dropout) of frozen parts stays in eval mode."""
        super().train(mode)
        if mode and self.frozen:
            for name, module in self.clip.named_modules():
                if _under(name, self.frozen):
                    module.eval()
        return self

    def encode_images(self, images: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images, (B,) ignored -> (B, E) unit embeddings."""
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids (L <= the context length, padded with 0), (B,) lengths ->
        (B, E) unit embeddings."""
        padded = F.pad(tokens, (0, self.context_length - tokens.shape[1]), value=0)
        return F.normalize(self.clip.encode_text(padded), dim=-1)

    def param_groups(self) -> list[dict]:
        """The image tower's trainable weights at ``image_lr_scale``, the text tower's at
        ``text_lr_scale``, ``logit_scale`` (when a loss uses it) at 1."""
        groups = {"image": [], "text": [], "rest": []}
        for name, param in self.clip.named_parameters():
            if param.requires_grad:
                kind = ("rest" if name in ("logit_scale", "logit_bias")
                        else "image" if name.startswith("visual.") else "text")
                groups[kind].append(param)
        scales = {"image": self.image_lr_scale, "text": self.text_lr_scale, "rest": 1.0}
        return [{"params": params, "lr_scale": scales[kind]}
                for kind, params in groups.items() if params]
