import pytest
import torch
import torch.nn.functional as F

from stages.core.errors import UserError
from stages.losses import LOSSES, build_loss
from tests.losses.helpers import total


def naive_vse_loss(img, cap, image_ids, margin, hardest, mask_same_image):
    """Per-element loop over anchors and negatives, straight from the VSE++ paper."""
    size = img.shape[0]

    def s(i, j):
        return float(img[i] @ cap[j])

    def negative(i, j):
        return i != j and not (mask_same_image and image_ids[i] == image_ids[j])

    total = 0.0
    for k in range(size):
        cap_costs = [max(0.0, margin + s(k, j) - s(k, k)) for j in range(size) if negative(k, j)]
        img_costs = [max(0.0, margin + s(j, k) - s(k, k)) for j in range(size) if negative(j, k)]
        for costs in (cap_costs, img_costs):
            if costs:
                total += max(costs) if hardest else sum(costs)
    return total


@pytest.mark.parametrize("name", ["vse_max", "vse_sum"])
@pytest.mark.parametrize("mask_same_image", [False, True])
def test_loss_matches_naive_loop(name, mask_same_image):
    torch.manual_seed(0)
    img = F.normalize(torch.randn(9, 6, dtype=torch.float64), dim=1)
    cap = F.normalize(img + 0.8 * torch.randn(9, 6, dtype=torch.float64), dim=1)
    image_ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5])  # captions sharing images
    loss = build_loss(name, {"margin": 0.3, "mask_same_image": mask_same_image})
    got = total(loss(img, cap, image_ids)).item()
    want = naive_vse_loss(img, cap, image_ids.tolist(), 0.3, name == "vse_max",
                          mask_same_image)
    assert got == pytest.approx(want, rel=1e-10)
    assert got > 0


def test_same_image_masking_removes_the_other_caption_of_the_image():
    # Pairs 0 and 1 are one image with two identical captions; the others are orthogonal.
    emb = torch.eye(4)
    emb[1] = emb[0]
    image_ids = torch.tensor([0, 0, 1, 2])
    plain = total(build_loss("vse_sum")(emb, emb, image_ids))
    masked = total(build_loss("vse_sum", {"mask_same_image": True})(emb, emb, image_ids))
    assert plain.item() == pytest.approx(4 * 0.2)  # (0,1) and (1,0), both directions
    assert masked.item() == 0.0


def test_warmup_uses_sum_then_max():
    torch.manual_seed(1)
    img = F.normalize(torch.randn(6, 4), dim=1)
    cap = F.normalize(torch.randn(6, 4), dim=1)
    ids = torch.arange(6)
    loss = build_loss("vse_max", {"warmup_epochs": 2})
    summed = total(build_loss("vse_sum")(img, cap, ids))
    hardest = total(build_loss("vse_max")(img, cap, ids))
    loss.set_epoch(0)
    assert total(loss(img, cap, ids)).item() == pytest.approx(summed.item())
    loss.set_epoch(1)
    assert total(loss(img, cap, ids)).item() == pytest.approx(summed.item())
    loss.set_epoch(2)
    assert total(loss(img, cap, ids)).item() == pytest.approx(hardest.item())


def test_gradients_flow_to_both_sides():
    img = F.normalize(torch.randn(5, 4), dim=1).requires_grad_()
    cap = F.normalize(torch.randn(5, 4), dim=1).requires_grad_()
    total(build_loss("vse_max", {"margin": 2.0})(img, cap, torch.arange(5))).backward()
    assert img.grad.abs().sum() > 0 and cap.grad.abs().sum() > 0


def test_unknown_loss_lists_known_ones():
    with pytest.raises(UserError, match="unknown loss 'nope'; known: .*vse_max.*vse_sum"):
        build_loss("nope")
    assert {"vse_max", "vse_sum"} <= set(LOSSES.names())


def test_shape_checks():
    loss = build_loss("vse_max")
    with pytest.raises(ValueError, match="one shape"):
        loss(torch.zeros(3, 4), torch.zeros(3, 5), torch.arange(3))
    with pytest.raises(ValueError, match="image_ids"):
        loss(torch.zeros(3, 4), torch.zeros(3, 4), torch.arange(4))
