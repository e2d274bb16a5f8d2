import pytest
import torch
import torch.nn.functional as F

from stages.losses import build_loss
from stages.losses.base import References
from tests.losses.helpers import offline_negatives, total
from tests.losses.pre_engine_aoq import pre_engine_aoq


def _unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def naive_aoq(I, T, off, variant, m_on=0.2, m_off=0.0, alpha=0.3, beta=1.5, clamp=False,
              offline_weight=1.0):
    """Straight from the paper, one batch item at a time."""
    size = I.shape[0]
    total = 0.0
    for k in range(size):
        p = float(I[k] @ T[k])
        hard_c = max(float(I[k] @ T[j]) for j in range(size) if j != k)
        hard_i = max(float(I[j] @ T[k]) for j in range(size) if j != k)
        s_it1 = float(I[k] @ off["captions"][k])
        s_i1t = float(off["images"][k] @ T[k])
        s_i1t1 = float(off["images"][k] @ off["captions"][k])
        s_i2t2 = float(off["images2"][k] @ off["captions2"][k])
        wc = beta - (s_it1 - hard_c) / alpha if variant == "aoq" else 1.0
        wi = beta - (s_i1t - hard_i) / alpha if variant == "aoq" else 1.0
        if clamp:
            wc, wi = max(wc, 0.0), max(wi, 0.0)
        total += wc * max(0.0, m_on + hard_c - p) + wi * max(0.0, m_on + hard_i - p)
        offline = max(0.0, m_off + s_it1 - p) + max(0.0, m_off + s_i1t - p)
        if variant != "offtri":
            offline += max(0.0, m_off + s_i1t1 - p) + max(0.0, m_off + s_i2t2 - p)
        total += offline_weight * offline
    return total


def batch(size=8, dim=6, seed=0):
    torch.manual_seed(seed)
    I = _unit(size, dim)
    T = F.normalize(I + 1.2 * torch.randn(size, dim, dtype=torch.float64), dim=1)
    off = {k: _unit(size, dim) for k in ("captions", "images", "captions2", "images2")}
    return I, T, off


@pytest.mark.parametrize("variant", ["aoq", "offquin", "offtri"])
@pytest.mark.parametrize("m_off, weight", [(0.0, 1.0), (0.2, 1.0), (0.2, 0.25)])
def test_matches_naive_loop(variant, m_off, weight):
    I, T, off = batch()
    loss = build_loss(variant, {"offline_margin": m_off, "offline_weight": weight})
    got = total(loss(I, T, torch.arange(8), offline=offline_negatives(off))).item()
    assert got == pytest.approx(naive_aoq(I, T, off, variant, m_off=m_off,
                                          offline_weight=weight), rel=1e-10)


def test_negative_weights_as_in_the_reference_and_clamped_option():
    I, T, off = batch(seed=3)
    # Make an offline negative far harder than any online one: w = 1.5 - (0.99 - s)/0.3 < 0.
    off["captions"] = I.clone() * 0.999 + 0.001 * off["captions"]
    off["captions"] = F.normalize(off["captions"], dim=1)
    loss = build_loss("aoq")
    sims = I @ T.t()
    hard_c = sims.masked_fill(torch.eye(8, dtype=torch.bool), float("-inf")).max(1).values
    weights = loss.adaptive_weights((I * off["captions"]).sum(1), hard_c)
    assert (weights < 0).any()
    got = total(loss(I, T, torch.arange(8), offline=offline_negatives(off))).item()
    assert got == pytest.approx(naive_aoq(I, T, off, "aoq"), rel=1e-10)
    clamped = build_loss("aoq", {"clamp_weights": True})
    got = total(clamped(I, T, torch.arange(8), offline=offline_negatives(off))).item()
    assert got == pytest.approx(naive_aoq(I, T, off, "aoq", clamp=True), rel=1e-10)


def test_detached_weights_change_only_the_gradient():
    I, T, off = batch()
    off = {k: v.clone().requires_grad_() for k, v in off.items()}
    plain = total(build_loss("aoq")(I, T, torch.arange(8), offline=offline_negatives(off)))
    detached = total(build_loss("aoq", {"detach_weights": True})(
        I, T, torch.arange(8), offline=offline_negatives(off)))
    assert plain.item() == pytest.approx(detached.item())
    g_plain = torch.autograd.grad(plain, off["captions"])[0]
    g_detached = torch.autograd.grad(detached, off["captions"])[0]
    assert not torch.allclose(g_plain, g_detached)


def test_offline_embeddings_are_required():
    I, T, _ = batch()
    with pytest.raises(ValueError, match="needs offline negatives"):
        build_loss("aoq")(I, T, torch.arange(8))


@pytest.mark.parametrize("variant", ["aoq", "offquin", "offtri"])
@pytest.mark.parametrize("options", [{}, {"clamp_weights": True}, {"detach_weights": True},
                                     {"offline_margin": 0.1, "alpha": 0.5, "beta": 1.0}])
def test_engine_version_keeps_the_pre_engine_numbers_and_gradients(variant, options):
    torch.manual_seed(5)
    I = _unit(16, 8).requires_grad_()
    T = F.normalize(I.detach() + torch.randn(16, 8, dtype=torch.float64), dim=1)
    T.requires_grad_()
    off = {k: _unit(16, 8).requires_grad_() for k in ("captions", "images", "captions2",
                                                       "images2")}
    inputs = [I, T, *off.values()]
    before = pre_engine_aoq(I, T, off, variant, **options)
    now = total(build_loss(variant, options)(I, T, torch.arange(16),
                                             offline=offline_negatives(off)))
    assert now.item() == pytest.approx(before.item(), rel=1e-12)
    grad = {"allow_unused": True, "materialize_grads": True}  # offtri leaves T'', I'' out
    for a, b in zip(torch.autograd.grad(before, inputs, **grad),
                    torch.autograd.grad(now, inputs, **grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size, ids, mask", [(1, [0], False), (3, [4, 4, 4], True)])
def test_no_in_batch_negative_gives_the_reference_finite_value(size, ids, mask):
    """A batch of one, or all captions of one image with same-image masking: the online
    terms are 0 (the reference's masked cost), only the offline terms remain."""
    I = _unit(size, 6).requires_grad_()
    T = _unit(size, 6).requires_grad_()
    off = {k: _unit(size, 6).requires_grad_() for k in ("captions", "images", "captions2",
                                                         "images2")}
    terms = build_loss("aoq", {"mask_same_image": mask})(
        I, T, torch.tensor(ids), offline=offline_negatives(off))
    assert terms["online_i2t"].item() == 0 and terms["online_t2i"].item() == 0
    p = (I * T).sum(1)
    want = sum(((x * y).sum(1) - p).clamp(min=0).sum()
               for x, y in ((I, off["captions"]), (off["images"], T),
                            (off["images"], off["captions"]),
                            (off["images2"], off["captions2"])))
    assert total(terms).item() == pytest.approx(want.item())
    grads = torch.autograd.grad(total(terms), [I, T, *off.values()])
    assert all(torch.isfinite(g).all() for g in grads)


def test_memory_bank_references_join_the_online_hardest():
    I, T, off = batch()
    loss = build_loss("aoq")
    bank_caption = I[2:3].clone()  # a near-copy of image 2: its hardest caption, once banked
    extra = References(torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long),
                       bank_caption, torch.tensor([99]))
    plain = loss(I, T, torch.arange(8), offline=offline_negatives(off))
    banked = loss(I, T, torch.arange(8), extra=extra, offline=offline_negatives(off))
    assert banked["online_i2t"].item() != plain["online_i2t"].item()
    assert banked["offline"].item() == plain["offline"].item()
    masked = loss(I, T, torch.arange(8), offline=offline_negatives(off),
                  extra=References(extra.images, extra.image_ids, bank_caption,
                                   torch.tensor([2])))  # image 2's own: never a negative
    assert masked["online_i2t"].item() != banked["online_i2t"].item()
