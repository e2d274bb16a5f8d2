"""VSRN (Li et al., ICCV 2019, "Visual Semantic Reasoning for Image-Text Matching"; reference
code KunpengLi1994/VSRN, ``model.py``) on precomputed region features.

Image side, regions (B, R, D):
  1. a linear layer to the joint size E (VSE++'s Xavier initialisation), then an L2 norm
     (``region_norm``; the reference does this on every dataset but Flickr30K);
  2. region relationship reasoning: ``gcn_layers`` (4) residual graph convolutions
     (:class:`~stages.models.rs_gcn.RsGCN`), then an L2 norm;
  3. global semantic reasoning: a GRU over the reasoned regions, in their stored order; its
     final state (after each image's last valid region) is the image,
  4. batch-normalised (``img_bn``; the reference does this on Flickr30K only), then L2
     normalised -> (B, E).
  The L2 norms of steps 1 and 2 are the reference's ``l2norm(x)``, which sums over dim 1 of
  the (B, 36, E) regions: ``norm_axis="regions"`` (the default) normalises each channel
  across the image's (valid) regions, as the reference does and as its published numbers
  were made; ``"features"`` normalises each region over its E channels (what the author
  calls more reasonable in VSRN issue #7, without changing the code).
  Batch norm, as in the reference, sits in two places: inside each Rs-GCN layer, after its
  W projection and before the residual sum (over channels, statistics over every valid
  region of the batch), and, with ``img_bn``, on the GRU's final state before the L2 norm.
  Padded regions (beyond ``regions[b]``) are masked out of the affinity, the batch-norm
  statistics, the L2 norms, the GRU and the caption decoder's attention: they change no
  embedding.
Text side: word embedding (``word_dim`` 300) + 1-layer GRU to E, final state, L2 normalised
(VSE++'s text encoder).
Caption generation: :class:`~stages.models.caption_decoder.CaptionDecoder` generates the
matching caption from the reasoned regions (after step 2); its loss times
``caption_weight`` (the reference sums it with the retrieval loss: 1) is
``ModelOutput.aux_losses["caption"]``; 0 turns it off (the decoder is then not run).
``caption_double_step`` reproduces a quirk of the reference's optimiser, which lists the
caption encoder's and decoder's parameters twice: they get two Adam updates per step (about
twice the step) and count twice in the gradient clip (see
:mod:`stages.training.repeated_updates`).
"""

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from stages.core.errors import UserError
from stages.core.values import OneOf, Range
from stages.models.base import MODELS, EmbeddingModel, ModelOutput
from stages.models.caption_decoder import CaptionDecoder
from stages.models.rnn import run_gru
from stages.models.rs_gcn import RsGCN, batch_norm_rows, valid_mask
from stages.models.vsepp import TextEncoder

NORM_AXES = ("regions", "features")


def l2_normalise(v: torch.Tensor, mask: torch.Tensor | None, axis: str) -> torch.Tensor:
    """L2 norm of regions (B, R, E) -> (B, R, E): ``axis="regions"``: each channel across the
    image's valid regions (the reference's ``l2norm`` on (B, 36, E), dim 1; padded regions
    come out as zeros); ``"features"``: each region over its E channels."""
    if axis == "features":
        return F.normalize(v, dim=-1)
    if mask is not None:
        v = v.masked_fill(~mask[..., None], 0.0)
    return F.normalize(v, dim=1)


class RegionReasoning(nn.Module):
    """Regions (B, R, D), valid counts (B,) -> reasoned regions (B, R, E) (steps 1-2 above)
    and the image embedding of those (B, E) (steps 3-4)."""

    def __init__(self, img_dim: int, embed_size: int, gcn_layers: int, affinity: str,
                 region_norm: bool, img_bn: bool, norm_axis: str = "regions"):
        super().__init__()
        self.fc = nn.Linear(img_dim, embed_size)
        bound = (6.0 / (img_dim + embed_size)) ** 0.5  # VSE++'s Xavier init
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)
        self.gcn = nn.ModuleList(RsGCN(embed_size, affinity) for _ in range(gcn_layers))
        self.rnn = nn.GRU(embed_size, embed_size, batch_first=True)
        self.bn = nn.BatchNorm1d(embed_size) if img_bn else None
        self.region_norm = region_norm
        if norm_axis not in NORM_AXES:
            raise ValueError(f"norm_axis must be one of {NORM_AXES}, not {norm_axis!r}")
        self.norm_axis = norm_axis

    def reason(self, images: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """(B, R, D), mask (B, R) | None -> L2-normalised reasoned regions (B, R, E)."""
        v = self.fc(images)
        if self.region_norm:
            v = l2_normalise(v, mask, self.norm_axis)
        for layer in self.gcn:
            v = layer(v, mask)
        return l2_normalise(v, mask, self.norm_axis)

    def pool(self, reasoned: torch.Tensor, mask: torch.Tensor | None,
             regions: torch.Tensor) -> torch.Tensor:
        """Reasoned regions (B, R, E) -> image embeddings (B, E), L2-normalised."""
        if mask is None:
            _, state = self.rnn(reasoned)
        else:
            _, state = run_gru(self.rnn, reasoned, regions, outputs=False)
        emb = state[-1]
        if self.bn is not None:
            emb = batch_norm_rows(self.bn, emb)
        return F.normalize(emb, dim=-1)


@MODELS.register("vsrn")
class VSRN(EmbeddingModel):
    """VSRN (defaults: the published 2048-d joint space, 300-d words, 4 Rs-GCN layers, the
    reference's caption decoder with 512-d states, captions capped at 60 tokens, caption
    loss weight 1; ``region_norm``/``img_bn`` as the reference on COCO: see
    configs/model/vsrn_f30k_precomp.yaml for Flickr30K; the reference's L2 norm across
    regions, ``norm_axis="regions"``, and its double update of the caption branch,
    ``caption_double_step``)."""

    needs_regions = True
    # Checkpoints written before these options existed were trained without them.
    legacy_options = {"norm_axis": "features", "caption_double_step": False}

    def __init__(self, img_dim: int, vocab_size: int,
                 embed_size: Annotated[int, Range(min=1)] = 2048,
                 word_dim: Annotated[int, Range(min=1)] = 300,
                 gcn_layers: Annotated[int, Range(min=0)] = 4,
                 affinity: Annotated[str, OneOf("dot", "softmax")] = "dot",
                 region_norm: bool = True, img_bn: bool = False,
                 norm_axis: Annotated[str, OneOf(*NORM_AXES)] = "regions",
                 caption_weight: Annotated[float, Range(min=0)] = 1.0,
                 max_len: Annotated[int, Range(min=2)] = 60,
                 caption_hidden: Annotated[int, Range(min=1)] = 512,
                 caption_word_dim: Annotated[int, Range(min=1)] = 300,
                 caption_dropout: Annotated[float, Range(min=0, max=1)] = 0.2,
                 caption_double_step: bool = True):
        super().__init__()
        self.image_encoder = RegionReasoning(img_dim, embed_size, gcn_layers, affinity,
                                             region_norm, img_bn, norm_axis)
        self.text_encoder = TextEncoder(vocab_size, word_dim, embed_size)
        self.caption_weight = caption_weight
        self.caption_double_step = caption_double_step
        self.decoder = CaptionDecoder(vocab_size, embed_size, caption_hidden, caption_word_dim,
                                      caption_dropout, max_len)

    def param_groups(self) -> list[dict]:
        """One group; with ``caption_double_step`` the caption decoder's parameters form a
        second group updated twice per step (``"repeats": 2``), as the reference's optimiser
        does with its caption encoder and decoder listed twice."""
        if not self.caption_double_step:
            return super().param_groups()
        decoder = {id(p) for p in self.decoder.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in decoder]
        caption = [p for p in self.decoder.parameters() if p.requires_grad]
        return [{"params": rest, "lr_scale": 1.0},
                {"params": caption, "lr_scale": 1.0, "repeats": 2}]

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
