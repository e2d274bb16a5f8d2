"""Generalized Pooling Operator (GPO; Chen et al., CVPR 2021, "Learning the Best Pooling
Strategy for Visual Semantic Embedding", after woodfrog/vse_infty's lib/modules/aggr/gpo.py).

For a set of K feature vectors, each dimension is sorted in decreasing order and the k-th
largest value gets weight ``theta_k``: ``pooled[d] = sum_k theta_k * sorted_k[d]``. The
weights come from a bidirectional GRU run over sinusoidal encodings of the positions
0..K-1 (outputs averaged over the two directions), a linear score per position and a
softmax over positions at temperature 0.1. They depend on K only, so a set of K = 1 pools
to its element, mean and max pooling are special cases, and sets of different sizes get
their own weights. Padded members of a set (``mask`` False) take no part: they are sorted
last and weighted 0.
"""

import functools
import math

import torch
from torch import nn

from stages.models.rnn import run_gru
from stages.models.tracing import is_exporting

TEMPERATURE = 0.1  # the reference's softmax temperature over positions


@functools.lru_cache(maxsize=64)
def positional_encoding(length: int, dim: int) -> torch.Tensor:
    """Transformer sinusoids of positions 0..length-1: (length, dim), sin on even columns,
    cos on odd ones, wavelengths up to 10000 * 2 pi. Cached: do not modify the result."""
    if dim % 2:
        raise ValueError(f"positional encoding needs an even dimension, got {dim}")
    position = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq)
    return pe


def traced_positional_encoding(like: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """:func:`positional_encoding` from tensor operations only (an exported graph must not
    hold the example's length as a constant): (length, dim) on ``like``'s device."""
    position = torch.ones_like(like[:1], dtype=torch.float32).expand(length).cumsum(0) - 1
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=like.device)
                     * (-math.log(10000.0) / dim))
    angles = position[:, None] * freq[None, :]
    return torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1).flatten(1)


class GPO(nn.Module):
    """Pool (B, K, D) sets with (B, K) masks into (B, D) vectors (see the module docstring).

    ``pe_dim``: size of the positional encodings; ``hidden``: the GRU's hidden size (both
    32 in the reference).
    """

    def __init__(self, pe_dim: int = 32, hidden: int = 32):
        super().__init__()
        self.pe_dim = pe_dim
        self.gru = nn.GRU(pe_dim, hidden, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(hidden, 1, bias=False)

    def weights(self, counts: torch.Tensor, length: int) -> torch.Tensor:
        """Pooling weights for sets of ``counts`` (B,) members: (B, length), row b a softmax
        over positions 0..counts[b]-1 and 0 beyond.

        The GRU runs once per distinct count in the batch (the weights depend on the count
        only), not once per set.
        """
        exporting = is_exporting()
        if exporting:  # an exported graph: one GRU row per set, encodings computed in it
            sizes, which = counts, None
            pe = traced_positional_encoding(counts, length, self.pe_dim).to(self.linear.weight)
        else:
            if bool((counts < 1).any()) or int(counts.max()) > length:
                raise ValueError(f"set sizes must be in [1, {length}], got {counts.tolist()}")
            sizes, which = torch.unique(counts, return_inverse=True)  # (U,), (B,)
            pe = positional_encoding(length, self.pe_dim).to(self.linear.weight)
        positions = torch.arange(length, device=counts.device)
        valid = positions[None, :] < sizes[:, None]  # (U, length)
        out, _ = run_gru(self.gru, pe.expand(sizes.shape[0], -1, -1), sizes)
        half = out.shape[-1] // 2  # out: (U, length, 2 * hidden)
        scores = self.linear((out[..., :half] + out[..., half:]) / 2).squeeze(-1)
        scores = scores.masked_fill(~valid, -math.inf)
        weights = torch.softmax(scores / TEMPERATURE, dim=1)
        return weights if exporting else weights[which]

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, K, D) features, (B, K) bool mask of the members (at least one per row; any
        positions) -> (B, D) pooled features."""
        counts = mask.sum(dim=1)
        length = features.shape[1]
        weights = self.weights(counts, length)  # (B, K)
        # Sorted along the last (contiguous) axis: (B, D, K), about 1.5x faster than dim 1.
        ranked = features.masked_fill(~mask[..., None], -math.inf).transpose(1, 2)
        ranked = ranked.contiguous().sort(dim=2, descending=True).values
        beyond = torch.arange(length, device=mask.device)[None, :] >= counts[:, None]
        ranked = ranked.masked_fill(beyond[:, None, :], 0.0)  # -inf * 0 would be NaN
        return (ranked @ weights[..., None]).squeeze(-1)
