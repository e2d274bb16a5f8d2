"""Per-query negative selection over one direction's reference set, shared by the
triplet-style losses.

``scores`` (B, R) are one direction's similarities and ``mask`` (B, R) is True where a
reference is not a negative of the query (see :class:`stages.losses.base.Similarities`).
A query may have no negative at all (a batch of one, or every other reference showing its
own image); the helpers give such rows finite stand-ins, so no inf or NaN reaches a value or
a gradient, and the caller zeroes their term with the returned ``found`` flags.
"""

import torch


def hinge(margin: float, negative: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """``[margin + negative - positive]+``, broadcast (e.g. (B, R) against (B, 1))."""
    return (margin + negative - positive).clamp(min=0)


def masked_max(scores: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's largest ``scores`` (B, R) entry among the ``allowed`` (B, R) ones.

    Returns ``values`` (B,) and ``found`` (B,) bool; a row with nothing allowed gets the
    value 0, which carries no gradient.
    """
    found = allowed.any(dim=1)
    values = scores.masked_fill(~allowed, float("-inf")).max(dim=1).values
    return torch.where(found, values, torch.zeros_like(values)), found


def zero_unless(found: torch.Tensor, per_query: torch.Tensor) -> torch.Tensor:
    """``per_query`` (B,) where ``found`` (B,), else 0 (a query without negatives)."""
    return torch.where(found, per_query, torch.zeros_like(per_query))


def masked_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``logits`` (B, R) with the entries not ``allowed`` set to -inf, for a softmax or
    logsumexp over the allowed ones; a row with nothing allowed is set to 0 instead (its
    result is meaningless and must be zeroed by the caller, but stays finite)."""
    found = allowed.any(dim=1, keepdim=True)
    out = logits.masked_fill(~allowed, float("-inf"))
    return torch.where(found, out, torch.zeros_like(out))
