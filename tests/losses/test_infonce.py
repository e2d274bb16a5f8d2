import math

import pytest
import torch
import torch.nn.functional as F

from stages.core.errors import UserError
from stages.losses import build_loss
from tests.losses.helpers import total
from tests.losses.naive import check_against_naive, make_case, naive_queries


def naive_infonce(scale, mean=True, gamma=0.0):
    """−(1 − p)^γ log p per query, p the softmax probability of its positive."""
    def run(queries):
        value = torch.zeros((), dtype=torch.float64)
        for rows in queries.values():
            for positive, negatives in rows:
                e_pos = torch.exp(scale * positive)
                p = e_pos / (e_pos + sum(torch.exp(scale * s) for _, s in negatives))
                term = -torch.log(p)
                value = value + (term * (1 - p) ** gamma if gamma else term) / (
                    len(rows) if mean else 1)
        return value
    return run


@pytest.mark.parametrize("mask_same_image", [False, True])
@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_naive_loop(mask_same_image, with_extra, reduction):
    check_against_naive("infonce", {"temperature": 0.1, "reduction": reduction},
                        naive_infonce(10.0, mean=reduction == "mean"), make_case(with_extra),
                        mask_same_image)


def test_square_batch_is_clip_cross_entropy():
    case = make_case(with_extra=False)
    logits = case.img @ case.cap.t() / 0.07
    target = torch.arange(len(case.ids))
    clip = F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)
    got = total(build_loss("infonce")(case.img, case.cap, case.ids))
    assert got.item() == pytest.approx(clip.item(), rel=1e-12)


def test_learnable_temperature_gets_the_naive_gradient():
    case = make_case()
    loss = build_loss("infonce", {"learnable_temperature": True, "temperature": 0.1,
                                  "mask_same_image": True}).double()
    (scale,) = list(loss.parameters())
    assert scale is loss.logit_scale and scale.item() == pytest.approx(math.log(10))
    check_against_naive("infonce", {}, naive_infonce(scale.exp()), case, True, loss=loss)
    got = torch.autograd.grad(total(loss(case.img, case.cap, case.ids, extra=case.extra)),
                              scale)[0]
    want = torch.autograd.grad(naive_infonce(scale.exp())(naive_queries(case, True)), scale)[0]
    assert got.item() != 0 and got.item() == pytest.approx(want.item(), rel=1e-10)


@pytest.mark.parametrize("start, clamped, temperature", [(6.0, math.log(100), 0.01),
                                                         (-1.0, 0.0, 1.0)])
def test_learnable_temperature_stays_clamped(start, clamped, temperature):
    case = make_case()
    loss = build_loss("infonce", {"learnable_temperature": True}).double()
    with torch.no_grad():
        loss.logit_scale.fill_(start)
    value = total(loss(case.img, case.cap, case.ids, extra=case.extra))
    assert loss.logit_scale.item() == pytest.approx(clamped)
    fixed = build_loss("infonce", {"temperature": temperature}).double()
    assert value.item() == pytest.approx(
        total(fixed(case.img, case.cap, case.ids, extra=case.extra)).item(), rel=1e-10)
    value.backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad.item() != 0


def test_fixed_temperature_owns_no_parameter_and_is_range_checked():
    assert list(build_loss("infonce").parameters()) == []
    with pytest.raises(UserError, match="temperature must be >= 0.01, got 0.001"):
        build_loss("infonce", {"temperature": 0.001})
