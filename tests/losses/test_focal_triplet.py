import pytest
import torch

from stages.losses import build_loss
from tests.losses.helpers import total
from tests.losses.naive import check_against_naive, make_case


def naive_focal_triplet(margin, temperature, gamma):
    def run(queries):
        value = torch.zeros((), dtype=torch.float64)
        for rows in queries.values():
            for positive, negatives in rows:
                if not negatives:
                    continue
                exps = [torch.exp(s / temperature) for _, s in negatives]
                p = torch.exp(positive / temperature) / (torch.exp(positive / temperature)
                                                         + sum(exps))
                weighted = sum(e / sum(exps) * torch.clamp(margin + s - positive, min=0)
                               for e, (_, s) in zip(exps, negatives, strict=True))
                value = value + (1 - p) ** gamma * weighted
        return value
    return run


@pytest.mark.parametrize("mask_same_image", [False, True])
@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("temperature, gamma", [(0.1, 2.0), (0.5, 0.0), (0.05, 0.5)])
def test_matches_naive_loop(mask_same_image, with_extra, temperature, gamma):
    options = {"margin": 0.3, "temperature": temperature, "gamma": gamma}
    check_against_naive("focal_triplet", options, naive_focal_triplet(0.3, temperature, gamma),
                        make_case(with_extra), mask_same_image)


@pytest.mark.parametrize("temperature, like", [(0.001, ("vse_max", {})),
                                               (1000.0, ("triplet_topk", {"k": 100}))])
def test_without_focus_it_spans_max_violation_to_mean_hinge(temperature, like):
    case = make_case()
    args = (case.img, case.cap, case.ids)
    options = {"margin": 0.3, "mask_same_image": True}
    focal = build_loss("focal_triplet", {**options, "temperature": temperature, "gamma": 0})
    other = build_loss(like[0], {**options, **like[1]})
    assert total(focal(*args, extra=case.extra)).item() == pytest.approx(
        total(other(*args, extra=case.extra)).item(), rel=1e-3)
