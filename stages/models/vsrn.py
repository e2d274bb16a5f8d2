"""VSRN (Li et al., ICCV 2019, "Visual Semantic Reasoning for Image-Text Matching"; reference
code KunpengLi1994/VSRN, ``model.py``) on precomputed region features.

Image side, regions (B, R, D):
  1. a linear layer to the joint size E (VSE++'s Xavier initialisation), then L2 norm per
     region (``region_norm``; the reference does this on every dataset but Flickr30K);
  2. region relationship reasoning: ``gcn_layers`` (4) residual graph convolutions
     (:class:`~stages.models.rs_gcn.RsGCN`), then L2 norm per region;
  3. global semantic reasoning: a GRU over the reasoned regions, in their stored order; its
     final state (after each image's last valid region) is the image,
  4. batch-normalised (``img_bn``; the reference does this on Flickr30K only), then L2
     normalised -> (B, E).
  Batch norm, as in the reference, sits in two places: inside each Rs-GCN layer, after its
  W projection and before the residual sum (over channels, statistics over every valid
  region of the batch), and, with ``img_bn``, on the GRU's final state before the L2 norm.
  Padded regions (beyond ``regions[b]``) are masked out of the affinity, the batch-norm
  statistics, the GRU and the caption decoder's attention: they change no embedding.
Text side: word embedding (``word_dim`` 300) + 1-layer GRU to E, final state, L2 normalised
(VSE++'s text encoder).
Caption generation: :class:`~stages.models.caption_decoder.CaptionDecoder` generates the
matching caption from the reasoned regions (after step 2); its loss times
``caption_weight`` (the reference sums it with the retrieval loss: 1) is
``ModelOutput.aux_losses["caption"]``; 0 turns it off (the decoder is then not run).
"""

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from ..errors import UserError
from ..settings import OneOf, Range
from . import MODELS
from .base import EmbeddingModel, ModelOutput
from .caption_decoder import CaptionDecoder
from .rs_gcn import RsGCN, batch_norm_rows, valid_mask
from .vsepp import TextEncoder


class RegionReasoning(nn.Module):
    """Regions (B, R, D), valid counts (B,) -> reasoned regions (B, R, E) (steps 1-2 above)
    and the image embedding of those (B, E) (steps 3-4)."""

    def __init__(self, img_dim: int, embed_size: int, gcn_layers: int, affinity: str,
                 region_norm: bool, img_bn: bool):
        super().__init__()
        self.fc = nn.Linear(img_dim, embed_size)
        bound = (6.0 / (img_dim + embed_size)) ** 0.5  # VSE++'s Xavier init
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)
        self.gcn = nn.ModuleList(RsGCN(embed_size, affinity) for _ in range(gcn_layers))
        self.rnn = nn.GRU(embed_size, embed_size, batch_first=True)
        self.bn = nn.BatchNorm1d(embed_size) if img_bn else None
        self.region_norm = region_norm

    def reason(self, images: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """(B, R, D), mask (B, R) | None -> L2-normalised reasoned regions (B, R, E)."""
        v = self.fc(images)
        if self.region_norm:
            v = F.normalize(v, dim=-1)
        for layer in self.gcn:
            v = layer(v, mask)
        return F.normalize(v, dim=-1)

    def pool(self, reasoned: torch.Tensor, mask: torch.Tensor | None,
             regions: torch.Tensor) -> torch.Tensor:
        """Reasoned regions (B, R, E) -> image embeddings (B, E), L2-normalised."""
        if mask is None:
            _, state = self.rnn(reasoned)
        else:
            _, state = self.rnn(pack_padded_sequence(reasoned, regions.cpu(), batch_first=True,
                                                     enforce_sorted=False))
        emb = state[-1]
        if self.bn is not None:
            emb = batch_norm_rows(self.bn, emb)
        return F.normalize(emb, dim=-1)


@MODELS.register("vsrn")
class VSRN(EmbeddingModel):
    """VSRN (defaults: the published 2048-d joint space, 300-d words, 4 Rs-GCN layers, the
    reference's caption decoder with 512-d states, captions capped at 60 tokens, caption
    loss weight 1; ``region_norm``/``img_bn`` as the reference on COCO: see
    configs/model/vsrn_f30k_precomp.yaml for Flickr30K)."""

    needs_regions = True

    def __init__(self, img_dim: int, vocab_size: int,
                 embed_size: Annotated[int, Range(min=1)] = 2048,
                 word_dim: Annotated[int, Range(min=1)] = 300,
                 gcn_layers: Annotated[int, Range(min=0)] = 4,
                 affinity: Annotated[str, OneOf("dot", "softmax")] = "dot",
                 region_norm: bool = True, img_bn: bool = False,
                 caption_weight: Annotated[float, Range(min=0)] = 1.0,
                 max_len: Annotated[int, Range(min=2)] = 60,
                 caption_hidden: Annotated[int, Range(min=1)] = 512,
                 caption_word_dim: Annotated[int, Range(min=1)] = 300,
                 caption_dropout: Annotated[float, Range(min=0, max=1)] = 0.2):
        super().__init__()
        self.image_encoder = RegionReasoning(img_dim, embed_size, gcn_layers, affinity,
                                             region_norm, img_bn)
        self.text_encoder = TextEncoder(vocab_size, word_dim, embed_size)
        self.caption_weight = caption_weight
        self.decoder = CaptionDecoder(vocab_size, embed_size, caption_hidden, caption_word_dim,
                                      caption_dropout, max_len)

    @staticmethod
    def _mask(images: torch.Tensor, regions: torch.Tensor) -> torch.Tensor | None:
        if images.dim() != 3:
            raise UserError(
                f"model vsrn reasons over region features (images, regions, dim), but these "
                f"are global features of shape {tuple(images.shape)} (one vector per image): "
                "use region features (bottom-up-attention regions: aoq features tsv; a CNN's "
                "grid: aoq features cnn --grid) or a model for global features "
                "(model.name=vsepp)")
        return valid_mask(regions, images.shape[1])

    def encode_images(self, images: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """(B, R, D) regions, (B,) valid counts -> (B, E) embeddings."""
        mask = self._mask(images, regions)
        enc = self.image_encoder
        return enc.pool(enc.reason(images, mask), mask, regions)

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids, (B,) lengths -> (B, E) embeddings."""
        return self.text_encoder(tokens, lengths)

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        """Embeddings of a batch's images and captions, and the weighted caption loss of
        row k's caption generated from row k's regions (``aux_losses["caption"]``)."""
        images, regions = batch["images"], batch["regions"]
        mask = self._mask(images, regions)
        enc = self.image_encoder
        reasoned = enc.reason(images, mask)
        output = ModelOutput(enc.pool(reasoned, mask, regions),
                             self.encode_captions(batch["tokens"], batch["lengths"]))
        if self.caption_weight > 0:
            loss = self.decoder(reasoned, mask, regions, batch["tokens"], batch["lengths"])
            output.aux_losses["caption"] = self.caption_weight * loss
        return output
