"""Region relationship reasoning: VSRN's residual graph convolution (Rs-GCN, Li et al. 2019,
``GCN_lib/Rs_GCN.py`` of KunpengLi1994/VSRN), with padded regions masked out.

The regions of an image are the nodes of a fully connected graph. One layer, on regions
V (N, C):

    R = theta(V) phi(V)^T                      (N, N) affinity of every pair of regions
    V* = V + BN(W (A g(V)))                     A = R / N (the reference), or softmax(R)

where g, theta, phi (C -> C) and W are the reference's 1x1 convolutions (here linear layers
on (B, N, C), the same map and the same default initialisation), and BN is a batch norm
over channels whose weight and bias start at zero, so each layer starts as the identity.
The reference divides the affinity by the number of regions (no softmax); ``affinity=
"softmax"`` normalises each row with a softmax instead (the non-local block's embedded
Gaussian).

Padded regions (beyond an image's ``regions[b]`` valid ones) are no neighbours: their
affinity columns are zero (softmax: -inf), the division is by the valid count, and the batch
norm takes its statistics over valid regions only. So a padded region changes nothing that
a valid region computes, in training as in evaluation.
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from stages.models.tracing import is_exporting


def batch_norm_rows(bn: nn.BatchNorm1d, rows: torch.Tensor) -> torch.Tensor:
    """``bn`` over rows (M, C) -> (M, C).

    In training, a single row has no batch statistics (PyTorch refuses it): it is normalised
    with the running statistics, which it does not update. This happens for an epoch's last
    batch when it holds one image.
    """
    if bn.training and rows.shape[0] < 2:
        return F.batch_norm(rows, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                            training=False, eps=bn.eps)
    return bn(rows)


def valid_mask(regions: torch.Tensor, num: int) -> torch.Tensor | None:
    """(B,) valid region counts -> (B, num) bool mask, or None when every region is valid."""
    if not is_exporting() and bool((regions == num).all()):  # a graph takes the mask
        return None
    return torch.arange(num, device=regions.device)[None, :] < regions[:, None]


def masked_batch_norm(bn: nn.BatchNorm1d, x: torch.Tensor,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """Batch norm of (B, N, C) over the channels, statistics over the valid positions
    (``mask`` (B, N) bool; None: all) only; padded positions come out as zeros."""
    if mask is None:
        return batch_norm_rows(bn, x.reshape(-1, x.shape[-1])).reshape(x.shape)
    out = x.new_zeros(x.shape)
    out[mask] = batch_norm_rows(bn, x[mask])
    return out


class RsGCN(nn.Module):
    """One residual graph-convolution layer: regions (B, N, C), mask (B, N) | None ->
    (B, N, C)."""

    def __init__(self, dim: int, affinity: Literal["dot", "softmax"] = "dot"):
        super().__init__()
        self.g = nn.Linear(dim, dim)
        self.theta = nn.Linear(dim, dim)
        self.phi = nn.Linear(dim, dim)
        self.w = nn.Linear(dim, dim)
        self.bn = nn.BatchNorm1d(dim)
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        if affinity not in ("dot", "softmax"):
            raise ValueError(f"affinity must be dot or softmax, not {affinity!r}")
        self.affinity = affinity

    def forward(self, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        r = self.theta(v) @ self.phi(v).transpose(1, 2)  # (B, N, N): r[b, i, j]
        if self.affinity == "softmax":
            if mask is not None:
                r = r.masked_fill(~mask[:, None, :], float("-inf"))
            a = r.softmax(dim=-1)
        elif mask is None:
            a = r / v.shape[1]
        else:
            counts = mask.sum(1).to(r.dtype)
            a = r * mask[:, None, :].to(r.dtype) / counts[:, None, None]
        return v + masked_batch_norm(self.bn, self.w(a @ self.g(v)), mask)
