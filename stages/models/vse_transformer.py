"""VSE with a pretrained transformer text tower (as VSE-infinity's BERT variant, whose GPO
pooling is ``text_pooling="gpo"``): image side as VSE++ (precomputed features -> linear,
L2-normalised), text side a Hugging Face encoder (``text_model``: a folder saved with
``save_pretrained``, or a hub name, read from the Hugging Face cache and downloaded only
where the user allows it: :func:`stages.data.tokenizers.downloads_allowed`) pooled and
projected to the joint space (:mod:`.transformer_text`).

Captions are tokenized with the text model's own tokenizer (not our vocabulary), truncated
to ``max_length`` tokens; the checkpoint stores that tokenizer and the model's
configuration, so later stages do not need the folder.
"""

import copy
from pathlib import Path
from typing import Annotated

import torch

from stages.core.errors import UserError
from stages.core.values import OneOf, Range
from stages.data.tokenizers import PretrainedTokenizer
from stages.models.base import MODELS, EmbeddingModel
from stages.models.transformer_text import POOLINGS, TransformerTextEncoder
from stages.models.vsepp import ImageEncoder


def check_text_options(text_config: dict, max_length: int, freeze_layers: int,
                       source: str) -> None:
    """Refuse a ``max_length`` beyond the model's positions, or more layers to freeze than
    it has (before a run folder is made, and again when a model is built)."""
    positions = text_config.get("max_position_embeddings")
    if positions is not None and max_length > positions:
        raise UserError(f"model.max_length={max_length}, but the text model {source} reads "
                        f"at most {positions} tokens; give max_length <= {positions}")
    layers = text_config.get("num_hidden_layers", text_config.get("n_layers"))
    if layers is not None and freeze_layers > layers:
        raise UserError(f"model.text_freeze_layers={freeze_layers}, but the text model "
                        f"{source} has {layers} layers; give 0 to {layers}, or -1 for the "
                        "whole encoder")


@MODELS.register("vse_transformer")
class VSETransformer(EmbeddingModel):
    """Image features -> linear; captions -> pretrained transformer, pooled, projected.

    Options: ``embed_size``; ``text_model`` (folder or hub name); ``text_pooling`` (cls |
    mean | gpo: the first token's output or the mean over the caption's tokens, projected;
    or every token's output projected, then pooled by GPO, as VSE-infinity's BERT encoder);
    ``text_freeze_layers`` (0: train every layer; N: fix the embeddings and the first N
    layers; -1: fix the whole encoder, whose outputs are then cached, in memory and in a
    file under ``data.text_cache_dir``: :meth:`use_cache_folder`); ``text_lr_scale``
    (the encoder's learning rate = ``train.lr`` x this; the projections get ``train.lr``);
    ``max_length`` (tokens kept per caption, special tokens included); ``img_norm``.
    """

    def __init__(self, img_dim: int, text_config: dict,
                 embed_size: Annotated[int, Range(min=1)] = 1024,
                 text_model: str = "bert-base-uncased",
                 text_pooling: Annotated[str, OneOf(*POOLINGS)] = "mean",
                 text_freeze_layers: Annotated[int, Range(min=-1)] = 0,
                 text_lr_scale: Annotated[float, Range(min=0, min_open=True)] = 0.1,
                 max_length: Annotated[int, Range(min=2)] = 64,
                 img_norm: bool = True):
        super().__init__()
        check_text_options(text_config, max_length, text_freeze_layers, text_model)
        self.text_model = text_model
        self.text_lr_scale = text_lr_scale
        self.image_encoder = ImageEncoder(img_dim, embed_size, img_norm)
        self.text_encoder = TransformerTextEncoder(text_config, embed_size, text_pooling,
                                                   text_freeze_layers, text_model)

    @classmethod
    def caption_tokenizer(cls, options: dict) -> PretrainedTokenizer:
        """The text model's tokenizer (and configuration), truncating to ``max_length``."""
        tokenizer = PretrainedTokenizer.from_pretrained(options["text_model"],
                                                        options["max_length"])
        check_text_options(tokenizer.text_config, options["max_length"],
                           options["text_freeze_layers"], options["text_model"])
        return tokenizer

    def load_pretrained(self) -> None:
        """The text encoder's weights from ``text_model``."""
        self.text_encoder.load_pretrained(self.text_model)

    def use_cache_folder(self, folder: Path | None) -> None:
        """A whole frozen text encoder's outputs in a file under ``folder`` as well."""
        self.text_encoder.use_cache_folder(folder)

    def save_cache(self) -> None:
        self.text_encoder.save_cache()

    def encode_images(self, images: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """(B, R, D) | (B, D) features, (B,) valid regions -> (B, E) embeddings."""
        return self.image_encoder(images, regions)

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids, (B,) lengths -> (B, E) embeddings."""
        return self.text_encoder(tokens, lengths)

    def export_encoders(self, global_features: bool = False):
        """The base's modules (:meth:`EmbeddingModel.export_encoders`) on a copy whose text
        encoder computes attention eagerly: Hugging Face's SDPA wrapper branches on the
        caption length, which tracing would bake in; eager attention has no branch."""
        exported = copy.deepcopy(self)
        exported.text_encoder.encoder.set_attn_implementation("eager")
        return EmbeddingModel.export_encoders(exported, global_features)

    def param_groups(self) -> list[dict]:
        """The encoder's trainable weights at ``text_lr_scale``, everything else at 1."""
        encoder = [p for p in self.text_encoder.encoder.parameters() if p.requires_grad]
        in_encoder = {id(p) for p in encoder}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in in_encoder]
        groups = [{"params": rest, "lr_scale": 1.0}]
        if encoder:
            groups.append({"params": encoder, "lr_scale": self.text_lr_scale})
        return groups
