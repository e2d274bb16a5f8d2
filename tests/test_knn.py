import os

import faiss
import h5py
import numpy as np
import pytest

from stages.mining.knn import (
    approximate_recall,
    build_index,
    exact_top_k,
    search_blocks,
    set_threads,
)


@pytest.fixture
def vectors(tmp_path):
    rng = np.random.default_rng(0)
    items = rng.normal(size=(300, 8)).astype(np.float32)
    queries = rng.normal(size=(50, 8)).astype(np.float32)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["items"], f["queries"] = items, queries
    f = h5py.File(tmp_path / "v.h5", "r")
    yield items, queries, f["items"], f["queries"]
    f.close()


def brute_force(items, queries, k):
    return np.argsort(-(queries @ items.T), axis=1, kind="stable")[:, :k]


def test_exact_top_k_in_blocks_matches_brute_force(vectors, monkeypatch):
    items, queries, _, _ = vectors
    import stages.mining.knn as knn
    monkeypatch.setattr(knn, "ADD_BLOCK_BYTES", 64 * 8 * 4)  # 64-row blocks to merge
    np.testing.assert_array_equal(exact_top_k(items, queries, 7), brute_force(items, queries, 7))


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_index_from_hdf5_equals_index_from_memory(vectors, kind):
    items, queries, items_h5, queries_h5 = vectors
    in_memory = build_index(items, kind, nlist=8, nprobe=8)
    from_h5 = build_index(items_h5, kind, nlist=8, nprobe=8)
    got = [ids for _, _, ids in search_blocks(from_h5, queries_h5, 10, block_size=16)]
    want = [ids for _, _, ids in search_blocks(in_memory, queries, 10, block_size=16)]
    np.testing.assert_array_equal(np.concatenate(got), np.concatenate(want))
    recall = approximate_recall(from_h5, items_h5, queries_h5, 10, sample=20)
    if kind == "flat":
        np.testing.assert_array_equal(np.concatenate(got), brute_force(items, queries, 10))
        assert recall == 1.0
    elif kind == "ivf":
        assert recall == 1.0  # nprobe = nlist: every list is visited
    else:
        assert 0.8 < recall <= 1.0


@pytest.mark.parametrize("env,expected", [("1", 1), ("3", 3), ("", None), ("4,2", None),
                                          ("0", None)])
def test_threads_follow_the_setting_then_omp_num_threads_then_the_cpus(env, expected,
                                                                       monkeypatch):
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", env)
    try:
        assert set_threads() == (expected or cpus)
        assert faiss.omp_get_max_threads() == (expected or cpus)
        assert set_threads(2) == 2 and faiss.omp_get_max_threads() == 2
    finally:
        set_threads(1)  # the suite's one thread per worker
