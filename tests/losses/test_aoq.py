import pytest
import torch
import torch.nn.functional as F

from stages.losses import build_loss
from tests.losses.helpers import offline_negatives, total


def _unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def naive_aoq(I, T, off, variant, m_on=0.2, m_off=0.0, alpha=0.3, beta=1.5, clamp=False):
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
        total += max(0.0, m_off + s_it1 - p) + max(0.0, m_off + s_i1t - p)
        if variant != "offtri":
            total += max(0.0, m_off + s_i1t1 - p) + max(0.0, m_off + s_i2t2 - p)
    return total


def batch(size=8, dim=6, seed=0):
    torch.manual_seed(seed)
    I = _unit(size, dim)
    T = F.normalize(I + 1.2 * torch.randn(size, dim, dtype=torch.float64), dim=1)
    off = {k: _unit(size, dim) for k in ("captions", "images", "captions2", "images2")}
    return I, T, off


@pytest.mark.parametrize("variant", ["aoq", "offquin", "offtri"])
@pytest.mark.parametrize("m_off", [0.0, 0.2])
def test_matches_naive_loop(variant, m_off):
    I, T, off = batch()
    loss = build_loss(variant, {"offline_margin": m_off})
    got = total(loss(I, T, torch.arange(8), offline=offline_negatives(off))).item()
    assert got == pytest.approx(naive_aoq(I, T, off, variant, m_off=m_off), rel=1e-10)


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
