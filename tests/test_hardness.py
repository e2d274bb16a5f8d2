"""The numbers behind `aoq plot`, against brute force on tiny embeddings."""

import h5py
import numpy as np
import pytest

from stages.config.sections import OffcandiConfig
from stages.core.layout import CaptionLayout
from stages.metrics.retrieval import rank_metrics, retrieval_ranks
from stages.mining import hardness
from stages.mining.candidate_files import write_candidates
from stages.mining.embedding_files import Embeddings
from stages.mining.hardness import (
    offline_scores,
    online_hardest,
    pair_scores,
    positive_ranks,
    read_rows,
    round_stats,
)
from stages.mining.selection import NO_FILTERS, SelectionRules
from stages.pipeline.offcandi import offcandi
from tests.test_offcandi import random_embeddings, write_embeddings


def noisy_embeddings(n, dim=8, noise=2.0, seed=4):
    """Unit-norm embeddings whose positives are often outranked."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, dim)).astype(np.float32)
    cap = np.repeat(img, 5, axis=0) + noise * rng.normal(size=(5 * n, dim)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    cap /= np.linalg.norm(cap, axis=1, keepdims=True)
    return img, cap


@pytest.fixture
def emb_file(tmp_path):
    img, cap = noisy_embeddings(23)
    return write_embeddings(tmp_path / "e.h5", img, cap), img, cap


def test_read_rows_and_pair_scores_match_indexing(emb_file):
    path, img, cap = emb_file
    rng = np.random.default_rng(0)
    ids = rng.integers(0, len(cap), size=50)  # unsorted, with repeats
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(read_rows(f["captions"], ids, block_size=7), cap[ids])
        image_ids = rng.integers(0, len(img), size=50)
        got = pair_scores(img, f["captions"], image_ids, ids, block_size=7, chunk=3)
    np.testing.assert_allclose(got, (img[image_ids] * cap[ids]).sum(1), atol=1e-6)


def brute_ranks(img, cap, sample):
    sims = img @ cap.T
    i2t, t2i = [], []
    for i in sample:
        best = sims[i, 5 * i:5 * i + 5].max()
        i2t.append(sum(sims[i, c] > best for c in range(len(cap)) if c // 5 != i))
        for c in range(5 * i, 5 * i + 5):
            t2i.append(sum(sims[j, c] > sims[i, c] for j in range(len(img)) if j != i))
    return np.array(i2t), np.array(t2i)


@pytest.mark.parametrize("block_size, sims_per_block", [(4, 50), (1000, 1 << 23)])
def test_positive_ranks_match_brute_force_and_the_eval_ranks(emb_file, block_size,
                                                             sims_per_block, monkeypatch):
    monkeypatch.setattr(hardness, "SIMS_PER_BLOCK", sims_per_block)  # 50: 2 captions
    path, img, cap = emb_file
    sample = np.array([0, 3, 4, 11, 22])
    with h5py.File(path, "r") as f:
        i2t, t2i = positive_ranks(img, f["captions"], CaptionLayout.uniform(23), sample,
                                  block_size=block_size)
    want_i2t, want_t2i = brute_ranks(img, cap, sample)
    np.testing.assert_array_equal(i2t, want_i2t)
    np.testing.assert_array_equal(t2i, want_t2i)
    assert i2t.max() > 0 and t2i.max() > 0  # not trivially all first
    all_i2t, all_t2i = retrieval_ranks(img, cap)
    np.testing.assert_array_equal(i2t, all_i2t[sample])
    np.testing.assert_array_equal(t2i, all_t2i.reshape(-1, 5)[sample].ravel())


@pytest.mark.parametrize("batch_size, batches", [(8, 3), (200, 5)])
def test_online_hardest_matches_a_loop(emb_file, batch_size, batches):
    path, img, cap = emb_file  # 23 images: batches of 8 often hold two captions of one image
    with h5py.File(path, "r") as f:
        got = online_hardest(img, f["captions"], CaptionLayout.uniform(23), batch_size,
                             batches, seed=5, block_size=6)
    b = min(batch_size, len(cap))
    nb = min(batches, len(cap) // b)
    picked = np.random.default_rng(5).permutation(len(cap))[:nb * b]
    want = {"i2t": [], "t2i": [], "positive": []}
    for k in range(nb):
        ids = picked[k * b:(k + 1) * b]
        for x in ids:
            others = [y for y in ids if y // 5 != x // 5]
            if not others:
                continue
            want["i2t"].append(max(img[x // 5] @ cap[y] for y in others))
            want["t2i"].append(max(img[y // 5] @ cap[x] for y in others))
            want["positive"].append(img[x // 5] @ cap[x])
    for key, values in want.items():
        np.testing.assert_allclose(got[key], values, atol=1e-5)
    assert len(got["i2t"]) == nb * b
    assert (got["i2t"] < got["positive"]).any()


def test_online_hardest_leaves_out_anchors_without_another_image(tmp_path):
    img, cap = random_embeddings(1, dim=4)  # one image: no negative in any batch
    path = write_embeddings(tmp_path / "one.h5", img, cap)
    with h5py.File(path, "r") as f:
        got = online_hardest(img, f["captions"], CaptionLayout.uniform(1), 4, 2)
    assert all(len(v) == 0 for v in got.values())


@pytest.fixture
def mined(emb_file, tmp_path):
    path, img, cap = emb_file
    offcandi(path, tmp_path / "cand", OffcandiConfig(k_i2t=12, k_t2i=6))
    return path, img, cap, tmp_path / "cand"


def stored(folder, direction):
    with h5py.File(folder / f"{direction}.h5", "r") as f:
        return np.asarray(f["indices"]), np.asarray(f["scores"])


@pytest.mark.parametrize("direction, keep", [("i2t", 5), ("t2i", 1)])
def test_offline_scores_read_or_rescored_agree(mined, tmp_path, direction, keep):
    path, img, cap, folder = mined
    indices, scores = stored(folder, direction)
    pair_positive = (np.repeat(img, 5, axis=0) * cap).sum(1)
    with Embeddings(path) as emb:
        got = offline_scores(folder, direction, emb, pair_positive, hardest=5,
                             rules=NO_FILTERS)
        assert not got.rescored
        np.testing.assert_array_equal(got.top1, scores[:, 0])
        np.testing.assert_array_equal(got.sampled, scores[:, :keep])
        # The same candidates imported without scores are scored from the embeddings.
        with h5py.File(folder / f"{direction}.h5", "r") as f:
            attrs = dict(f.attrs)
        write_candidates(tmp_path / "imp" / f"{direction}.h5", indices, None,
                         {**attrs, "weights": "imported:x", "index": "imported"},
                         CaptionLayout.uniform(23))
        again = offline_scores(tmp_path / "imp", direction, emb, pair_positive, 5,
                               NO_FILTERS)
    assert again.rescored
    np.testing.assert_allclose(again.sampled, got.sampled, atol=1e-5)
    want_positive = pair_positive.reshape(-1, 5).mean(1) if direction == "i2t" \
        else pair_positive
    np.testing.assert_allclose(got.positive, want_positive, atol=1e-6)


def test_the_sampled_range_is_the_first_candidates_the_filters_keep(mined):
    path, img, cap, folder = mined
    _, scores = stored(folder, "i2t")
    pair_positive = (np.repeat(img, 5, axis=0) * cap).sum(1)
    positive = pair_positive.reshape(-1, 5).mean(1)
    rules = SelectionRules(ratio=0.5, skip_top=1)
    with Embeddings(path) as emb:
        got = offline_scores(folder, "i2t", emb, pair_positive, hardest=5, rules=rules)
    for q in range(len(scores)):
        kept = [j for j in range(12) if j >= 1 and scores[q, j] <= 0.5 * positive[q]]
        assert got.dropped[q] == 12 - len(kept)
        want = [scores[q, kept[min(j, len(kept) - 1)]] for j in range(5)] if kept \
            else [scores[q, -1]] * 5  # none kept: the last, as the sampler
        np.testing.assert_array_equal(got.sampled[q], want)
    assert (got.dropped > 1).any()


def test_round_stats_summary(mined):
    path, img, cap, folder = mined
    stats = round_stats(path, folder, "round 1", batch_size=8, hardest=5,
                        rank_sample=10, online_batches=4, seed=1)
    sample = np.sort(np.random.default_rng(1).choice(23, size=10, replace=False))
    want_i2t, want_t2i = brute_ranks(img, cap, sample)
    np.testing.assert_array_equal(stats.ranks["i2t"], want_i2t)
    s = stats.summary
    assert s["rank_sample_images"] == 10 and s["online_anchors"] == 32
    assert s["t2i"]["r1"] == rank_metrics(want_t2i)["r1"]
    assert s["i2t"]["medr"] == rank_metrics(want_i2t)["medr"]
    np.testing.assert_allclose(stats.values["i2t"]["positive"],
                               (np.repeat(img, 5, axis=0) * cap).sum(1), atol=1e-6)
    assert stats.values["t2i"]["offline_range"].shape == (5 * 23,)  # ceil(5 / 5) per caption
    assert stats.values["i2t"]["offline_range"].shape == (23 * 5,)
    _, scores = stored(folder, "i2t")
    assert s["i2t"]["offline_top1_above_positive"] == pytest.approx(
        np.mean(scores[:, 0] > (np.repeat(img, 5, axis=0) * cap).sum(1).reshape(-1, 5).mean(1)))
