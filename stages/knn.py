"""The one FAISS wrapper: inner-product k-nearest-neighbour search, exact or approximate.

``flat`` is exact (``IndexFlatIP``). ``hnsw`` and ``ivf`` are approximate options for
COCO scale and beyond; :func:`approximate_recall` measures them against exact search on
a sample of queries. Queries are searched in blocks, so memory stays at the index plus
one block of results.
"""

import logging
import os
from collections.abc import Iterator

import faiss
import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "hnsw", "ivf")


def set_threads(threads: int = 0) -> int:
    """FAISS/OpenMP threads: ``threads`` if > 0, else the CPUs this process may use."""
    threads = threads or len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(threads)
    return threads


def build_index(vectors: np.ndarray, kind: str = "flat", hnsw_m: int = 32,
                ef_search: int = 256, nlist: int = 0, nprobe: int = 32,
                seed: int = 0) -> faiss.Index:
    """An inner-product index over ``vectors`` (n, d) float32.

    ``hnsw``: graph with ``hnsw_m`` links per node, ``ef_search`` candidates per query.
    ``ivf``: ``nlist`` inverted lists (default 4 * sqrt(n)) trained by k-means on a sample,
    ``nprobe`` lists visited per query.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    elif kind == "ivf":
        nlist = nlist or max(1, int(4 * np.sqrt(n)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist,
                                   faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).choice(n, size=min(n, 256 * nlist),
                                                     replace=False)
        index.train(vectors[np.sort(sample)])
        index.nprobe = min(nprobe, nlist)
    else:
        raise UserError(f"unknown index {kind!r}; known: {', '.join(INDEX_KINDS)}")
    index.add(vectors)
    return index


def search_blocks(index: faiss.Index, queries: np.ndarray, k: int,
                  block_size: int = 4096) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, scores (b, k) float32, ids (b, k) int64)`` per block of queries,
    best first."""
    if isinstance(index, faiss.IndexHNSWFlat) and index.hnsw.efSearch < k:
        index.hnsw.efSearch = k
    for start in range(0, queries.shape[0], block_size):
        block = np.ascontiguousarray(queries[start:start + block_size], dtype=np.float32)
        scores, ids = index.search(block, k)
        yield start, scores, ids


def approximate_recall(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int,
                       sample: int, seed: int = 0) -> float:
    """Mean |approximate top-k ∩ exact top-k| / k over ``sample`` random queries."""
    rows = np.sort(np.random.default_rng(seed).choice(len(queries),
                                                      size=min(sample, len(queries)),
                                                      replace=False))
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(np.ascontiguousarray(vectors, dtype=np.float32))
    q = np.ascontiguousarray(queries[rows], dtype=np.float32)
    _, want = exact.search(q, k)
    _, got = index.search(q, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, want, strict=True)]))
