import numpy as np
import pytest

from stages.core.layout import CaptionLayout
from stages.metrics.retrieval import (
    evaluate_embeddings,
    evaluate_ranks,
    fold_ranks,
    rank_metrics,
    recall_metrics,
    retrieval_ranks,
)

VARIABLE_COUNTS = [1, 3, 5, 2, 7, 1, 4, 6, 2, 5, 1, 1, 3, 7, 2, 5, 4, 1, 6, 3]


def brute_force_ranks(sims):
    """VSE++'s i2t/t2i: full argsort of the (N, 5N) similarity matrix."""
    n = sims.shape[0]
    i2t = np.zeros(n, dtype=int)
    for i in range(n):
        order = np.argsort(sims[i])[::-1]
        i2t[i] = min(np.where(order == c)[0][0] for c in range(5 * i, 5 * i + 5))
    t2i = np.zeros(5 * n, dtype=int)
    for c in range(5 * n):
        order = np.argsort(sims[:, c])[::-1]
        t2i[c] = np.where(order == c // 5)[0][0]
    return i2t, t2i


def brute_force_metrics(ranks):
    return {"r1": 100 * np.mean(ranks < 1), "r5": 100 * np.mean(ranks < 5),
            "r10": 100 * np.mean(ranks < 10), "medr": np.floor(np.median(ranks)) + 1,
            "meanr": ranks.mean() + 1}


def _embeddings(n, dim=8, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, dim)).astype(np.float32)
    cap = np.repeat(img, 5, axis=0) + noise * rng.normal(size=(5 * n, dim)).astype(np.float32)
    return img, cap


@pytest.mark.parametrize("block_size", [1, 7, 1000])
def test_ranks_match_brute_force(block_size):
    img, cap = _embeddings(40)
    i2t, t2i = retrieval_ranks(img, cap, block_size=block_size)
    want_i2t, want_t2i = brute_force_ranks(img @ cap.T)
    np.testing.assert_array_equal(i2t, want_i2t)
    np.testing.assert_array_equal(t2i, want_t2i)
    assert 0 < np.mean(i2t < 1) < 1  # neither trivial nor hopeless


def test_ensemble_averages_similarities():
    a_img, a_cap = _embeddings(30, seed=1)
    b_img, b_cap = _embeddings(30, seed=2)
    i2t, t2i = retrieval_ranks([a_img, b_img], [a_cap, b_cap], block_size=8)
    want_i2t, want_t2i = brute_force_ranks((a_img @ a_cap.T + b_img @ b_cap.T) / 2)
    np.testing.assert_array_equal(i2t, want_i2t)
    np.testing.assert_array_equal(t2i, want_t2i)


def test_metric_definitions():
    ranks = np.array([0, 0, 3, 7, 20, 1])
    m = rank_metrics(ranks)
    want = brute_force_metrics(ranks)
    for k in want:
        assert m[k] == pytest.approx(want[k])
    assert m["medr"] == 3.0  # median of 0-based ranks is 2.0 -> floor + 1
    assert rank_metrics(np.array([0, 1, 2, 3]))["medr"] == 2.0  # median 1.5 -> 2


def test_five_fold_averages_folds_and_recomputes_rsum():
    img, cap = _embeddings(50, noise=1.5)
    got = evaluate_embeddings(img, cap, folds=5, block_size=4)
    per_fold = []
    for f in range(5):
        i2t, t2i = brute_force_ranks(img[10 * f:10 * f + 10] @ cap[50 * f:50 * f + 50].T)
        per_fold.append({**{f"{k}_i2t": v for k, v in brute_force_metrics(i2t).items()},
                         **{f"{k}_t2i": v for k, v in brute_force_metrics(t2i).items()}})
    for key in per_fold[0]:
        assert got[key] == pytest.approx(np.mean([m[key] for m in per_fold]))
    recalls = [f"r{k}_{d}" for k in (1, 5, 10) for d in ("i2t", "t2i")]
    assert got["rsum"] == pytest.approx(sum(np.mean([m[r] for m in per_fold]) for r in recalls))
    whole = evaluate_embeddings(img, cap, folds=1)
    assert whole["r1_i2t"] != got["r1_i2t"]  # 1K-style folds are easier than the whole


def test_bad_shapes():
    img, cap = _embeddings(10)
    with pytest.raises(ValueError, match="expected 50 captions"):
        retrieval_ranks(img, cap[:-1])
    with pytest.raises(ValueError, match="equal folds"):
        evaluate_embeddings(img, cap, folds=3)


def test_five_per_image_gives_the_numbers_it_gave_before_layouts():
    """Figures of the code that assumed 5 captions per image (commit 109b1ce), with no
    layout given and with the uniform one."""
    img, cap = _embeddings(50, noise=1.5)
    whole = {"r1_i2t": 34.0, "r5_i2t": 78.0, "r10_i2t": 88.0, "medr_i2t": 2.0,
             "meanr_i2t": 5.58, "r1_t2i": 19.2, "r5_t2i": 55.6, "r10_t2i": 74.8,
             "medr_t2i": 4.0, "meanr_t2i": 8.044, "rsum": 349.6}
    folds = {"r1_i2t": 72.0, "r5_i2t": 96.0, "r10_i2t": 100.0, "medr_i2t": 1.0,
             "meanr_i2t": 1.7, "r1_t2i": 51.2, "r5_t2i": 93.6, "r10_t2i": 100.0,
             "medr_t2i": 1.4, "meanr_t2i": 2.164, "rsum": 512.8}
    for layout in (None, CaptionLayout.uniform(50, 5)):
        assert evaluate_embeddings(img, cap, layout) == pytest.approx(whole)
        assert evaluate_embeddings(img, cap, layout, folds=5, block_size=7) == \
            pytest.approx(folds)


def _owners(counts):
    """Each caption's image, by a loop over the counts."""
    owner = []
    for image, count in enumerate(counts):
        owner += [image] * count
    return owner


def loop_ranks(sims, counts):
    """Ranks by a double loop over the (N, C) similarities: the candidates that are not the
    query's own scored strictly higher than its positive; a non-finite positive ranks
    behind all of them; an image's rank is its best own caption's."""
    owner = _owners(counts)
    n, c = sims.shape

    def rank(positive, candidates):
        if not np.isfinite(positive):
            return len(candidates)
        return sum(1 for value in candidates if value > positive)

    i2t = [min(rank(sims[i, j], [sims[i, k] for k in range(c) if owner[k] != i])
               for j in range(c) if owner[j] == i) for i in range(n)]
    t2i = [rank(sims[owner[j], j], [sims[i, j] for i in range(n) if i != owner[j]])
           for j in range(c)]
    return np.array(i2t), np.array(t2i)


def _layout_embeddings(counts, dim=8, seed=0, noise=1.0, integer=False):
    """Images (N, dim) and their captions (sum(counts), dim); integer values give exact
    similarities, so many ties."""
    rng = np.random.default_rng(seed)
    if integer:
        img = rng.integers(-2, 3, size=(len(counts), dim)).astype(np.float32)
        cap = np.repeat(img, counts, axis=0) + rng.integers(-1, 2, size=(sum(counts), dim))
        return img, cap.astype(np.float32)
    img = rng.normal(size=(len(counts), dim)).astype(np.float32)
    cap = np.repeat(img, counts, axis=0) + noise * rng.normal(size=(sum(counts), dim))
    return img, cap.astype(np.float32)


@pytest.mark.parametrize("counts", [[1] * 30, VARIABLE_COUNTS, [7, 1] * 12])
@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("block_size", [1, 3, 1000])
def test_ranks_of_any_layout_match_a_double_loop(counts, integer, block_size):
    img, cap = _layout_embeddings(counts, integer=integer, noise=1.5)
    layout = CaptionLayout.from_counts(counts)
    i2t, t2i = retrieval_ranks(img, cap, layout, block_size=block_size)
    want_i2t, want_t2i = loop_ranks(img @ cap.T, counts)
    np.testing.assert_array_equal(i2t, want_i2t)
    np.testing.assert_array_equal(t2i, want_t2i)
    assert 0 < np.mean(i2t < 1) < 1 and 0 < np.mean(t2i < 1) < 1
    if integer:  # the ties are real: some negatives score exactly the positive
        sims = img @ cap.T
        own = sims[layout.owner, np.arange(len(layout.owner))]
        assert ((sims == own[None, :]).sum(axis=0) > 1).any()
    metrics = evaluate_embeddings(img, cap, layout, block_size=block_size)
    for key, value in brute_force_metrics(want_i2t).items():
        assert metrics[f"{key}_i2t"] == pytest.approx(value)
    for key, value in brute_force_metrics(want_t2i).items():
        assert metrics[f"{key}_t2i"] == pytest.approx(value)


def test_ties_and_own_captions_by_hand():
    """3 images owning 1, 2 and 1 captions; similarities chosen by hand."""
    img = np.eye(3, dtype=np.float32)
    cap = np.array([[1, 1, 0], [0, 2, 0], [0, 2, 0], [5, 0, 1]], dtype=np.float32)
    # sims (3, 4): image 0: [1, 0, 0, 5]; image 1: [1, 2, 2, 0]; image 2: [0, 0, 0, 1]
    i2t, t2i = retrieval_ranks(img, cap, CaptionLayout.from_counts([1, 2, 1]))
    # image 0: caption 3 beats its 1; image 1: its own two tie at 2, nothing beats them;
    # image 2: 1, nothing higher
    assert i2t.tolist() == [1, 0, 0]
    # caption 0: image 1 ties with its own image 0 (a tie does not count); caption 3: image
    # 0 beats image 2
    assert t2i.tolist() == [0, 0, 0, 1]


def test_a_nan_or_inf_never_scores_as_a_match():
    counts = VARIABLE_COUNTS
    layout = CaptionLayout.from_counts(counts)
    img, cap = _layout_embeddings(counts, integer=True)
    img[4] = np.nan  # a whole similarity row NaN: its 7 captions too
    cap[layout.first_caption[2]] = np.nan  # one of image 2's captions
    cap[layout.first_caption[0]] = np.nan  # image 0's only caption
    cap[layout.first_caption[7] + 1, 0] = np.inf  # +inf, -inf or NaN against each image
    i2t, t2i = retrieval_ranks(img, cap, layout, block_size=3)
    with np.errstate(invalid="ignore"):
        sims = img @ cap.T
    want_i2t, want_t2i = loop_ranks(sims, counts)
    np.testing.assert_array_equal(i2t, want_i2t)
    np.testing.assert_array_equal(t2i, want_t2i)
    num_captions, num_images = layout.num_captions, layout.num_images
    assert i2t[4] == num_captions - 7 and i2t[0] == num_captions - 1  # last
    assert (t2i[list(layout.captions_of(4))] == num_images - 1).all()
    assert t2i[0] == t2i[layout.first_caption[2]] == num_images - 1
    assert i2t[2] < num_captions - 3  # its finite captions still rank it
    ensemble = retrieval_ranks([img, img], [cap, cap], layout, block_size=3)
    np.testing.assert_array_equal(ensemble[0], i2t)
    np.testing.assert_array_equal(ensemble[1], t2i)


@pytest.mark.parametrize("counts", [[1] * 20, VARIABLE_COUNTS])
def test_an_ensemble_of_any_layout_averages_similarities(counts):
    layout = CaptionLayout.from_counts(counts)
    a_img, a_cap = _layout_embeddings(counts, seed=1, integer=True)
    b_img, b_cap = _layout_embeddings(counts, seed=2, integer=True)
    i2t, t2i = retrieval_ranks([a_img, b_img], [a_cap, b_cap], layout, block_size=4)
    want_i2t, want_t2i = loop_ranks((a_img @ a_cap.T + b_img @ b_cap.T) / 2, counts)
    np.testing.assert_array_equal(i2t, want_i2t)
    np.testing.assert_array_equal(t2i, want_t2i)


def test_folds_of_a_variable_layout_are_images_with_their_own_captions():
    counts = VARIABLE_COUNTS  # 5 folds of 4 images: 11, 12, 11, 16 and 14 captions
    layout = CaptionLayout.from_counts(counts)
    img, cap = _layout_embeddings(counts, noise=1.5)
    i2t, t2i = fold_ranks(img, cap, layout, folds=5, block_size=3)
    per_fold, starts = [], np.cumsum([0, *counts])
    want_i2t, want_t2i = [], []
    for f in range(5):
        c0, c1 = starts[4 * f], starts[4 * f + 4]
        a, b = loop_ranks(img[4 * f:4 * f + 4] @ cap[c0:c1].T, counts[4 * f:4 * f + 4])
        want_i2t.append(a)
        want_t2i.append(b)
        per_fold.append(recall_metrics(a, b))
    np.testing.assert_array_equal(i2t, np.concatenate(want_i2t))
    np.testing.assert_array_equal(t2i, np.concatenate(want_t2i))
    got = evaluate_embeddings(img, cap, layout, folds=5, block_size=3)
    assert got == evaluate_ranks(i2t, t2i, layout, folds=5)
    for key in per_fold[0]:
        if key != "rsum":
            assert got[key] == pytest.approx(np.mean([m[key] for m in per_fold]))
    assert got["rsum"] == pytest.approx(sum(got[f"r{k}_{d}"] for k in (1, 5, 10)
                                            for d in ("i2t", "t2i")))
    # Caption-count folds (equal numbers of captions) would give other figures.
    uniform_captions = recall_metrics(i2t[:4], t2i[:len(t2i) // 5])
    assert uniform_captions != per_fold[0]


def test_a_layout_that_does_not_fit_the_embeddings_is_refused():
    img, cap = _layout_embeddings(VARIABLE_COUNTS)
    layout = CaptionLayout.from_counts(VARIABLE_COUNTS)
    with pytest.raises(ValueError, match=f"expected {len(cap)} captions for 20 images"):
        retrieval_ranks(img, cap[:-1], layout)
    with pytest.raises(ValueError, match="expected 100 captions for 20 images"):
        retrieval_ranks(img, cap)  # no layout: 5 per image
    with pytest.raises(ValueError, match="equal folds"):
        fold_ranks(img, cap, layout, folds=3)
    with pytest.raises(ValueError, match="ranks for CaptionLayout"):
        evaluate_ranks(np.zeros(20), np.zeros(len(cap) - 1), layout)
