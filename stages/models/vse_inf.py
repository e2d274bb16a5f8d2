"""VSE-infinity (Chen et al., CVPR 2021, "Learning the Best Pooling Strategy for Visual
Semantic Embedding"; after woodfrog/vse_infty's BiGRU branch, lib/encoders.py) on
precomputed region features.

Image side: every region is projected by a linear layer plus a residual 2-layer MLP
(Linear, BatchNorm, ReLU, Linear; hidden size embed/2), the projected regions are pooled by
GPO (:mod:`stages.models.gpo`) and L2-normalised. Text side: word embedding and a
bidirectional GRU whose outputs are averaged over the two directions, pooled by their own
GPO, L2-normalised. In training, 20% of the regions are dropped (``region_drop``) and 20% of
the caption tokens masked, replaced or deleted (``caption_aug``,
:mod:`stages.models.caption_augment`), as the reference's training loader does.

Batch normalisation of padded sets (``bn_padding``): the reference's loader moves each
image's kept regions to the front and pads the batch with zero rows up to its largest kept
count, and its batch norm takes its statistics over every row, padding included
(``bn_padding=True``, configs/model/vse_inf.yaml). By default the statistics are over the
valid regions only, so an embedding does not depend on how much padding its batch holds
(with features of variable region counts, one image of many regions would pad every other
image of its batch); evaluation uses the running statistics either way.

Other differences, each deliberate: region dropping draws from torch's RNG instead of
NumPy's, so a resumed run draws the same regions; an item that would lose every region
keeps them all. Global (B, D) features are sets of one region: GPO of one element is that
element, so the model becomes fc + MLP per image.
"""

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from stages.core.values import Range
from stages.models.base import MODELS, EmbeddingModel
from stages.models.caption_augment import augment_captions
from stages.models.gpo import GPO
from stages.models.rnn import run_gru
from stages.models.word_vectors import init_embedding


def prefix_mask(counts: torch.Tensor, num: int) -> torch.Tensor:
    """(B,) counts -> (B, num) bool mask of the first ``counts[b]`` positions."""
    return torch.arange(num, device=counts.device)[None, :] < counts[:, None]


def drop_regions(mask: torch.Tensor, rate: float) -> torch.Tensor:
    """Drop each valid region of (B, R) ``mask`` with probability ``rate`` (VSE-infinity's
    size augmentation); an item that would keep none keeps all of its regions. Drawn on the
    CPU from torch's global RNG, whatever the device, so that a run's checkpointed RNG state
    gives the same draws on resume."""
    keep = (torch.rand(mask.shape) >= rate).to(mask.device)
    dropped = mask & keep
    empty = ~dropped.any(dim=1)
    return torch.where(empty[:, None], mask, dropped)


def front_pack(images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each set's members moved to the front in their order, then zero rows up to the
    largest set: (B, R, D), (B, R) bool mask -> (B, K, D), (B, K) prefix mask (K: the largest
    count), the batch VSE-infinity's ``collate_fn`` builds from the kept regions."""
    counts = mask.sum(dim=1)
    width = int(counts.max())
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    packed = images.gather(1, order[..., None].expand(-1, -1, images.shape[2]))
    prefix = prefix_mask(counts, width)
    return packed.masked_fill(~prefix[..., None], 0.0), prefix


class RegionEncoder(nn.Module):
    """Region sets -> embedding: (B, R, D) features, (B, R) bool mask -> (B, E).

    ``bn_padding``: in training, the MLP's batch norm takes its statistics over the zero
    rows that pad the front-packed batch too (the reference), not over the valid regions
    only."""

    def __init__(self, img_dim: int, embed_size: int, bn_padding: bool = False):
        super().__init__()
        self.bn_padding = bn_padding
        self.fc = nn.Linear(img_dim, embed_size)
        self.mlp = nn.Sequential(nn.Linear(img_dim, embed_size // 2),
                                 nn.BatchNorm1d(embed_size // 2), nn.ReLU(),
                                 nn.Linear(embed_size // 2, embed_size))
        self.gpo = GPO()
        bound = math.sqrt(6.0) / math.sqrt(img_dim + embed_size)  # the reference's Xavier init
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # In eval mode batch norm is per row (running statistics): padding changes nothing,
        # and the exported graph holds no batch-dependent width.
        if self.bn_padding and self.training:
            images, mask = front_pack(images, mask)
            flat = images.reshape(-1, images.shape[2])  # padding rows included
            projected = (self.fc(flat) + self.mlp(flat)).reshape(*images.shape[:2], -1)
            return F.normalize(self.gpo(projected, mask), dim=-1)
        batch, num, _ = images.shape
        valid = images[mask]  # (valid regions, D): batch norm sees no padding
        projected = self.fc(valid) + self.mlp(valid)
        regions = projected.new_zeros(batch, num, projected.shape[1])
        regions[mask] = projected
        return F.normalize(self.gpo(regions, mask), dim=-1)


class TextEncoder(nn.Module):
    """Token ids -> embedding: (B, L) long, lengths (B,) -> (B, E). ``num_ids``: rows of the
    word embedding (the vocabulary, and ``<mask>`` when captions are augmented)."""

    def __init__(self, num_ids: int, word_dim: int, embed_size: int, num_layers: int):
        super().__init__()
        self.embed = nn.Embedding(num_ids, word_dim)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True,
                          bidirectional=True)
        self.gpo = GPO()
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = run_gru(self.rnn, self.embed(tokens), lengths)  # (B, L, 2E)
        half = out.shape[-1] // 2
        words = (out[..., :half] + out[..., half:]) / 2
        mask = prefix_mask(lengths.to(words.device), tokens.shape[1])
        return F.normalize(self.gpo(words, mask), dim=-1)


@MODELS.register("vse_inf")
class VSEInfinity(EmbeddingModel):
    """VSE-infinity with a BiGRU text encoder (defaults: the reference's 1024-d, 300-d
    words, 1 GRU layer, 20% of the regions dropped and 20% of the caption tokens altered in
    training; batch-norm statistics over valid regions only, see the module docstring).

    With ``caption_aug`` > 0 the word embedding has a row for ``<mask>``, id ``vocab_size``.
    """

    # Checkpoints written before caption_aug existed were trained without it.
    legacy_options = {"caption_aug": 0.0}

    def __init__(self, img_dim: int, vocab_size: int,
                 embed_size: Annotated[int, Range(min=2)] = 1024,
                 word_dim: Annotated[int, Range(min=1)] = 300,
                 num_layers: Annotated[int, Range(min=1)] = 1,
                 region_drop: Annotated[float, Range(min=0, max=0.9)] = 0.2,
                 caption_aug: Annotated[float, Range(min=0, max=0.9)] = 0.2,
                 bn_padding: bool = False,
                 word_vectors: str = ""):
        super().__init__()
        self.region_drop = region_drop
        self.caption_aug = caption_aug
        self.mask_id = vocab_size
        self.word_vectors = word_vectors
        self.image_encoder = RegionEncoder(img_dim, embed_size, bn_padding)
        self.text_encoder = TextEncoder(vocab_size + (caption_aug > 0), word_dim, embed_size,
                                        num_layers)

    def encode_images(self, images: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """(B, R, D) | (B, D) features, (B,) valid regions -> (B, E) embeddings; (B, D)
        global features are sets of one region. In training mode each region is dropped
        with probability ``region_drop``."""
        if images.dim() == 2:
            images, regions = images[:, None, :], torch.ones_like(regions)
        mask = prefix_mask(regions, images.shape[1])
        if self.training and self.region_drop > 0:
            mask = drop_regions(mask, self.region_drop)
        return self.image_encoder(images, mask)

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids, (B,) lengths -> (B, E) embeddings. In training mode the tokens
        are augmented with rate ``caption_aug``."""
        if self.training and self.caption_aug > 0:
            tokens, lengths = augment_captions(tokens, lengths, self.caption_aug, self.mask_id,
                                               self.mask_id + 1)
        return self.text_encoder(tokens, lengths)

    def init_word_vectors(self, vocab) -> dict | None:
        """Word embedding rows from ``word_vectors`` (when set); see the base class."""
        if not self.word_vectors:
            return None
        return init_embedding(self.text_encoder.embed, self.word_vectors, vocab,
                              extra_rows=int(self.caption_aug > 0))
