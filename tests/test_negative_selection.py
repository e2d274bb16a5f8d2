"""False-negative-aware selection: each filter against a brute-force loop, the word overlap
against Python sets, and the sampler's window (filters, short rows, curriculum)."""

from pathlib import Path

import numpy as np
import pytest

from stages.core.counter_hash import counter_hash
from stages.core.errors import UserError
from stages.core.layout import CaptionLayout
from stages.mining.candidate_files import Candidates
from stages.mining.sampler import OfflineNegativeSampler
from stages.mining.selection import (
    DUPLICATE,
    MARGIN,
    RATIO,
    TOP,
    CaptionWords,
    Selection,
    SelectionRules,
    drop_reasons,
    duplicate_scores,
    select,
)
from tests.data.test_offline import mined_candidates

WORDS = ["a", "the", "dog", "dogs", "man", "woman", "runs", "running", "snow", "grass", "red",
         "ball", "white", "brown", "on", "in"]


def random_captions(count, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(0, 9))).capitalize() + "."
            for _ in range(count)]


def scored(n=12, k_i2t=20, k_t2i=6, seed=0):
    """Candidates of both directions with descending scores and positive scores."""
    rng = np.random.default_rng(seed)
    i2t, t2i = mined_candidates(n, k_i2t, k_t2i, seed)
    out = {}
    for direction, indices in (("i2t", i2t), ("t2i", t2i)):
        scores = -np.sort(-rng.uniform(-0.2, 0.9, indices.shape), axis=1).astype(np.float32)
        positive = rng.uniform(0.1, 0.8, len(indices)).astype(np.float32)
        out[direction] = Candidates(Path(f"{direction}.h5"), indices, {"direction": direction},
                                    CaptionLayout.uniform(n), scores, positive)
    return out


def set_jaccard(a, b):
    a, b = ({w for w in "".join(ch if ch.isalnum() else " " for ch in t.lower()).split()}
            for t in (a, b))
    return len(a & b) / len(a | b) if a | b else 0.0


def test_word_overlap_of_chosen_captions():
    """Case, punctuation and repeated words do not count; two empty captions overlap 0."""
    captions = ["A dog, a DOG!", "dog", "", "", "", "a dog runs", "", "", "", ""]
    got = duplicate_scores("i2t", np.array([[5, 6], [0, 1]]), CaptionWords(captions),
                           CaptionLayout.uniform(2))
    # image 0's captions vs caption 5 ("a dog runs": 2 of 3 words with "a dog") and 6 (empty)
    assert got[0].tolist() == pytest.approx([2 / 3, 0.0])
    # image 1's captions ("a dog runs", empties) vs caption 0 ("a dog") and 1 ("dog")
    assert got[1].tolist() == pytest.approx([2 / 3, 1 / 3])


@pytest.mark.parametrize("block", [3, 256])
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_duplicate_scores_match_a_loop(direction, block):
    c = scored(n=10)[direction]
    captions = random_captions(50, seed=3)
    got = duplicate_scores(direction, c.indices, CaptionWords(captions), c.layout,
                           block=block)
    for q in range(len(c.indices)):
        for j, cand in enumerate(c.indices[q]):
            if direction == "i2t":  # candidate caption vs the anchor image's captions
                pairs = [(captions[5 * q + s], captions[cand]) for s in range(5)]
            else:  # the anchor caption vs the candidate image's captions
                pairs = [(captions[q], captions[5 * cand + s]) for s in range(5)]
            assert got[q, j] == pytest.approx(max(set_jaccard(x, y) for x, y in pairs),
                                              abs=1e-6)


@pytest.mark.parametrize("rules", [
    SelectionRules(skip_top=3), SelectionRules(ratio=0.9), SelectionRules(margin=0.05),
    SelectionRules(duplicate_overlap=0.5),
    SelectionRules(skip_top=2, ratio=1.0, margin=0.1, duplicate_overlap=0.4)])
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_drop_reasons_match_a_loop(rules, direction):
    c = scored(n=10)[direction]
    captions = random_captions(50, seed=4)
    got = drop_reasons(direction, c, rules, CaptionWords(captions))
    overlap = duplicate_scores(direction, c.indices, CaptionWords(captions), c.layout)
    for q in range(len(c.indices)):
        for j in range(c.k):
            want = 0
            if j < rules.skip_top:
                want |= TOP
            if rules.ratio and c.scores[q, j] > rules.ratio * c.positive_scores[q]:
                want |= RATIO
            if rules.margin and c.scores[q, j] > c.positive_scores[q] - rules.margin:
                want |= MARGIN
            if rules.duplicate_overlap and overlap[q, j] >= rules.duplicate_overlap:
                want |= DUPLICATE
            assert got[q, j] == want
    assert (got > 0).any() and (got == 0).any()  # the case is not trivial


def test_score_filters_need_scores():
    c = scored()["i2t"]
    bare = Candidates(c.path, c.indices, c.attrs, c.layout)
    with pytest.raises(UserError, match="no candidate or positive scores"):
        drop_reasons("i2t", bare, SelectionRules(margin=0.1))
    assert not drop_reasons("i2t", bare, SelectionRules(skip_top=2))[:, 2:].any()


def test_selection_lists_the_kept_positions_in_rank_order():
    indices = np.arange(12).reshape(2, 6)
    reasons = np.array([[1, 0, 2, 0, 0, 8], [3, 3, 3, 3, 3, 3]], np.uint8)
    s = Selection.from_reasons(indices, reasons)
    assert s.counts.tolist() == [3, 0]
    assert s.eligible[0, :3].tolist() == [1, 3, 4]


def draws(sampler, captions, epochs):
    out = []
    for epoch in epochs:
        sampler.epoch = epoch
        out.append(sampler.draw(captions.tolist()))
    return out


def test_unfiltered_draw_is_the_reference_draw():
    n, h = 20, 15
    i2t, t2i = mined_candidates(n, 40, 8)
    sampler = OfflineNegativeSampler(Selection.unfiltered(i2t), Selection.unfiltered(t2i),
                                     h, seed=7, layout=CaptionLayout.uniform(n))
    captions = np.arange(5 * n)
    for epoch, d in enumerate(draws(sampler, captions, range(3))):
        rank = (counter_hash(7, epoch, captions) % np.uint64(h)).astype(np.int64)
        np.testing.assert_array_equal(d["captions"], i2t[captions // 5, rank])
        np.testing.assert_array_equal(d["images"], t2i[captions, rank // 5])


def test_filtered_draws_come_from_the_first_kept_candidates():
    n, h = 12, 6
    c = scored(n=n, k_i2t=20, k_t2i=6)
    rules = SelectionRules(ratio=0.95, skip_top=1)
    sel = {d: select(d, c[d], rules, w) for d, w in (("i2t", h), ("t2i", 2))}
    reasons = {d: drop_reasons(d, c[d], rules) for d in sel}
    sampler = OfflineNegativeSampler(sel["i2t"], sel["t2i"], h, seed=1,
                                     layout=CaptionLayout.uniform(n))
    captions = np.arange(5 * n)
    seen = {d: {q: set() for q in range(len(c[d].indices))} for d in sel}
    for d in draws(sampler, captions, range(60)):
        for cap in captions:
            seen["i2t"][cap // 5].add(int(d["captions"][cap]))
            seen["t2i"][cap].add(int(d["images"][cap]))
    for direction, window in (("i2t", h), ("t2i", 2)):
        for q, got in seen[direction].items():
            kept = c[direction].indices[q][reasons[direction][q] == 0]
            want = set(kept[:window].tolist()) if len(kept) else {c[direction].indices[q, -1]}
            assert got == want, (direction, q)  # every one of them drawn, nothing else
    short = sel["i2t"].counts < h
    assert short.any() and (sel["i2t"].counts > 0).any()  # rows of both kinds exercised


def test_curriculum_slides_from_the_easiest_to_the_hardest_kept():
    n, h, e = 6, 4, 3
    i2t, t2i = mined_candidates(n, 16, 4)
    sampler = OfflineNegativeSampler(Selection.unfiltered(i2t), Selection.unfiltered(t2i),
                                     h, seed=2, curriculum_epochs=e,
                                     layout=CaptionLayout.uniform(n))
    captions = np.arange(5 * n)
    for epoch in range(e + 2):
        start = (16 - h) * max(e - epoch, 0) // e
        ranks = set()
        for d in draws(sampler, captions, [epoch] * 1):
            for cap in captions:
                ranks.add(list(i2t[cap // 5]).index(d["captions"][cap]))
        assert ranks <= set(range(start, start + h)), (epoch, ranks)
    assert sampler._offset(np.array([16]), np.array([h]))[0] == 0  # past E: the hardest


def test_filters_that_leave_most_rows_empty_are_refused():
    c = scored(n=10)["i2t"]
    with pytest.raises(UserError, match="skip_top=20 skips every one of the K=20"):
        select("i2t", c, SelectionRules(skip_top=20), 6)
    with pytest.raises(UserError, match="leave no candidate for any query"):
        select("i2t", c, SelectionRules(margin=5.0), 6)  # every score > positive - 5
    assert select("i2t", c, SelectionRules(skip_top=19), 6).counts.tolist() == [1] * 10


def test_a_second_source_is_mixed_in_by_share():
    n, h = 40, 10
    a_i2t, a_t2i = mined_candidates(n, 20, 4, seed=0)
    b_i2t, b_t2i = mined_candidates(n, 20, 4, seed=1)
    first = [Selection.unfiltered(a_i2t), Selection.unfiltered(a_t2i)]
    second = (Selection.unfiltered(b_i2t), Selection.unfiltered(b_t2i))
    captions = np.arange(5 * n)
    layout = CaptionLayout.uniform(n)
    alone = OfflineNegativeSampler(*first, h, seed=3, layout=layout).draw(captions.tolist())
    for share in (0.0, 0.3, 1.0):
        d = OfflineNegativeSampler(*first, h, seed=3, mix=second, mix_share=share,
                                   layout=layout).draw(captions.tolist())
        rank = (counter_hash(3, 0, captions) % np.uint64(h)).astype(np.int64)
        from_b = d["captions"] == b_i2t[captions // 5, rank]
        from_a = d["captions"] == a_i2t[captions // 5, rank]
        assert (from_a | from_b).all()
        # a caption's two negatives come from the same source
        assert (d["images"][from_b & ~from_a] == b_t2i[captions, rank // 5][from_b & ~from_a]).all()
        if share == 0.0:
            assert all((d[k] == alone[k]).all() for k in d)  # the first source's draw, exactly
        if share == 1.0:
            assert from_b.all()
        if share == 0.3:
            assert 0.15 < (from_b & ~from_a).mean() < 0.45
