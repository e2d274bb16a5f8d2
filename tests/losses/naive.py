"""Naive references for the loss tests: a batch with extra references, and each query's
positive and negatives listed one element at a time (torch scalars from per-element dot
products, so autograd gives the naive loop's gradients)."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from stages.losses import build_loss
from stages.losses.base import References
from tests.losses.helpers import total

# Two captions of image 0 and three of image 2 in the batch; the extra references repeat
# images 0 and 2 (always masked) besides images no batch pair shows.
BATCH_IDS = [0, 0, 1, 2, 2, 2, 3, 4]
EXTRA_IMAGE_IDS = [7, 0, 8, 9, 2]
EXTRA_CAPTION_IDS = [2, 10, 11, 0, 12, 13, 0]


@dataclass
class Case:
    """``img``, ``cap`` (B, E), ``ids`` (B,) and ``extra`` (None or References with M = 5
    images and M' = 7 captions), float64, every embedding a leaf requiring grad."""

    img: torch.Tensor
    cap: torch.Tensor
    ids: torch.Tensor
    extra: References | None

    def leaves(self) -> list[torch.Tensor]:
        extra = [] if self.extra is None else [self.extra.images, self.extra.captions]
        return [self.img, self.cap, *extra]


def _unit(generator, *shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64, generator=generator), dim=-1)


def make_case(with_extra: bool = True, seed: int = 0, noise: float = 1.0) -> Case:
    """A batch of 8 pairs in 6 dimensions whose positives are similar but not always the
    most similar, so hinges are partly active."""
    g = torch.Generator().manual_seed(seed)
    img = _unit(g, len(BATCH_IDS), 6)
    cap = F.normalize(img + noise * torch.randn(img.shape, dtype=torch.float64, generator=g),
                      dim=1)
    extra = None
    if with_extra:
        extra = References(_unit(g, len(EXTRA_IMAGE_IDS), 6).requires_grad_(),
                           torch.tensor(EXTRA_IMAGE_IDS),
                           _unit(g, len(EXTRA_CAPTION_IDS), 6).requires_grad_(),
                           torch.tensor(EXTRA_CAPTION_IDS))
    return Case(img.requires_grad_(), cap.requires_grad_(), torch.tensor(BATCH_IDS), extra)


def naive_queries(case: Case, mask_same_image: bool) -> dict[str, list]:
    """For "i2t" and "t2i": per query k, ``(s_pos, [(column j, s_neg), ...])``, the columns
    counted over the reference list [batch's other side, extra references]."""
    ids = case.ids.tolist()
    size = len(ids)
    extra_caps = [] if case.extra is None else list(zip(case.extra.captions,
                                                        case.extra.caption_image_ids.tolist(),
                                                        strict=True))
    extra_imgs = [] if case.extra is None else list(zip(case.extra.images,
                                                        case.extra.image_ids.tolist(),
                                                        strict=True))
    out = {}
    for name, queries, others, extra in (("i2t", case.img, case.cap, extra_caps),
                                         ("t2i", case.cap, case.img, extra_imgs)):
        rows = []
        for k in range(size):
            positive = (queries[k] * others[k]).sum()
            negatives = []
            for j in range(size):
                if j == k or (mask_same_image and ids[j] == ids[k]):
                    continue
                negatives.append((j, (queries[k] * others[j]).sum()))
            for m, (emb, image_id) in enumerate(extra):
                if image_id != ids[k]:
                    negatives.append((size + m, (queries[k] * emb).sum()))
            rows.append((positive, negatives))
        out[name] = rows
    return out


def check_against_naive(name: str, options: dict, naive_total, case: Case,
                        mask_same_image: bool, loss=None) -> torch.nn.Module:
    """Assert that loss ``name`` (built with ``options``, or ``loss``) gives the value and
    the gradients of ``naive_total(naive_queries(...)) -> scalar`` on ``case``."""
    if loss is None:
        loss = build_loss(name, {**options, "mask_same_image": mask_same_image}).double()
    got = total(loss(case.img, case.cap, case.ids, extra=case.extra))
    want = naive_total(naive_queries(case, mask_same_image))
    assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    got_grads = torch.autograd.grad(got, case.leaves(), allow_unused=True)
    want_grads = torch.autograd.grad(want, case.leaves(), allow_unused=True)
    for leaf, g, w in zip(case.leaves(), got_grads, want_grads, strict=True):
        g = torch.zeros_like(leaf) if g is None else g
        w = torch.zeros_like(leaf) if w is None else w
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    return loss
