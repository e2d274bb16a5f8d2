import pytest
import torch

from stages.losses import build_loss
from stages.losses.base import Similarities
from tests.losses.helpers import total
from tests.losses.naive import check_against_naive, make_case


def naive_random(case, seed, draw, margin):
    """Draw ``draw`` of the documented protocol, one query at a time."""
    extra_caps = 0 if case.extra is None else len(case.extra.captions)
    extra_imgs = 0 if case.extra is None else len(case.extra.images)
    widths = {"i2t": len(case.ids) + extra_caps, "t2i": len(case.ids) + extra_imgs}

    def run(queries):
        generator = torch.Generator().manual_seed((seed * 0x9E3779B1 + draw) % 2**32)
        value = torch.zeros((), dtype=torch.float64)
        for name in ("i2t", "t2i"):
            rows = queries[name]
            u = torch.rand((len(rows), widths[name]), generator=generator)
            for k, (positive, negatives) in enumerate(rows):
                if negatives:  # the valid negative with the largest draw, the first on a tie
                    _, negative = max(negatives, key=lambda js: u[k, js[0]].item())
                    value = value + torch.clamp(margin + negative - positive, min=0)
        return value
    return run


@pytest.mark.parametrize("mask_same_image", [False, True])
@pytest.mark.parametrize("with_extra", [False, True])
def test_matches_naive_loop_draw_after_draw(mask_same_image, with_extra):
    case = make_case(with_extra)
    loss = build_loss("triplet_random", {"margin": 0.5, "seed": 3,
                                         "mask_same_image": mask_same_image}).double()
    for draw in range(3):
        check_against_naive("triplet_random", {}, naive_random(case, 3, draw, 0.5), case,
                            mask_same_image, loss=loss)
    assert int(loss.draws) == 3


def _single_query(negatives, masked):
    """Similarities of one image query: positive 0.5, the given negatives, then the masked
    references; its caption query has no negative."""
    row = torch.tensor([[0.5, *negatives, *masked]])
    mask = torch.tensor([[True] + [False] * len(negatives) + [True] * len(masked)])
    return Similarities(torch.tensor([0.5]), row, torch.tensor([[0.5]]), mask,
                        torch.tensor([[True]]))


def test_draws_are_uniform_over_the_valid_negatives_only():
    loss = build_loss("triplet_random", {"margin": 1.0})
    sims = _single_query([0.1, 0.2, 0.3], masked=[0.9, 0.95])
    counts = {}
    for _ in range(3000):
        terms = loss.compute(sims)
        assert terms["t2i"].item() == 0.0
        value = round(terms["i2t"].item(), 4)
        counts[value] = counts.get(value, 0) + 1
    assert set(counts) == {0.6, 0.7, 0.8}  # never a masked reference (1.4, 1.45)
    assert all(900 < c < 1100 for c in counts.values()), counts  # 1000 each, sd 26


def test_resumed_state_draws_what_the_uninterrupted_run_would():
    case = make_case()
    running = build_loss("triplet_random").double()
    for _ in range(3):
        running(case.img, case.cap, case.ids, extra=case.extra)
    resumed = build_loss("triplet_random").double()
    resumed.load_state_dict(running.state_dict())
    fresh = build_loss("triplet_random").double()
    a = total(running(case.img, case.cap, case.ids, extra=case.extra))
    b = total(resumed(case.img, case.cap, case.ids, extra=case.extra))
    c = total(fresh(case.img, case.cap, case.ids, extra=case.extra))
    assert a.item() == b.item()
    assert a.item() != c.item()


def test_leaves_the_global_rng_alone_and_the_seed_matters():
    case = make_case()
    state = torch.get_rng_state()
    values = [total(build_loss("triplet_random", {"seed": s}).double()(
        case.img, case.cap, case.ids, extra=case.extra)).item() for s in (0, 1)]
    assert torch.equal(state, torch.get_rng_state())
    assert values[0] != values[1]
