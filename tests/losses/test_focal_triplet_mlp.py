import pytest
import torch
import torch.nn.functional as F

from stages.losses import build_loss
from stages.training.loop import build_optimizer
from tests.losses.helpers import total
from tests.losses.naive import check_against_naive, make_case, naive_queries


def naive_mlp_triplet(loss, margin):
    """The factor of each (positive, negative) pair from the loss's MLP, one at a time."""
    def run(queries):
        value = torch.zeros((), dtype=torch.float64)
        for rows in queries.values():
            for positive, negatives in rows:
                factors = [F.softplus(loss.mlp(torch.stack([positive, s]).detach()))[0]
                           for _, s in negatives]
                for a, (_, s) in zip(factors, negatives, strict=True):
                    weight = len(factors) * a / sum(factors)
                    value = value + weight * torch.clamp(margin + s - positive, min=0)
        return value
    return run


def _randomised(mask_same_image=False, hidden=5):
    loss = build_loss("focal_triplet_mlp", {"margin": 0.3, "hidden": hidden,
                                            "mask_same_image": mask_same_image}).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in loss.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return loss


@pytest.mark.parametrize("mask_same_image", [False, True])
@pytest.mark.parametrize("with_extra", [False, True])
def test_matches_naive_loop_and_the_mlp_gradient_is_reversed(mask_same_image, with_extra):
    case = make_case(with_extra)
    loss = _randomised(mask_same_image)
    check_against_naive("focal_triplet_mlp", {}, naive_mlp_triplet(loss, 0.3), case,
                        mask_same_image, loss=loss)
    params = list(loss.parameters())
    got = torch.autograd.grad(total(loss(case.img, case.cap, case.ids, extra=case.extra)),
                              params)
    want = torch.autograd.grad(naive_mlp_triplet(loss, 0.3)(
        naive_queries(case, mask_same_image)), params)
    for g, w in zip(got, want, strict=True):
        assert w.abs().sum() > 0
        torch.testing.assert_close(g, -w, rtol=1e-9, atol=1e-12)


def test_starts_as_the_sum_of_violations():
    case = make_case()
    args = (case.img, case.cap, case.ids)
    mlp = total(build_loss("focal_triplet_mlp").double()(*args, extra=case.extra))
    vse = total(build_loss("vse_sum")(*args, extra=case.extra))
    assert mlp.item() == pytest.approx(vse.item(), rel=1e-12)


class _NoModel:
    """A model without parameters: the trainer's optimiser then holds the loss's only."""

    def param_groups(self):
        return []


def test_training_the_factor_cannot_collapse_the_loss():
    """The trainer's optimiser minimises the total over the loss's parameters too; the
    reversed gradient makes the factor climb towards max violation instead of sinking the
    weight onto negatives that already clear the margin."""
    case = make_case()
    args = (case.img.detach(), case.cap.detach(), case.ids)
    extra = case.extra
    loss = build_loss("focal_triplet_mlp", {"margin": 0.3}).double()
    optimizer = build_optimizer(_NoModel(), loss, lr=0.05)
    start = total(loss(*args, extra=extra)).item()
    for _ in range(60):
        optimizer.zero_grad()
        total(loss(*args, extra=extra)).backward()
        optimizer.step()
    end = total(loss(*args, extra=extra)).item()
    # Bound: all of each query's weight on its largest hinge.
    bound = 0.0
    for rows in naive_queries(case, False).values():
        for positive, negatives in rows:
            bound += len(negatives) * max(max(0.3 + s.item() - positive.item(), 0)
                                          for _, s in negatives)
    assert start * 1.2 < end <= bound


def test_building_it_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = build_loss("focal_triplet_mlp"), build_loss("focal_triplet_mlp")
    assert torch.equal(state, torch.get_rng_state())
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)
