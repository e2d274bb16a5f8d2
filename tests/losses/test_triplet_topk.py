import pytest
import torch

from stages.core.errors import UserError
from stages.losses import build_loss
from tests.losses.helpers import total
from tests.losses.naive import check_against_naive, make_case


def naive_topk(margin, k):
    def run(queries):
        value = torch.zeros((), dtype=torch.float64)
        for rows in queries.values():
            for positive, negatives in rows:
                sims = [s for _, s in negatives]
                hardest = sorted(sims, key=lambda s: s.item(), reverse=True)[:k]
                if hardest:
                    hinges = [torch.clamp(margin + s - positive, min=0) for s in hardest]
                    value = value + sum(hinges) / len(hardest)
        return value
    return run


@pytest.mark.parametrize("mask_same_image", [False, True])
@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("k", [1, 3, 7, 100])  # 7: some queries have fewer negatives
def test_matches_naive_loop(mask_same_image, with_extra, k):
    check_against_naive("triplet_topk", {"margin": 0.3, "k": k}, naive_topk(0.3, k),
                        make_case(with_extra), mask_same_image)


def test_k_one_is_max_violation():
    case = make_case()
    options = {"margin": 0.3, "mask_same_image": True}
    top1 = total(build_loss("triplet_topk", {**options, "k": 1})(case.img, case.cap, case.ids,
                                                                 extra=case.extra))
    vse = total(build_loss("vse_max", options)(case.img, case.cap, case.ids, extra=case.extra))
    assert top1.item() == pytest.approx(vse.item(), rel=1e-12)


def test_k_must_be_positive():
    with pytest.raises(UserError, match="k must be >= 1, got 0"):
        build_loss("triplet_topk", {"k": 0})
