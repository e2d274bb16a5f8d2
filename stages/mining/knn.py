"""The one FAISS wrapper: inner-product k-nearest-neighbour search, exact or approximate.

``flat`` is exact: ``faiss.knn`` over the vectors held once in a numpy array (the same
BLAS search as ``IndexFlatIP``, without the index's second copy of the vectors). ``hnsw``
and ``ivf`` are approximate options for COCO scale and beyond; :func:`approximate_recall`
measures them against exact search on a sample of queries. Vectors and queries are any
(n, d) array that slices, a numpy array or an HDF5 dataset: they are read block by block,
so memory stays at the index plus one block.
"""

import logging
import os
from collections.abc import Iterator

import faiss
import numpy as np

from stages.core.errors import UserError

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "hnsw", "ivf")
ADD_BLOCK_BYTES = 32 << 20  # vectors read and added per step: 8192 rows at d = 1024


def set_threads(threads: int = 0) -> int:
    """FAISS/OpenMP threads: ``threads`` if > 0, else ``OMP_NUM_THREADS`` when it is one
    whole number (as the OpenMP runtime reads it), else the CPUs this process may use."""
    if not threads:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        threads = int(env) if env.isdigit() and int(env) > 0 else len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(threads)
    return threads


def _blocks(array, block_size: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, rows (b, d) float32 contiguous)`` over an array or HDF5 dataset; blocks of
    ``block_size`` rows (default: ADD_BLOCK_BYTES worth)."""
    block_size = block_size or max(1, ADD_BLOCK_BYTES // (4 * array.shape[1]))
    for start in range(0, array.shape[0], block_size):
        yield start, np.ascontiguousarray(array[start:start + block_size], dtype=np.float32)


def _take_rows(array, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` for sorted ``rows``, read block by block (fast on HDF5 too)."""
    parts = []
    for start, block in _blocks(array):
        inside = rows[(rows >= start) & (rows < start + len(block))]
        parts.append(block[inside - start])
    return np.concatenate(parts)


class ExactIndex:
    """Exact inner-product search over ``vectors`` (n, d) float32, with FAISS's index API
    (``search``, ``ntotal``)."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors
        self.ntotal, self.d = vectors.shape

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(b, d) queries -> scores (b, k) float32, ids (b, k) int64, best first."""
        return faiss.knn(queries, self.vectors, k, metric=faiss.METRIC_INNER_PRODUCT)


def load_rows(array) -> np.ndarray:
    """A whole (n, d) array or HDF5 dataset as one float32 numpy array, read block by block
    (no transient second copy)."""
    out = np.empty(array.shape, dtype=np.float32)
    for start, block in _blocks(array):
        out[start:start + len(block)] = block
    return out


def build_index(vectors, kind: str = "flat", hnsw_m: int = 32, ef_search: int = 256,
                nlist: int = 0, nprobe: int = 32, seed: int = 0) -> faiss.Index | ExactIndex:
    """An inner-product index over ``vectors`` (n, d), added block by block.

    ``hnsw``: graph with ``hnsw_m`` links per node, ``ef_search`` candidates per query.
    ``ivf``: ``nlist`` inverted lists (default 4 * sqrt(n)) trained by k-means on a sample
    of 64 * nlist vectors, ``nprobe`` lists visited per query.
    """
    n, dim = vectors.shape
    if kind == "flat":
        return ExactIndex(load_rows(vectors))
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    elif kind == "ivf":
        nlist = nlist or max(1, int(4 * np.sqrt(n)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist,
                                   faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).choice(n, size=min(n, 64 * nlist),
                                                     replace=False)
        index.train(_take_rows(vectors, np.sort(sample)))
        index.nprobe = min(nprobe, nlist)
    else:
        raise UserError(f"unknown index {kind!r}; known: {', '.join(INDEX_KINDS)}")
    for _, block in _blocks(vectors):
        index.add(block)
    return index


def search_blocks(index: faiss.Index | ExactIndex, queries, k: int,
                  block_size: int = 4096) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, scores (b, k) float32, ids (b, k) int64)`` per block of queries,
    best first."""
    if isinstance(index, faiss.IndexHNSWFlat) and index.hnsw.efSearch < k:
        index.hnsw.efSearch = k
    for start, block in _blocks(queries, block_size):
        scores, ids = index.search(block, k)
        yield start, scores, ids


def exact_top_k(vectors, queries: np.ndarray, k: int) -> np.ndarray:
    """(q, k) ids of each query's k highest inner products, best first, by one pass over
    ``vectors`` in blocks (each block's top k by ``faiss.knn``, merged; no copy of the
    vectors)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for start, block in _blocks(vectors):
        scores, ids = faiss.knn(queries, block, min(k, len(block)),
                                metric=faiss.METRIC_INNER_PRODUCT)
        scores = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, ids + start], axis=1)
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(scores, keep, axis=1)
        best_ids = np.take_along_axis(ids, keep, axis=1)
    return best_ids


def approximate_recall(index: faiss.Index, vectors, queries, k: int, sample: int,
                       seed: int = 0) -> float:
    """Mean |approximate top-k ∩ exact top-k| / k over ``sample`` random queries."""
    rows = np.sort(np.random.default_rng(seed).choice(queries.shape[0],
                                                      size=min(sample, queries.shape[0]),
                                                      replace=False))
    q = _take_rows(queries, rows)
    want = exact_top_k(vectors, q, k)
    _, got = index.search(q, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, want, strict=True)]))
