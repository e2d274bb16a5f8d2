import pytest
import torch

from stages.losses import build_loss
from tests.losses.helpers import total
from tests.losses.naive import check_against_naive, make_case
from tests.losses.test_infonce import naive_infonce


@pytest.mark.parametrize("mask_same_image", [False, True])
@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_matches_naive_loop(mask_same_image, with_extra, gamma):
    check_against_naive("focal_infonce", {"gamma": gamma, "temperature": 0.2},
                        naive_infonce(5.0, gamma=gamma), make_case(with_extra),
                        mask_same_image)


@pytest.mark.parametrize("learnable", [False, True])
def test_gamma_zero_is_infonce_exactly(learnable):
    case = make_case()
    options = {"mask_same_image": True, "learnable_temperature": learnable}
    focal = build_loss("focal_infonce", {**options, "gamma": 0.0}).double()
    plain = build_loss("infonce", options).double()
    values, grads = [], []
    for loss in (focal, plain):
        value = total(loss(case.img, case.cap, case.ids, extra=case.extra))
        values.append(value)
        grads.append(torch.autograd.grad(value, [*case.leaves(), *loss.parameters()]))
    assert torch.equal(values[0], values[1])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_focal_factor_down_weights_easy_queries():
    case = make_case(noise=0.3)  # positives mostly win: p near 1
    args = (case.img, case.cap, case.ids)
    plain = total(build_loss("infonce")(*args, extra=case.extra))
    focal = total(build_loss("focal_infonce", {"gamma": 2.0})(*args, extra=case.extra))
    assert 0 < focal.item() < plain.item()


def test_learnable_temperature_is_a_parameter_with_a_gradient():
    case = make_case()
    loss = build_loss("focal_infonce", {"learnable_temperature": True}).double()
    total(loss(case.img, case.cap, case.ids, extra=case.extra)).backward()
    assert [n for n, _ in loss.named_parameters()] == ["logit_scale"]
    assert loss.logit_scale.grad.item() != 0
