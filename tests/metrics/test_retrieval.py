import numpy as np
import pytest

from stages.metrics.retrieval import evaluate_embeddings, rank_metrics, retrieval_ranks


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
