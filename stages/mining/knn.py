"""The one FAISS wrapper: inner-product k-nearest-neighbour search, exact or approximate.

``flat`` is exact: ``faiss.knn`` over the vectors held once in a numpy array (the same
BLAS search as ``IndexFlatIP``, without the index's second copy of the vectors). ``hnsw``,
``ivf`` and ``ivfpq`` are approximate options for COCO scale and beyond;
:func:`approximate_recall` measures them against exact search on a sample of queries.
``ivfpq`` (FAISS's ``IndexIVFPQ``, optionally behind an OPQ rotation) stores each vector as
``pq_m`` bytes of product-quantizer codes instead of its ``4 d`` bytes of floats: the index
of millions of vectors fits in a few hundred MB. Vectors and queries are any (n, d) array
that slices, a numpy array or an HDF5 dataset: they are read block by block, so memory
stays at the index plus one block (plus, for the IVF kinds, the training sample:
:func:`train_size`).

With FAISS built for GPUs (faiss-gpu) and ``gpus`` > 0 (:func:`faiss_gpus` chooses), the
flat, ivf and ivfpq indexes are built on the CPU, then cloned to every GPU, sharded
(``faiss.index_cpu_to_all_gpus``, float16 for the IVF kinds as sentence-transformers'
FAISS search does; the exact index stays float32), and searched there; FAISS has no GPU
HNSW, so hnsw stays on the CPU.
"""

import logging
import os
import time
from collections.abc import Iterator

import faiss
import numpy as np

from stages.core.errors import UserError

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "hnsw", "ivf", "ivfpq")
ADD_BLOCK_BYTES = 32 << 20  # vectors read and added per step: 8192 rows at d = 1024
# The IVF kinds train on a random sample of the vectors: 64 per inverted list (ivfpq: and
# at least 64 per centroid of each sub-quantizer, 2**pq_bits of them), at most
# TRAIN_MAX_BYTES of float32 (1,048,576 vectors at d = 256, 262,144 at d = 1024).
TRAIN_PER_LIST = 64
TRAIN_PER_CODE = 64
TRAIN_MAX_BYTES = 1 << 30
# The sub-quantizer counts FAISS's GPU IVF-PQ takes; the automatic pq_m is one of them.
GPU_PQ_M = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 48, 56, 64, 96)
MAX_PQ_BITS = 16


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


def default_nlist(n: int) -> int:
    """The IVF kinds' inverted lists when ``nlist`` is 0: 4 * sqrt(n)."""
    return max(1, int(4 * np.sqrt(n)))


def train_size(n: int, dim: int, nlist: int, pq_bits: int = 0) -> int:
    """Vectors an IVF index trains on: 64 per list (ivfpq: and 64 per sub-quantizer
    centroid), at most TRAIN_MAX_BYTES of them, at most n."""
    want = max(TRAIN_PER_LIST * nlist, TRAIN_PER_CODE * 2 ** pq_bits if pq_bits else 0)
    return min(n, want, max(1, TRAIN_MAX_BYTES // (4 * dim)))


def resolve_pq_m(dim: int, pq_m: int = 0) -> int:
    """The sub-quantizers of an ivfpq index over ``dim``-d vectors: ``pq_m``, checked, or
    (0) the largest count FAISS's GPU IVF-PQ takes that divides ``dim`` into sub-vectors of
    at least 8 dimensions (32 at d = 256, 64 at d = 512 or 1024, 48 at d = 384)."""
    if pq_m < 0:
        raise UserError(f"offcandi.pq_m={pq_m}: sub-quantizers must be at least 1 (0: auto)")
    if pq_m == 0:
        return max(m for m in GPU_PQ_M if dim % m == 0 and dim // m >= min(8, dim))
    if pq_m > dim or dim % pq_m:
        divisors = [m for m in range(1, dim + 1) if dim % m == 0]
        raise UserError(f"offcandi.pq_m={pq_m} does not divide the embedding size {dim} "
                        f"into equal sub-vectors; take one of its divisors "
                        f"({', '.join(map(str, divisors))}), or 0 for {resolve_pq_m(dim)}")
    return pq_m


def check_pq_bits(pq_bits: int) -> None:
    if not 1 <= pq_bits <= MAX_PQ_BITS:
        raise UserError(f"offcandi.pq_bits={pq_bits}: bits per sub-quantizer code must be "
                        f"in 1..{MAX_PQ_BITS} (8, the default: one byte per sub-vector)")


def check_index_settings(kind: str, n: int, dim: int, nlist: int = 0, pq_m: int = 0,
                         pq_bits: int = 8) -> tuple[int, int]:
    """Refuse settings an index of ``kind`` over ``n`` ``dim``-d vectors cannot be built
    with (before any work: the miners check both directions first); returns the resolved
    ``(nlist, pq_m)`` (0 where the kind has none)."""
    if kind not in ("ivf", "ivfpq"):
        return 0, 0
    nlist = nlist or default_nlist(n)
    bits = 0
    if kind == "ivfpq":
        check_pq_bits(pq_bits)
        bits, pq_m = pq_bits, resolve_pq_m(dim, pq_m)
    if n < max(nlist, 2 ** bits if bits else 0):
        raise UserError(
            f"{kind}: {n} vectors are too few to train {nlist} inverted lists"
            + (f" and 2**pq_bits = {2 ** bits} centroids per sub-quantizer" if bits else "")
            + "; lower offcandi.nlist" + (" or offcandi.pq_bits" if bits else "")
            + ", or use the flat (exact) index")
    return nlist, pq_m if kind == "ivfpq" else 0


def faiss_gpus(use: bool = True) -> int:
    """The GPUs FAISS searches on: with ``use``, every GPU FAISS sees (none with faiss-cpu,
    or without a device: said in one log line); none without."""
    if not use:
        return 0
    count = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if count <= 0:
        log.info("offcandi.gpu: FAISS sees no GPU (faiss-cpu installed, or no device); "
                 "searching on the CPU")
        return 0
    log.info("offcandi.gpu: FAISS sees %d GPU(s); the index is sharded over them", count)
    return count


def to_gpus(index: faiss.Index, kind: str, float16: bool) -> faiss.Index:
    """``index`` cloned to every GPU, sharded (each holds a part of the vectors)."""
    co = faiss.GpuMultipleClonerOptions()
    co.shard = True
    co.useFloat16 = float16
    try:
        return faiss.index_cpu_to_all_gpus(index, co=co)
    except RuntimeError as exc:  # a layout FAISS's GPU code refuses (pq_m, pq_bits, ...)
        raise UserError(f"FAISS could not move the {kind} index to the GPU ({exc}); change "
                        "its settings or search on the CPU: --set offcandi.gpu=false") from exc


def build_index(vectors, kind: str = "flat", hnsw_m: int = 32, ef_search: int = 256,
                nlist: int = 0, nprobe: int = 32, seed: int = 0, pq_m: int = 0,
                pq_bits: int = 8, opq: bool = False, gpus: int = 0,
                info: dict | None = None) -> faiss.Index | ExactIndex:
    """An inner-product index over ``vectors`` (n, d), added block by block.

    ``hnsw``: graph with ``hnsw_m`` links per node, ``ef_search`` candidates per query.
    ``ivf``: ``nlist`` inverted lists (default 4 * sqrt(n)) trained by k-means on a sample
    (:func:`train_size`), ``nprobe`` lists visited per query. ``ivfpq``: the same lists
    holding ``pq_m`` sub-quantizer codes of ``pq_bits`` bits per vector (FAISS's
    ``IVF{nlist},PQ{pq_m}x{pq_bits}np``; ``opq``: behind a learnt rotation, ``OPQ{pq_m}``).
    ``gpus`` > 0: moved to the GPUs once built (:func:`to_gpus`; hnsw stays on the CPU).
    ``info``, when given, receives what was built: the resolved settings, ``train_size``,
    ``train_seconds``, ``add_seconds``, ``gpus``.
    """
    n, dim = vectors.shape
    info = {} if info is None else info
    if kind not in INDEX_KINDS:
        raise UserError(f"unknown index {kind!r}; known: {', '.join(INDEX_KINDS)}")
    t0 = time.perf_counter()
    if kind == "flat" and not gpus:
        index = ExactIndex(load_rows(vectors))
        info.update(train_seconds=0.0, add_seconds=round(time.perf_counter() - t0, 2), gpus=0)
        return index
    ivf = None
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
        info.update(ef_search=ef_search)
    else:
        nlist, pq_m = check_index_settings(kind, n, dim, nlist, pq_m, pq_bits)
        bits = pq_bits if kind == "ivfpq" else 0
        if kind == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist,
                                       faiss.METRIC_INNER_PRODUCT)
        else:
            # np: no polysemous training (it serves Hamming-filtered L2 search only, and
            # takes 40x the PQ's own training)
            factory = f"{f'OPQ{pq_m},' if opq else ''}IVF{nlist},PQ{pq_m}x{pq_bits}np"
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            info.update(pq_m=pq_m, pq_bits=pq_bits, opq=bool(opq), factory=factory)
        size = train_size(n, dim, nlist, bits)
        sample = np.random.default_rng(seed).choice(n, size=size, replace=False)
        index.train(_take_rows(vectors, np.sort(sample)))
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(nprobe, nlist)
        info.update(nlist=nlist, nprobe=ivf.nprobe, train_size=size)
    t1 = time.perf_counter()
    for _, block in _blocks(vectors):
        index.add(block)
    info.update(train_seconds=round(t1 - t0, 2), add_seconds=round(time.perf_counter() - t1, 2),
                gpus=0)
    if gpus and kind == "hnsw":
        log.info("hnsw: FAISS has no GPU HNSW; this index searches on the CPU")
    elif gpus:
        index = to_gpus(index, kind, float16=kind != "flat")
        info.update(gpus=gpus)
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
