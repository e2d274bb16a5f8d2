import pytest
import torch

from stages.losses import build_loss
from stages.losses.base import Similarities
from tests.losses.naive import check_against_naive, make_case


def naive_semihard(margin):
    def run(queries):
        value = torch.zeros((), dtype=torch.float64)
        for rows in queries.values():
            for positive, negatives in rows:
                if not negatives:
                    continue
                sims = [s for _, s in negatives]
                semihard = [s for s in sims if positive - margin < s < positive]
                negative = max(semihard or sims, key=lambda s: s.item())
                value = value + torch.clamp(margin + negative - positive, min=0)
        return value
    return run


@pytest.mark.parametrize("mask_same_image", [False, True])
@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("margin", [0.2, 0.6])
def test_matches_naive_loop(mask_same_image, with_extra, margin):
    check_against_naive("triplet_semihard", {"margin": margin}, naive_semihard(margin),
                        make_case(with_extra), mask_same_image)


def _query(negatives):
    """One image query, positive 0.5, against ``negatives``; no caption-query negatives."""
    row = torch.tensor([[0.5, *negatives]], dtype=torch.float64)
    mask = torch.tensor([[True] + [False] * len(negatives)])
    return Similarities(torch.tensor([0.5], dtype=torch.float64), row,
                        torch.tensor([[0.5]], dtype=torch.float64), mask,
                        torch.tensor([[True]]))


@pytest.mark.parametrize("negatives, hinge", [
    ([0.7, 0.45, 0.35, 0.0], 0.15),  # semi-hard 0.45 and 0.35: the hardest of them
    ([0.7, 0.6, 0.0], 0.4),  # none semi-hard: the hardest negative
    ([0.25, 0.0], 0.0),  # none semi-hard, all beyond the margin
    ([0.5, 0.1], 0.2),  # a tie with the positive is not semi-hard: the hardest, 0.5
])
def test_which_negative_is_taken(negatives, hinge):
    loss = build_loss("triplet_semihard", {"margin": 0.2})
    terms = loss.compute(_query(negatives))
    assert terms["i2t"].item() == pytest.approx(hinge)
    assert terms["t2i"].item() == 0.0
