"""Mining, candidate files, the false-negative filters, the sampler and the diagnostics for
splits of 1 caption per image and of a different number per image, against brute force
and naive per-caption loops."""

import types
from pathlib import Path

import h5py
import numpy as np
import pytest

from stages.config.sections import OffcandiConfig
from stages.core.counter_hash import counter_hash, splitmix64
from stages.core.errors import UserError
from stages.core.layout import CaptionLayout
from stages.mining.candidate_files import load_candidates, positives_present
from stages.mining.embedding_files import Embeddings, write_embeddings
from stages.mining.hardness import (
    RoundStats,
    image_means,
    offline_scores,
    online_hardest,
    positive_ranks,
)
from stages.mining.mine import drop_positives, mine_arrays
from stages.mining.sampler import OfflineNegativeSampler
from stages.mining.selection import (
    NO_FILTERS,
    CaptionWords,
    Selection,
    SelectionRules,
    drop_reasons,
    duplicate_scores,
    load_selections,
    sampling_windows,
    select,
)
from stages.pipeline.import_candidates import _import_direction
from stages.pipeline.inspect import inspect_caption, inspect_image
from stages.pipeline.offcandi import offcandi
from stages.pipeline.plot import quantity_names, rank_figure
from tests.test_negative_selection import random_captions, set_jaccard

# A varied layout: 1 to 11 captions per image (11 > the 8 own captions one word table holds).
VARIED = [1, 3, 5, 2, 7, 1, 4, 6, 1, 2, 11, 3, 5, 1, 2, 7, 3, 1, 5, 4]
LAYOUTS = {"one": CaptionLayout.uniform(24, 1), "varied": CaptionLayout.from_counts(VARIED)}


def layout_embeddings(layout, dim=12, noise=0.8, seed=0):
    """Unit-norm images (N, dim) and captions (C, dim), each caption near its image."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(layout.num_images, dim)).astype(np.float32)
    cap = img[layout.owner] + noise * rng.normal(size=(layout.num_captions, dim))
    cap = cap.astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    cap /= np.linalg.norm(cap, axis=1, keepdims=True)
    return img, cap


def owner_loop(layout):
    """Each caption's image, by walking the counts."""
    return [i for i, k in enumerate(layout.counts) for _ in range(k)]


def brute_force(img, cap, layout, k_i2t, k_t2i):
    owner = owner_loop(layout)
    sims = img @ cap.T
    i2t = [[c for c in np.argsort(-sims[i], kind="stable") if owner[c] != i][:k_i2t]
           for i in range(len(img))]
    t2i = [[i for i in np.argsort(-sims[:, c], kind="stable") if i != owner[c]][:k_t2i]
           for c in range(len(cap))]
    return np.array(i2t), np.array(t2i), sims


def write_layout_embeddings(path, img, cap, layout, dataset="var", weights="w0"):
    write_embeddings(path, img, cap, {"checkpoint": "ck.pt", "weights": weights,
                                      "dataset": dataset, "split": "train",
                                      "num_images": len(img), "train_captions_sha256": "x"},
                     layout)
    return path


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("block_size", [5, 4096])
def test_mine_arrays_matches_brute_force(name, block_size):
    layout = LAYOUTS[name]
    img, cap = layout_embeddings(layout)
    k_i2t, k_t2i = 9, 4
    mined = mine_arrays(img, cap, k_i2t, k_t2i, block_size=block_size, layout=layout)
    want_i2t, want_t2i, sims = brute_force(img, cap, layout, k_i2t, k_t2i)
    (i2t, i2t_scores), (t2i, t2i_scores) = mined["i2t"], mined["t2i"]
    assert i2t.shape == (layout.num_images, k_i2t) and t2i.shape == (layout.num_captions, k_t2i)
    np.testing.assert_array_equal(i2t, want_i2t)
    np.testing.assert_array_equal(t2i, want_t2i)
    np.testing.assert_allclose(i2t_scores, np.take_along_axis(sims, i2t, 1), atol=1e-5)
    np.testing.assert_allclose(t2i_scores, np.take_along_axis(sims.T, t2i, 1), atol=1e-5)
    owner = owner_loop(layout)
    for i, row in enumerate(i2t):
        assert all(owner[c] != i for c in row)
    for c, row in enumerate(t2i):
        assert owner[c] not in row


def test_every_own_caption_is_dropped_even_when_all_are_the_nearest():
    """An image of 11 captions all equal to it: the search fetches K + 11, none stays."""
    layout = LAYOUTS["varied"]
    img, cap = layout_embeddings(layout, noise=0.0)  # every positive a perfect match
    mined = mine_arrays(img, cap, k_i2t=6, k_t2i=3, layout=layout)
    for direction in ("i2t", "t2i"):
        assert not positives_present(direction, mined[direction][0], layout).any()
    assert (mined["i2t"][1][:, 0] < 0.99).all()  # the next best, not a positive
    with pytest.raises(UserError, match=f"i2t: K=.* more than the {len(cap) - 11} negatives"):
        mine_arrays(img, cap, k_i2t=len(cap) - 10, k_t2i=3, layout=layout)
    with pytest.raises(ValueError, match="captions"):
        mine_arrays(img, cap[:-1], 3, 2, layout=layout)
    with pytest.raises(ValueError, match="captions"):
        mine_arrays(img, cap, 3, 2)  # 5 per image when no layout is given


def test_drop_positives_by_owner():
    layout = CaptionLayout.from_counts([2, 1, 3])
    ids = np.array([[2, 0, 5, 1, 3, -1], [1, 2, 4, 0, 5, 3]])  # captions, for images 0, 1
    kept, scores = drop_positives("i2t", 0, ids, ids.astype(float), 3, layout)
    assert kept.tolist() == [[2, 5, 3], [1, 4, 0]]
    np.testing.assert_array_equal(scores, kept)


@pytest.mark.parametrize("name", LAYOUTS)
def test_offcandi_files_hold_the_layout_and_exact_positive_scores(tmp_path, name):
    layout = LAYOUTS[name]
    img, cap = layout_embeddings(layout, seed=3)
    emb = write_layout_embeddings(tmp_path / "e.h5", img, cap, layout)
    offcandi(emb, tmp_path / "out", OffcandiConfig(k_i2t=8, k_t2i=3, block_size=7))
    want_i2t, want_t2i, sims = brute_force(img, cap, layout, 8, 3)
    owner = owner_loop(layout)
    want_positive = {"i2t": [np.mean([sims[i, c] for c in range(len(cap)) if owner[c] == i])
                             for i in range(len(img))],
                     "t2i": [sims[owner[c], c] for c in range(len(cap))]}
    for direction, want in (("i2t", want_i2t), ("t2i", want_t2i)):
        c = load_candidates(tmp_path / "out", direction, "var", "train", len(img), min_k=3,
                            with_scores=True, layout=layout)
        assert c.layout == layout and c.attrs["num_captions"] == len(cap)
        assert "captions_per_image" not in c.attrs
        np.testing.assert_array_equal(c.indices, want)
        np.testing.assert_allclose(c.positive_scores, want_positive[direction], atol=1e-5)
    # The same images with another caption layout: refused, it was mined on other data.
    other = CaptionLayout.uniform(len(img), 2 if name == "one" else 5)
    with pytest.raises(UserError, match="mined on other data: .* re-mine"):
        load_candidates(tmp_path / "out", "t2i", "var", "train", len(img), min_k=3,
                        layout=other)
    # Training refuses them for a split of another layout before it samples.
    split = types.SimpleNamespace(name="train", num_images=len(img), layout=other)
    with pytest.raises(UserError, match="mined on other data"):
        load_selections(tmp_path / "out", "var", split, 3, "", NO_FILTERS, None)
    split.layout = layout
    selections, _ = load_selections(tmp_path / "out", "var", split, 3, "", NO_FILTERS, None)
    assert len(selections["t2i"].indices) == layout.num_captions


def test_a_file_whose_layout_does_not_add_up_is_refused(tmp_path):
    layout = LAYOUTS["varied"]
    img, cap = layout_embeddings(layout)
    offcandi(write_layout_embeddings(tmp_path / "e.h5", img, cap, layout), tmp_path / "out",
             OffcandiConfig(k_i2t=4, k_t2i=2))
    with h5py.File(tmp_path / "out" / "t2i.h5", "r+") as f:
        f.attrs["num_captions"] = len(cap) + 1
    with pytest.raises(UserError, match="do not match its caption layout"):
        load_candidates(tmp_path / "out", "t2i", "var", "train", len(img), min_k=2)


def test_legacy_files_hold_five_per_image(tmp_path):
    """Files written before layouts were stored (no num_captions, no layout) read as 5."""
    layout = CaptionLayout.uniform(10)
    img, cap = layout_embeddings(layout)
    offcandi(write_layout_embeddings(tmp_path / "e.h5", img, cap, layout), tmp_path / "out",
             OffcandiConfig(k_i2t=4, k_t2i=2))
    with h5py.File(tmp_path / "out" / "i2t.h5", "r+") as f:
        del f.attrs["num_captions"], f.attrs["captions_per_image"]
    c = load_candidates(tmp_path / "out", "i2t", "var", "train", 10, min_k=2, layout=layout)
    assert c.layout == layout


def test_import_checks_shapes_and_positives_by_the_layout(tmp_path):
    layout = LAYOUTS["varied"]
    img, cap = layout_embeddings(layout)
    mined = mine_arrays(img, cap, 6, 3, layout=layout)
    split = types.SimpleNamespace(name="train", num_images=len(img), layout=layout)
    for direction in ("i2t", "t2i"):
        path = tmp_path / f"{direction}.npy"
        np.save(path, mined[direction][0].astype(np.int32))
        out = _import_direction(direction, path, split, "var", "imported:x", tmp_path / "o")
        c = load_candidates(out.parent, direction, "var", "train", len(img), 3,
                            layout=layout)
        np.testing.assert_array_equal(c.indices, mined[direction][0])
    np.save(tmp_path / "five.npy", np.zeros((5 * len(img), 3), np.int32))
    with pytest.raises(UserError, match=rf"needs \({len(cap)}, K\) for t2i"):
        _import_direction("t2i", tmp_path / "five.npy", split, "var", "x", tmp_path / "o")
    own = mined["i2t"][0].copy()
    own[4, 0] = layout.starts[4] + 6  # the last of image 4's 7 captions
    np.save(tmp_path / "own.npy", own.astype(np.int32))
    with pytest.raises(UserError, match="list their own positives"):
        _import_direction("i2t", tmp_path / "own.npy", split, "var", "x", tmp_path / "o")


# --- the duplicate filter ------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["i2t", "t2i"])
@pytest.mark.parametrize("block", [3, 256])
def test_duplicate_scores_match_python_sets(direction, block):
    layout = LAYOUTS["varied"]
    captions = random_captions(layout.num_captions, seed=5)
    img, cap = layout_embeddings(layout)
    indices = mine_arrays(img, cap, 10, 6, layout=layout)[direction][0]
    got = duplicate_scores(direction, indices, CaptionWords(captions), layout, block=block)
    for q, row in enumerate(indices):
        for j, cand in enumerate(row):
            if direction == "i2t":
                pairs = [(a, cand) for a in layout.captions_of(q)]
            else:
                pairs = [(q, b) for b in layout.captions_of(cand)]
            want = max(set_jaccard(captions[a], captions[b]) for a, b in pairs)
            assert got[q, j] == pytest.approx(want, abs=1e-6), (q, j)
    assert (got > 0).any()


def test_duplicate_filter_marks_a_nearly_repeated_caption_of_a_large_image():
    """The anchor image's 10th caption (past the first word table) repeats a candidate's."""
    layout = CaptionLayout.from_counts([11, 1, 2])
    captions = [f"w{j} x{j}" for j in range(11)] + ["a dog in snow", "cat", "tree"]
    captions[9] = "a dog in the snow"
    c = types.SimpleNamespace(indices=np.array([[11, 12, 13]]), layout=layout, scores=None,
                              positive_scores=None, path="i2t.h5")
    reasons = drop_reasons("i2t", c, SelectionRules(duplicate_overlap=0.75),
                           CaptionWords(captions))
    assert reasons.tolist() == [[8, 0, 0]]  # 4 of 5 words shared: 0.8


# --- the sampler ---------------------------------------------------------------------------

def random_candidates(layout, k_i2t, k_t2i, seed=0):
    """Candidates as offcandi makes them, of random rankings: positives dropped."""
    rng = np.random.default_rng(seed)
    n, c = layout.num_images, layout.num_captions
    i2t_ranked = np.argsort(rng.random((n, c)), axis=1)
    t2i_ranked = np.argsort(rng.random((c, n)), axis=1)
    i2t, _ = drop_positives("i2t", 0, i2t_ranked, np.zeros(i2t_ranked.shape), k_i2t, layout)
    t2i, _ = drop_positives("t2i", 0, t2i_ranked, np.zeros(t2i_ranked.shape), k_t2i, layout)
    return i2t, t2i


def reference_draw(layout, i2t, t2i, hardest, seed, epoch, c):
    """The draw for caption c, one caption at a time: n ~ U{0..h-1}, T' = i2t[i][n],
    I' = t2i[c][n // k_i], T'' = caption (second word mod k') of I', I'' = T''s image."""
    counts = list(layout.counts)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    owner = owner_loop(layout)
    word = counter_hash(seed, epoch, np.array([c]))
    n = int(word[0] % np.uint64(hardest))
    i = owner[c]
    t1 = int(i2t[i][n])
    i1 = int(t2i[c][n // counts[i]])
    which = int(splitmix64(word)[0] % np.uint64(counts[i1]))
    return t1, i1, starts[i1] + which, owner[t1]


@pytest.mark.parametrize("name", LAYOUTS)
def test_sampler_draws_the_reference_formula(name):
    layout = LAYOUTS[name]
    h = 12
    need_t2i = -(-h // layout.min_per_image)  # 12 columns: some image has 1 caption
    i2t, t2i = random_candidates(layout, 20, need_t2i)
    sampler = OfflineNegativeSampler(Selection.unfiltered(i2t), Selection.unfiltered(t2i), h,
                                     seed=4, layout=layout)
    captions = np.arange(layout.num_captions)
    for epoch in range(2):
        sampler.epoch = epoch
        d = sampler.draw(captions[::-1].tolist())
        for row, c in enumerate(captions[::-1]):
            got = (d["captions"][row], d["images"][row], d["captions2"][row],
                   d["images2"][row])
            assert got == reference_draw(layout, i2t, t2i, h, 4, epoch, int(c)), (epoch, c)
    owner = layout.owner
    d = sampler.draw(captions.tolist())
    assert (owner[d["captions"]] != owner[captions]).all()
    assert (d["images"] != owner[captions]).all()
    assert (owner[d["captions2"]] == d["images"]).all()
    with pytest.raises(ValueError, match=f"need K >= 12 .* and >= {need_t2i}"):
        OfflineNegativeSampler(Selection.unfiltered(i2t), Selection.unfiltered(t2i[:, :-1]),
                               h, seed=4, layout=layout)
    with pytest.raises(ValueError, match="captions .* for a split of"):
        OfflineNegativeSampler(Selection.unfiltered(i2t), Selection.unfiltered(t2i[:-1]),
                               h, seed=4, layout=layout)


def test_sampler_reaches_every_caption_of_a_negative_image():
    """T'' is drawn over all k' captions of I', for images of 1 to 11 captions."""
    layout = LAYOUTS["varied"]
    i2t, t2i = random_candidates(layout, 12, 12)
    sampler = OfflineNegativeSampler(Selection.unfiltered(i2t), Selection.unfiltered(t2i), 12,
                                     seed=0, layout=layout)
    seen = {}
    for epoch in range(40):
        sampler.epoch = epoch
        d = sampler.draw(list(range(layout.num_captions)))
        for image, caption in zip(d["images"], d["captions2"], strict=True):
            seen.setdefault(int(image), set()).add(int(caption))
    assert any(layout.counts[i] == 11 for i in seen)
    for image, captions in seen.items():
        assert captions <= set(layout.captions_of(image))
        if layout.counts[image] <= 3:  # drawn often enough to see every caption
            assert captions == set(layout.captions_of(image)), image


def test_filtered_draws_keep_each_captions_own_window():
    """Under the filters a caption of an image of k captions draws from the first
    ceil(h / k) kept t2i candidates (all of them over enough epochs), nothing else."""
    layout = LAYOUTS["varied"]
    h = 6
    i2t, t2i = random_candidates(layout, 14, 10, seed=2)
    rng = np.random.default_rng(1)
    reasons = {d: (rng.random(x.shape) < 0.3).astype(np.uint8) for d, x in
               (("i2t", i2t), ("t2i", t2i))}
    sel = {d: Selection.from_reasons(x, reasons[d]) for d, x in (("i2t", i2t), ("t2i", t2i))}
    sampler = OfflineNegativeSampler(sel["i2t"], sel["t2i"], h, seed=1, layout=layout)
    windows = sampling_windows(layout, h)
    assert windows["t2i"].tolist() == [-(-h // k) for k in layout.counts[layout.owner]]
    seen = {c: set() for c in range(layout.num_captions)}
    for epoch in range(150):
        sampler.epoch = epoch
        d = sampler.draw(list(range(layout.num_captions)))
        for c, image in enumerate(d["images"]):
            seen[c].add(int(image))
    for c, got in seen.items():
        kept = t2i[c][reasons["t2i"][c] == 0]
        window = -(-h // layout.counts[layout.owner[c]])
        want = set(kept[:window].tolist()) if len(kept) else {int(t2i[c, -1])}
        assert got == want, c


def test_select_reports_per_row_windows(caplog):
    layout = LAYOUTS["varied"]
    i2t, t2i = random_candidates(layout, 14, 10)
    c = types.SimpleNamespace(indices=t2i, k=10, path="t2i.h5", layout=layout)
    windows = sampling_windows(layout, 6)["t2i"]
    with caplog.at_level("INFO"):
        s = select("t2i", c, SelectionRules(skip_top=5), windows)
    assert (s.counts == 5).all()
    assert "keep fewer than the 1-6 sampled from" in caplog.text


# --- the diagnostics (aoq plot) and aoq inspect -------------------------------------------

def test_positive_ranks_and_online_hardest_match_loops(tmp_path):
    layout = LAYOUTS["varied"]
    img, cap = layout_embeddings(layout, noise=2.0, seed=6)
    owner = owner_loop(layout)
    sims = img @ cap.T
    sample = np.array([0, 4, 10, 13])
    path = write_layout_embeddings(tmp_path / "e.h5", img, cap, layout)
    with h5py.File(path, "r") as f:
        i2t, t2i = positive_ranks(img, f["captions"], layout, sample, block_size=4)
        got = online_hardest(img, f["captions"], layout, 8, 3, seed=2, block_size=5)
    want_i2t, want_t2i = [], []
    for i in sample:
        own = [c for c in range(len(cap)) if owner[c] == i]
        best = max(sims[i, c] for c in own)
        want_i2t.append(sum(sims[i, c] > best for c in range(len(cap)) if owner[c] != i))
        for c in own:
            want_t2i.append(sum(sims[j, c] > sims[i, c] for j in range(len(img)) if j != i))
    assert i2t.tolist() == want_i2t and t2i.tolist() == want_t2i
    assert max(want_i2t) > 0
    picked = np.random.default_rng(2).permutation(len(cap))[:24]
    want = []
    for b in range(3):
        ids = picked[8 * b:8 * b + 8]
        for x in ids:
            others = [y for y in ids if owner[y] != owner[x]]
            if others:
                want.append(max(img[owner[x]] @ cap[y] for y in others))
    np.testing.assert_allclose(got["i2t"], want, atol=1e-5)
    np.testing.assert_allclose(image_means(sims[owner, np.arange(len(cap))], layout),
                               [np.mean([sims[i, c] for c in layout.captions_of(i)])
                                for i in range(len(img))], atol=1e-6)


def test_offline_scores_sample_each_captions_window(tmp_path):
    layout = LAYOUTS["varied"]
    img, cap = layout_embeddings(layout, seed=7)
    path = write_layout_embeddings(tmp_path / "e.h5", img, cap, layout)
    offcandi(path, tmp_path / "cand", OffcandiConfig(k_i2t=8, k_t2i=7))
    pair = (img[layout.owner] * cap).sum(1)
    with Embeddings(path) as emb:
        got = offline_scores(tmp_path / "cand", "t2i", emb, pair, hardest=7, rules=NO_FILTERS)
    with h5py.File(tmp_path / "cand" / "t2i.h5", "r") as f:
        scores = np.asarray(f["scores"])
    want = np.concatenate([scores[c, :-(-7 // layout.counts[layout.owner[c]])]
                           for c in range(layout.num_captions)])
    np.testing.assert_array_equal(got.sampled_values(), want)
    assert got.sampled.shape[1] == 7  # the widest window: images of one caption


def test_inspect_shows_each_images_own_captions(tmp_path):
    layout = LAYOUTS["varied"]
    img, cap = layout_embeddings(layout, seed=8)
    captions = [f"caption number {c} of image {i}" for c, i in enumerate(layout.owner)]
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "train_caps.txt").write_text("\n".join(captions) + "\n")
    path = write_layout_embeddings(tmp_path / "e.h5", img, cap, layout)
    offcandi(path, tmp_path / "cand", OffcandiConfig(k_i2t=8, k_t2i=4))
    text = inspect_image(tmp_path / "cand", 4, tmp_path, top=3)
    assert "image 4, its 7 captions" in text and "mean over the 7 captions" in text
    for c in layout.captions_of(4):
        assert f"+  caption {c:>7}  {captions[c]}" in text
    assert text.count(" +  caption") == 7
    with h5py.File(tmp_path / "cand" / "i2t.h5", "r") as f:
        first = int(f["indices"][4, 0])
    assert f"caption {first:>7} (image {layout.owner[first]:>6})  {captions[first]}" in text
    rules = SelectionRules(skip_top=1)
    text = inspect_caption(tmp_path / "cand", 0, tmp_path, top=2, rules=rules, hardest=6)
    assert "its image 0, which has no other caption" in text
    assert "(window 6)" in text  # ceil(6 / 1)
    with h5py.File(tmp_path / "cand" / "t2i.h5", "r") as f:
        image = int(f["indices"][0, 0])
    assert f"image {image:>7}  {captions[layout.starts[image]]}" in text
    text = inspect_caption(tmp_path / "cand", int(layout.starts[10]) + 3, tmp_path,
                           rules=rules, hardest=6)
    assert text.count(" +  caption") == 10  # the other 10 of image 10's 11
    assert "(window 1)" in text  # ceil(6 / 11)
    with h5py.File(tmp_path / "cand" / "i2t.h5", "r+") as f:
        f["indices"][4, 2] = layout.num_captions  # one past the last caption
    with pytest.raises(UserError, match=rf"row 4 lists ids outside \[0, {len(cap)}\)"):
        inspect_image(tmp_path / "cand", 4, tmp_path)


def test_plot_names_the_t2i_window_by_layout():
    assert quantity_names(8, 12, CaptionLayout.uniform(3))["t2i"]["offline_range"] == \
        "offline top 3 (sampled range)"
    assert quantity_names(8, 12, CaptionLayout.uniform(3, 1))["t2i"]["offline_range"] == \
        "offline top 12 (sampled range)"
    assert "captions of the image" in quantity_names(8, 12, LAYOUTS["varied"])["t2i"][
        "offline_range"]


@pytest.mark.parametrize("layout, captions", [
    (CaptionLayout.uniform(4, 5), "best of its 5 captions"),
    (CaptionLayout.uniform(4, 1), "its only caption"),
    (CaptionLayout.from_counts([1, 3, 2, 5]), "best of its captions")])
def test_rank_figure_titles_say_the_layouts_captions(layout, captions):
    stats = RoundStats("r1", Path("e.h5"), Path("c"), layout,
                       ranks={"i2t": np.arange(4), "t2i": np.arange(layout.num_captions)},
                       summary={"rank_sample_images": 4,
                                **{d: {"r1": 1.0, "r5": 2.0, "r10": 3.0, "medr": 2}
                                   for d in ("i2t", "t2i")}})
    i2t_axes = rank_figure([stats], layout).axes[0]
    assert f"{captions} among all captions" in i2t_axes.get_title()
