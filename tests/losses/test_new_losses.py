"""Properties every loss added beside VSE++/AOQ shares: finite values and gradients without
negatives, offline negatives as extra references, reduction, option checks, config files."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from stages.config.sections import load_config
from stages.core.errors import UserError
from stages.losses import LOSSES, build_loss
from tests.losses.helpers import offline_negatives, total
from tests.losses.naive import make_case

NEW_LOSSES = ["triplet_random", "triplet_semihard", "triplet_topk", "contrastive", "infonce",
              "focal_triplet", "focal_triplet_mlp", "focal_infonce"]
# Variants worth the same checks: learnable temperatures own a parameter.
VARIANTS = [(name, {}) for name in NEW_LOSSES] + [
    ("infonce", {"learnable_temperature": True}),
    ("focal_infonce", {"learnable_temperature": True, "gamma": 0.5})]
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "loss"


def _finite_terms_and_grads(loss, img, cap, ids, **kwargs):
    img, cap = img.clone().requires_grad_(), cap.clone().requires_grad_()
    terms = loss(img, cap, ids, **kwargs)
    value = total(terms)
    grads = torch.autograd.grad(value, [img, cap, *loss.parameters()], allow_unused=True)
    assert all(torch.isfinite(t).all() for t in terms.values()), terms
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    return value


@pytest.mark.parametrize("name, options", VARIANTS)
def test_batch_of_one_is_finite(name, options):
    loss = build_loss(name, options).double()
    img = F.normalize(torch.randn(1, 4, dtype=torch.float64), dim=1)
    cap = F.normalize(torch.randn(1, 4, dtype=torch.float64), dim=1)
    value = _finite_terms_and_grads(loss, img, cap, torch.tensor([0]))
    if name != "contrastive":  # no negative: nothing to rank against
        assert value.item() == 0.0


@pytest.mark.parametrize("name, options", VARIANTS)
def test_no_negative_left_by_same_image_masking_is_finite(name, options):
    case = make_case()
    loss = build_loss(name, {**options, "mask_same_image": True}).double()
    ids = torch.zeros(len(case.ids), dtype=torch.long)  # one image: nothing is a negative
    value = _finite_terms_and_grads(loss, case.img.detach(), case.cap.detach(), ids)
    if name != "contrastive":
        assert value.item() == 0.0


@pytest.mark.parametrize("name, options", VARIANTS)
def test_offline_negatives_train_as_extra_references(name, options):
    case = make_case(with_extra=False)
    g = torch.Generator().manual_seed(5)
    off = {k: F.normalize(torch.randn(8, 6, dtype=torch.float64, generator=g), dim=1)
           for k in ("captions", "images", "captions2", "images2")}
    offline = offline_negatives(off)
    args = (case.img, case.cap, case.ids)
    with_offline = total(build_loss(name, options).double()(*args, offline=offline))
    as_extra = total(build_loss(name, options).double()(*args, extra=offline.as_references()))
    plain = total(build_loss(name, options).double()(*args))
    assert with_offline.item() == as_extra.item() != plain.item()


@pytest.mark.parametrize("name", NEW_LOSSES)
def test_mean_reduction_divides_the_sum_by_the_batch(name):
    case = make_case()
    args = (case.img, case.cap, case.ids)
    summed = build_loss(name, {"reduction": "sum"}).double()(*args, extra=case.extra)
    mean = build_loss(name, {"reduction": "mean"}).double()(*args, extra=case.extra)
    assert summed.keys() == mean.keys() == {"i2t", "t2i"}
    for key in summed:
        assert mean[key].item() == pytest.approx(summed[key].item() / len(case.ids), rel=1e-12)


@pytest.mark.parametrize("name", NEW_LOSSES)
def test_a_bad_option_is_refused_with_the_options_listed(name):
    options = LOSSES.options(name)
    with pytest.raises(UserError, match=f"has no option 'nope'. {name} takes: "
                                        + ", ".join(options)):
        build_loss(name, {"nope": 1})
    with pytest.raises(UserError, match="reduction must be one of sum, mean"):
        build_loss(name, {"reduction": "max"})


@pytest.mark.parametrize("name", NEW_LOSSES)
def test_config_file_names_the_loss_with_its_defaults(name):
    path = CONFIGS / f"{name}.yaml"
    block = yaml.safe_load(path.read_text())["loss"]
    defaults = {k: o.default for k, o in LOSSES.options(name).items()}
    assert block.pop("name") == name
    assert block == {k: v for k, v in defaults.items()
                     if k not in ("mask_same_image", "reduction") or k in block}
    assert load_config([path]).loss.options() == defaults
