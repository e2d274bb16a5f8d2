"""VSE++ (Faghri et al. 2018) on precomputed image features.

Image side: linear projection of the features (regions mean-pooled over the valid ones),
L2-normalised. Text side: word embedding + GRU, final hidden state, L2-normalised.
Similarity is the inner product of the normalised embeddings (cosine).
"""

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from stages.core.values import Range
from stages.models.base import MODELS, EmbeddingModel
from stages.models.rnn import run_gru
from stages.models.tracing import is_exporting
from stages.models.word_vectors import init_embedding


def masked_mean(images: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Mean over the first ``regions[b]`` regions: (B, R, D), (B,) -> (B, D)."""
    num = images.shape[1]
    # The shortcut is a branch on values: an exported graph takes the general path.
    if not is_exporting() and bool((regions == num).all()):
        return images.mean(dim=1)
    mask = torch.arange(num, device=images.device)[None, :] < regions[:, None]
    mask = mask.to(images.dtype)
    return (images * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


class ImageEncoder(nn.Module):
    """Precomputed features -> embedding: (B, R, D) or (B, D) -> (B, E).

    Mean pooling then projection equals projecting every region then pooling (the
    projection is linear), at 1/R of the cost.
    """

    def __init__(self, img_dim: int, embed_size: int, img_norm: bool = True):
        super().__init__()
        self.fc = nn.Linear(img_dim, embed_size)
        self.img_norm = img_norm
        bound = math.sqrt(6.0) / math.sqrt(img_dim + embed_size)  # VSE++'s Xavier init
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, images: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        pooled = masked_mean(images, regions) if images.dim() == 3 else images
        emb = self.fc(pooled)
        return F.normalize(emb, dim=-1) if self.img_norm else emb


class TextEncoder(nn.Module):
    """Token ids -> embedding: (B, L) long, lengths (B,) -> (B, E)."""

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, num_layers: int = 1,
                 bidirectional: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True,
                          bidirectional=bidirectional)
        self.bidirectional = bidirectional
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _, hidden = run_gru(self.rnn, self.embed(tokens), lengths, outputs=False)
        # hidden: (layers * directions, B, E)
        emb = (hidden[-2] + hidden[-1]) / 2 if self.bidirectional else hidden[-1]
        return F.normalize(emb, dim=-1)


@MODELS.register("vsepp")
class VSEPP(EmbeddingModel):
    """VSE++ on precomputed features (defaults: the published 1024-d, 300-d words, 1 GRU)."""

    def __init__(self, img_dim: int, vocab_size: int,
                 embed_size: Annotated[int, Range(min=1)] = 1024,
                 word_dim: Annotated[int, Range(min=1)] = 300,
                 num_layers: Annotated[int, Range(min=1)] = 1, bidirectional: bool = False,
                 img_norm: bool = True, word_vectors: str = ""):
        super().__init__()
        self.word_vectors = word_vectors  # read by init_word_vectors, never here
        self.image_encoder = ImageEncoder(img_dim, embed_size, img_norm)
        self.text_encoder = TextEncoder(vocab_size, word_dim, embed_size, num_layers,
                                        bidirectional)

    def encode_images(self, images: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """(B, R, D) | (B, D) features, (B,) valid regions -> (B, E) embeddings."""
        return self.image_encoder(images, regions)

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids, (B,) lengths -> (B, E) embeddings."""
        return self.text_encoder(tokens, lengths)

    def init_word_vectors(self, vocab) -> dict | None:
        """Word embedding rows from ``word_vectors`` (when set); see the base class."""
        if not self.word_vectors:
            return None
        return init_embedding(self.text_encoder.embed, self.word_vectors, vocab)
