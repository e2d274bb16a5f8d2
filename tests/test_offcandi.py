import h5py
import numpy as np
import pytest

import stages.mining.mine as mine_module
from stages.config.sections import OffcandiConfig, load_config
from stages.core.errors import UserError
from stages.core.layout import CaptionLayout
from stages.mining.candidate_files import load_candidates, positives_present
from stages.pipeline.import_candidates import import_published
from stages.pipeline.offcandi import offcandi
from stages.pipeline.stamps import read_record, settings_text
from tests.run_helpers import published_style


def write_embeddings(path, images, captions, dataset="tiny", weights="w0"):
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images)
        f.create_dataset("captions", data=captions)
        f.attrs.update({"format": "aoq-embeddings", "checkpoint": "ck.pt", "weights": weights,
                        "dataset": dataset, "split": "train", "num_images": len(images),
                        "train_captions_sha256": "x"})
    return path


def random_embeddings(n, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, dim)).astype(np.float32)
    cap = np.repeat(img, 5, axis=0) + 0.7 * rng.normal(size=(5 * n, dim)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    cap /= np.linalg.norm(cap, axis=1, keepdims=True)
    return img, cap


def brute_force(img, cap, k_i2t, k_t2i):
    sims = img @ cap.T
    i2t = np.empty((len(img), k_i2t), dtype=np.int64)
    for i in range(len(img)):
        order = [c for c in np.argsort(-sims[i], kind="stable") if c // 5 != i]
        i2t[i] = order[:k_i2t]
    t2i = np.empty((len(cap), k_t2i), dtype=np.int64)
    for c in range(len(cap)):
        order = [i for i in np.argsort(-sims[:, c], kind="stable") if i != c // 5]
        t2i[c] = order[:k_t2i]
    return i2t, t2i, sims


def read(path):
    with h5py.File(path, "r") as f:
        return np.asarray(f["indices"]), np.asarray(f["scores"]), dict(f.attrs)


def read_positive_scores(path):
    with h5py.File(path, "r") as f:
        return np.asarray(f["positive_scores"])


@pytest.mark.parametrize("block_size", [7, 4096])
def test_exact_mining_matches_brute_force(tmp_path, block_size):
    img, cap = random_embeddings(40)
    emb = write_embeddings(tmp_path / "e.h5", img, cap)
    options = OffcandiConfig(k_i2t=12, k_t2i=6, block_size=block_size)
    offcandi(emb, tmp_path / "out", options)
    want_i2t, want_t2i, sims = brute_force(img, cap, 12, 6)
    i2t, i2t_scores, attrs = read(tmp_path / "out" / "i2t.h5")
    t2i, t2i_scores, _ = read(tmp_path / "out" / "t2i.h5")
    np.testing.assert_array_equal(i2t, want_i2t)
    np.testing.assert_array_equal(t2i, want_t2i)
    np.testing.assert_allclose(i2t_scores, np.take_along_axis(sims, want_i2t, 1), atol=1e-5)
    np.testing.assert_allclose(t2i_scores, np.take_along_axis(sims.T, want_t2i, 1), atol=1e-5)
    assert (np.diff(i2t_scores, axis=1) <= 1e-6).all()  # hardest first
    want_i2t_positive = [sims[i, 5 * i:5 * i + 5].mean() for i in range(40)]
    want_t2i_positive = [sims[c // 5, c] for c in range(200)]
    np.testing.assert_allclose(read_positive_scores(tmp_path / "out" / "i2t.h5"),
                               want_i2t_positive, atol=1e-5)
    np.testing.assert_allclose(read_positive_scores(tmp_path / "out" / "t2i.h5"),
                               want_t2i_positive, atol=1e-5)
    assert attrs["dataset"] == "tiny" and attrs["weights"] == "w0" and attrs["k"] == 12
    assert attrs["index"] == "flat" and attrs["num_images"] == 40


def test_positives_are_excluded_even_when_they_are_the_nearest(tmp_path):
    img, _ = random_embeddings(10)
    cap = np.repeat(img, 5, axis=0)  # every positive is a perfect match
    emb = write_embeddings(tmp_path / "e.h5", img, cap)
    offcandi(emb, tmp_path / "out", OffcandiConfig(k_i2t=1, k_t2i=1))
    for direction in ("i2t", "t2i"):
        indices, _, _ = read(tmp_path / "out" / f"{direction}.h5")
        assert indices.shape[1] == 1
        assert not positives_present(direction, indices, CaptionLayout.uniform(10)).any()


@pytest.mark.parametrize("index", ["hnsw", "ivf"])
def test_approximate_index_reports_recall(tmp_path, index):
    img, cap = random_embeddings(200)
    emb = write_embeddings(tmp_path / "e.h5", img, cap)
    offcandi(emb, tmp_path / "out", OffcandiConfig(k_i2t=20, k_t2i=10, index=index,
                                                   recall_sample=50))
    indices, _, attrs = read(tmp_path / "out" / "i2t.h5")
    assert attrs["index"] == index and 0.5 < attrs["recall_at_k"] <= 1.0
    assert not positives_present("i2t", indices, CaptionLayout.uniform(200)).any()


@pytest.mark.parametrize("block_size", [7, 4096])
def test_mine_arrays_matches_brute_force(block_size):
    img, cap = random_embeddings(40, seed=1)
    mined = mine_module.mine_arrays(img, cap, k_i2t=12, k_t2i=6, block_size=block_size)
    want_i2t, want_t2i, sims = brute_force(img, cap, 12, 6)
    (i2t, i2t_scores), (t2i, t2i_scores) = mined["i2t"], mined["t2i"]
    assert i2t.shape == (40, 12) and t2i.shape == (200, 6)
    assert i2t_scores.dtype == t2i_scores.dtype == np.float32
    np.testing.assert_array_equal(i2t, want_i2t)
    np.testing.assert_array_equal(t2i, want_t2i)
    np.testing.assert_allclose(i2t_scores, np.take_along_axis(sims, want_i2t, 1), atol=1e-5)
    np.testing.assert_allclose(t2i_scores, np.take_along_axis(sims.T, want_t2i, 1), atol=1e-5)


def test_mine_arrays_equals_the_files_offcandi_writes(tmp_path):
    img, cap = random_embeddings(60, seed=2)
    options = OffcandiConfig(k_i2t=15, k_t2i=8, block_size=16)
    offcandi(write_embeddings(tmp_path / "e.h5", img, cap), tmp_path / "out", options)
    mined = mine_module.mine_arrays(img, cap, 15, 8, block_size=16)
    for direction in ("i2t", "t2i"):
        indices, scores, _ = read(tmp_path / "out" / f"{direction}.h5")
        np.testing.assert_array_equal(mined[direction][0], indices)
        np.testing.assert_array_equal(mined[direction][1], scores)


def test_mine_arrays_never_lists_a_positive_and_checks_its_inputs():
    img, _ = random_embeddings(10)
    cap = np.repeat(img, 5, axis=0)  # every positive is a perfect match
    for index in ("flat", "hnsw"):
        mined = mine_module.mine_arrays(img, cap, k_i2t=3, k_t2i=2, index=index)
        for direction in ("i2t", "t2i"):
            assert not positives_present(direction, mined[direction][0],
                                         CaptionLayout.uniform(10)).any()
    with pytest.raises(UserError, match="t2i: K=10 is more than the 9 negatives"):
        mine_module.mine_arrays(img, cap, k_i2t=3, k_t2i=10)
    with pytest.raises(UserError, match="unknown index 'annoy'"):
        mine_module.mine_arrays(img, cap, 3, 2, index="annoy")
    with pytest.raises(ValueError, match="captions"):
        mine_module.mine_arrays(img, cap[:-1], 3, 2)


def test_too_large_k_and_unknown_index(tmp_path):
    img, cap = random_embeddings(5)
    emb = write_embeddings(tmp_path / "e.h5", img, cap)
    with pytest.raises(UserError, match="t2i: K=5 is more than the 4 negatives"):
        offcandi(emb, tmp_path / "out", OffcandiConfig(k_i2t=3, k_t2i=5))
    with pytest.raises(UserError, match="unknown index 'annoy'"):
        offcandi(emb, tmp_path / "out", OffcandiConfig(index="annoy"))


def test_interrupted_mining_leaves_no_candidate_file(tmp_path, monkeypatch):
    img, cap = random_embeddings(30)
    emb = write_embeddings(tmp_path / "e.h5", img, cap)
    real = mine_module.search_blocks

    def die_after_first_block(*args, **kwargs):
        yield next(real(*args, **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(mine_module, "search_blocks", die_after_first_block)
    with pytest.raises(KeyboardInterrupt):
        offcandi(emb, tmp_path / "out", OffcandiConfig(k_i2t=5, k_t2i=5, block_size=10))
    assert not (tmp_path / "out").exists()  # nothing: the folder it made is removed too


@pytest.fixture
def mined(tmp_path):
    img, cap = random_embeddings(20)
    emb = write_embeddings(tmp_path / "e.h5", img, cap)
    offcandi(emb, tmp_path / "out", OffcandiConfig(k_i2t=10, k_t2i=4))
    return tmp_path / "out"


def test_load_accepts_the_matching_run(mined):
    c = load_candidates(mined, "i2t", "tiny", "train", 20, min_k=10, weights="w0")
    assert c.indices.shape == (20, 10) and c.k == 10


@pytest.mark.parametrize("kwargs, message", [
    ({"dataset": "coco_precomp"}, "built for dataset='tiny'.*dataset='coco_precomp'"),
    ({"split": "dev"}, "built for split='train'"),
    ({"num_images": 21}, "num_images=20"),
    ({"weights": "other"}, "mined with model weights w0"),
    ({"min_k": 11}, "K=10 candidates per query but the run samples from the top 11"),
])
def test_load_refuses_a_mismatch(mined, kwargs, message):
    args = {"dataset": "tiny", "split": "train", "num_images": 20, "min_k": 10,
            "weights": "w0", **kwargs}
    with pytest.raises(UserError, match=message):
        load_candidates(mined, "i2t", **args)


def test_scores_are_refused_where_an_imported_file_has_none(tiny_root, tmp_path):
    config = load_config(overrides=[f"data.path={tiny_root}", "data.name=tiny"])
    i2t, t2i = published_style(40, 6, 2)
    np.save(tmp_path / "i2t.npy", i2t)
    np.save(tmp_path / "t2i.npy", t2i)
    import_published(tmp_path / "i2t.npy", tmp_path / "t2i.npy", config, tmp_path / "imp")
    with pytest.raises(UserError, match="no candidate or positive scores"):
        load_candidates(tmp_path / "imp", "i2t", "tiny", "train", 40, 5, with_scores=True)


def test_load_refuses_corrupt_files(mined):
    path = mined / "t2i.h5"
    with h5py.File(path, "r+") as f:
        f["indices"][0, 0] = 999
    with pytest.raises(UserError, match="out of range"):
        load_candidates(mined, "t2i", "tiny", "train", 20, min_k=4)
    with h5py.File(path, "r+") as f:
        f["indices"][0, 0] = 0  # caption 0's own image
    with pytest.raises(UserError, match="own positives"):
        load_candidates(mined, "t2i", "tiny", "train", 20, min_k=4)
    with pytest.raises(UserError, match="not found.*make offcandi"):
        load_candidates(mined / "nope", "t2i", "tiny", "train", 20, min_k=4)


def test_import_published_npy(tiny_root, tmp_path):
    config = load_config(overrides=[f"data.path={tiny_root}", "data.name=tiny"])
    i2t, t2i = published_style(40, 30, 8)  # the tiny dataset has 40 images
    np.save(tmp_path / "i2t_tiny.npy", i2t)
    np.save(tmp_path / "t2i_tiny.npy", t2i)
    import_published(tmp_path / "i2t_tiny.npy", tmp_path / "t2i_tiny.npy", config,
                     tmp_path / "imported")
    got = load_candidates(tmp_path / "imported", "i2t", "tiny", "train", 40, min_k=30)
    np.testing.assert_array_equal(got.indices, i2t)
    assert got.attrs["weights"].startswith("imported:")
    assert got.attrs["weights"] == load_candidates(tmp_path / "imported", "t2i", "tiny",
                                                   "train", 40, min_k=8).attrs["weights"]
    np.save(tmp_path / "bad.npy", i2t[:10])
    with pytest.raises(UserError, match=r"bad.npy: shape \(10, 30\).*another dataset"):
        import_published(tmp_path / "bad.npy", tmp_path / "t2i_tiny.npy", config, tmp_path / "x")
    i2t[3, 0] = 15  # a caption of image 3
    np.save(tmp_path / "pos.npy", i2t)
    with pytest.raises(UserError, match="own positives"):
        import_published(tmp_path / "pos.npy", tmp_path / "t2i_tiny.npy", config, tmp_path / "x")


def test_mining_records_its_settings_and_importing_over_it_forgets_them(tiny_root, tmp_path):
    """make's offcandi stamp compares the settings asked for with those the candidates were
    mined with; imported candidates were mined with none (make mines such a folder again)."""
    img, cap = random_embeddings(40)
    emb = write_embeddings(tmp_path / "e.h5", img, cap)
    offcandi(emb, tmp_path / "out", OffcandiConfig(k_i2t=10, k_t2i=4, threads=1))
    assert read_record(tmp_path / "out" / "t2i.h5") == settings_text(
        load_config(overrides=["offcandi.k_i2t=10", "offcandi.k_t2i=4"]), "offcandi")
    i2t, t2i = published_style(40, 30, 8)
    np.save(tmp_path / "i2t_tiny.npy", i2t)
    np.save(tmp_path / "t2i_tiny.npy", t2i)
    config = load_config(overrides=[f"data.path={tiny_root}", "data.name=tiny"])
    import_published(tmp_path / "i2t_tiny.npy", tmp_path / "t2i_tiny.npy", config,
                     tmp_path / "out")
    assert read_record(tmp_path / "out" / "t2i.h5") is None


@pytest.mark.parametrize("refused", [{"k_t2i": 10_000}, {"index": "ivfpq", "pq_m": 7}])
def test_refused_settings_leave_a_mined_folder_as_it_was(tmp_path, refused):
    """Settings refused for either direction (a K beyond the negatives, PQ parts that do not
    divide the dimension) are refused before anything is replaced: both files and the
    settings record that says what mined them stay."""
    images, captions = random_embeddings(40, 8)
    emb = write_embeddings(tmp_path / "e.h5", images, captions)
    out = tmp_path / "cands"
    offcandi(emb, out, OffcandiConfig(k_i2t=10, k_t2i=5))
    before = {p.name: p.read_bytes() for p in out.glob("*.h5")}
    record = read_record(out / "t2i.h5")
    with pytest.raises(UserError):
        offcandi(emb, out, OffcandiConfig(**{"k_i2t": 10, "k_t2i": 5, **refused}))
    assert {p.name: p.read_bytes() for p in out.glob("*.h5")} == before
    assert read_record(out / "t2i.h5") == record is not None
