"""Mining a split's offline hard-negative candidates from its embeddings: an embeddings
file into candidate files (:func:`mine_candidates`, the offcandi stage), or arrays in memory
(:func:`mine_arrays`, for training code of your own); both run :func:`search_direction`.

For each image its K most similar captions of other images (i2t), for each caption its K
most similar other images (t2i), hardest first. Which image owns each caption is the
embeddings' caption layout (:mod:`stages.core.layout`: 5 per image, 1, or any number each).
One FAISS search per block of queries fetches K plus the most positives a query can have
(i2t: the most captions an image owns; t2i: 1 image), the positives are removed exactly,
and the first K remain: no query ever lists its own positive, whatever K. Each query's
positive score is stored too (i2t: the mean over the image's captions; t2i: the caption's
own image), so retraining can skip likely false negatives
(``offcandi.false_negative_ratio``). Memory: the images and the index; captions
are read from the embeddings file block by block, so the peak is about the size of the
embeddings plus one block of results (:func:`mine_arrays`: plus its results).
"""

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from stages.config.sections import OffcandiConfig
from stages.core.errors import UserError
from stages.core.layout import LEGACY_CAPTIONS_PER_IMAGE, CaptionLayout
from stages.core.progress import Progress
from stages.io.atomic import atomic_path
from stages.mining.candidate_files import (
    CANDIDATES_FORMAT,
    CANDIDATES_VERSION,
    DIRECTIONS,
    candidate_path,
    is_positive,
    padded_captions,
)
from stages.mining.embedding_files import Embeddings
from stages.mining.knn import (
    INDEX_KINDS,
    approximate_recall,
    build_index,
    check_index_settings,
    faiss_gpus,
    search_blocks,
)

log = logging.getLogger(__name__)


def drop_positives(direction: str, query_start: int, ids: np.ndarray, scores: np.ndarray,
                   k: int, layout: CaptionLayout) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's positives from its ranked ``ids`` (b, k + p), keep the first k.

    Row r is query ``query_start + r`` (an image for i2t, a caption for t2i, owned as
    ``layout`` says); ``ids`` and ``scores`` (b, k + p) are its search results, best first.
    Returns ``(ids, scores)`` (b, k). Rows keep their order (hardest first); a stable sort
    moves positives to the end.
    """
    queries = np.arange(query_start, query_start + ids.shape[0])
    padding = ids < 0  # FAISS pads with -1
    positive = is_positive(direction, queries, np.where(padding, 0, ids), layout) | padding
    order = np.argsort(positive, axis=1, kind="stable")[:, :k]
    kept_ids = np.take_along_axis(ids, order, axis=1)
    if (kept_ids < 0).any():
        raise UserError(f"the {direction} index returned fewer than {k} negatives for some "
                        "queries; raise ef_search/nprobe or use the exact index")
    return kept_ids, np.take_along_axis(scores, order, axis=1)


def positive_scores(direction: str, embeddings: Embeddings, block_size: int = 2048
                    ) -> np.ndarray:
    """(Q,) float32 score of each query's positives: i2t, the mean over the image's
    captions (N,); t2i, the caption with its own image (C,). Images are taken in blocks of
    about ``block_size`` x 5 captions (as many as padding each to the most captions an image
    has allows)."""
    images, captions, layout = embeddings.images, embeddings.captions, embeddings.layout
    n = len(images)
    out = np.empty(n if direction == "i2t" else layout.num_captions, dtype=np.float32)
    step = max(1, block_size * LEGACY_CAPTIONS_PER_IMAGE // layout.max_per_image)
    for start in range(0, n, step):
        stop = min(n, start + step)
        c0, c1 = layout.caption_range(start, stop)
        ids, real = padded_captions(layout, np.arange(start, stop))  # (b, m)
        rows = np.asarray(captions[c0:c1], dtype=np.float32)
        sims = np.einsum("nd,ncd->nc", images[start:stop], rows[ids - c0])  # (b, m)
        if direction == "i2t":
            sums = np.where(real, sims, np.float32(0)).sum(axis=1)
            out[start:stop] = sums / layout.counts[start:stop].astype(np.float32)
        else:
            out[c0:c1] = sims[real]
    return out


def _sides(direction: str, images, captions, layout: CaptionLayout, k: int):
    """``(queries, items, positives)`` of ``direction`` (i2t: images against captions, up
    to the most captions an image owns positives per query; t2i: captions against images,
    1), after checking that each query has at least ``k`` negatives."""
    if direction == "i2t":
        queries, items, positives = images, captions, layout.max_per_image
    else:
        queries, items, positives = captions, images, 1
    if k + positives > items.shape[0]:
        raise UserError(f"{direction}: K={k} is more than the {items.shape[0] - positives} "
                        "negatives each query has; lower the K")
    return queries, items, positives


def search_direction(direction: str, index, queries, k: int, layout: CaptionLayout,
                     block_size: int = 4096) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The one search loop of both paths (files and arrays): yields ``(start, indices (b, k)
    int64, scores (b, k) float32)`` per block of ``queries`` (rows ``start``..), each
    query's k hardest negatives, hardest first, its positives removed exactly.

    ``index``: a :func:`~stages.mining.knn.build_index` over the other side (captions for
    i2t, images for t2i); ``queries`` (Q, E): images (N, E) for i2t, captions (C, E) for
    t2i, caption c belonging to image ``layout.owner[c]``. Each search fetches k plus the
    most positives a query has (i2t: ``layout.max_per_image``; t2i: 1).
    """
    positives = layout.max_per_image if direction == "i2t" else 1
    for start, scores, ids in search_blocks(index, queries, k + positives, block_size):
        ids, scores = drop_positives(direction, start, ids, scores, k, layout)
        yield start, ids, scores


def mine_arrays(images: np.ndarray, captions: np.ndarray, k_i2t: int, k_t2i: int,
                index: str = "flat", ef_search: int = 256, nlist: int = 0, nprobe: int = 32,
                block_size: int = 4096, pq_m: int = 0, pq_bits: int = 8, opq: bool = False,
                gpu: bool = False, layout: CaptionLayout | None = None
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Offline hard-negative candidates of embedding arrays, in memory (no files).

    ``images`` (N, E) float32 and ``captions`` (C, E) float32, caption c belonging to image
    ``layout.owner[c]`` (a :class:`~stages.core.layout.CaptionLayout`; None: 5 per image,
    caption c of image c // 5), L2-normalised: scores are inner products. Returns
    ``{"i2t": (indices, scores), "t2i": (indices, scores)}``: i2t ``indices`` (N, k_i2t)
    int64 caption ids, t2i ``indices`` (C, k_t2i) int64 image ids, ``scores`` float32 of
    the same shape; each row hardest first, never a positive of its query (i2t: no caption
    of the image; t2i: not the caption's own image). ``index``: ``flat`` (exact), ``hnsw``
    (``ef_search``), ``ivf`` (``nlist``, ``nprobe``) or ``ivfpq`` (also ``pq_m``,
    ``pq_bits``, ``opq``), as ``offcandi.*``; ``gpu``: on FAISS's GPUs when it has some;
    ``block_size`` queries per search. The same search as ``aoq offcandi``
    (:func:`mine_candidates`), whose files hold these indices.
    """
    check_index(index)
    gpus = faiss_gpus(gpu)
    images, captions = np.asarray(images), np.asarray(captions)
    if images.ndim != 2:
        raise ValueError(f"expected images (N, E), got {images.shape}")
    layout = layout or CaptionLayout.uniform(len(images))
    if layout.num_images != len(images) or captions.shape != (layout.num_captions,
                                                              images.shape[1]):
        raise ValueError(f"expected images (N, E) and captions (C, E) of {layout!r}, got "
                         f"{images.shape} and {captions.shape}")
    for direction in DIRECTIONS:  # before any work
        items = captions if direction == "i2t" else images
        check_index_settings(index, *items.shape, nlist, pq_m, pq_bits)
    out = {}
    for direction, k in zip(DIRECTIONS, (k_i2t, k_t2i), strict=True):
        queries, items, _ = _sides(direction, images, captions, layout, k)
        knn = build_index(items, index, ef_search=ef_search, nlist=nlist, nprobe=nprobe,
                          pq_m=pq_m, pq_bits=pq_bits, opq=opq, gpus=gpus)
        indices = np.empty((len(queries), k), dtype=np.int64)
        scores = np.empty((len(queries), k), dtype=np.float32)
        for start, ids, block_scores in search_direction(direction, knn, queries, k, layout,
                                                         block_size):
            indices[start:start + len(ids)] = ids
            scores[start:start + len(ids)] = block_scores
        out[direction] = (indices, scores)
    return out


# What build_index reports that the candidate files record (besides the timings).
INDEX_ATTRS = ("nlist", "nprobe", "ef_search", "pq_m", "pq_bits", "opq", "factory",
               "train_size")


def mine_direction(direction: str, embeddings: Embeddings, options: OffcandiConfig,
                   out: Path, gpus: int = 0) -> dict:
    """Mine one direction of ``embeddings`` (images (N, E), captions (C, E)) into the
    candidate file ``out``: ``indices`` (Q, K) int32, ``scores`` (Q, K) float32,
    ``positive_scores`` (Q,), Q = N for i2t, C for t2i, and the embeddings' caption layout;
    returns its attributes (timings, recall). ``gpus``: FAISS's GPUs to search on
    (:func:`~stages.mining.knn.faiss_gpus`)."""
    k = options.k_i2t if direction == "i2t" else options.k_t2i
    layout = embeddings.layout
    queries, items, positives = _sides(direction, embeddings.images, embeddings.captions,
                                       layout, k)
    t0 = time.perf_counter()
    built: dict = {}
    index = build_index(items, options.index, ef_search=options.ef_search,
                        nlist=options.nlist, nprobe=options.nprobe, pq_m=options.pq_m,
                        pq_bits=options.pq_bits, opq=options.opq, gpus=gpus, info=built)
    build_seconds = time.perf_counter() - t0
    attrs = {"direction": direction, "index": options.index, "k": k,
             **{key: built[key] for key in INDEX_ATTRS if key in built},
             "gpus": built["gpus"], "index_build_seconds": round(build_seconds, 2),
             "index_train_seconds": built["train_seconds"],
             "index_add_seconds": built["add_seconds"]}
    if options.index != "flat":
        t1 = time.perf_counter()
        attrs["recall_at_k"] = approximate_recall(index, items, queries, k + positives,
                                                  options.recall_sample)
        attrs["recall_seconds"] = round(time.perf_counter() - t1, 2)
        log.info("%s: %s index recall@%d against exact search on %d queries: %.4f",
                 direction, options.index, k, min(options.recall_sample, len(queries)),
                 attrs["recall_at_k"])
    t0 = time.perf_counter()
    need = len(queries) * (8 * k + 4) + (1 << 20)  # indices, scores, positive scores
    with (atomic_path(out, need_bytes=need, what=f"the {direction} candidates") as tmp,
          h5py.File(tmp, "w") as f):
        ids_out = f.create_dataset("indices", (len(queries), k), dtype=np.int32)
        scores_out = f.create_dataset("scores", (len(queries), k), dtype=np.float32)
        f.create_dataset("positive_scores", data=positive_scores(direction, embeddings))
        with Progress(len(queries), f"offcandi {direction}", unit="queries") as bar:
            for start, ids, scores in search_direction(direction, index, queries, k, layout,
                                                       options.block_size):
                ids_out[start:start + len(ids)] = ids
                scores_out[start:start + len(ids)] = scores
                bar.update(len(ids))
        attrs["search_seconds"] = round(time.perf_counter() - t0, 2)
        f.attrs.update({**provenance(embeddings), **attrs})
        layout.write_h5(f)
    return attrs


def provenance(embeddings: Embeddings) -> dict:
    a = embeddings.attrs
    return {"format": CANDIDATES_FORMAT, "version": CANDIDATES_VERSION, "dataset": a["dataset"],
            "split": a["split"], "num_images": int(a["num_images"]),
            "num_captions": embeddings.layout.num_captions, "weights": a["weights"],
            "checkpoint": a["checkpoint"], "embeddings": str(embeddings.path),
            **{key: a[key] for key in ("dataset_dir", "run", "epoch") if key in a}}


def check_index(index: str) -> None:
    """Refuse an index kind the FAISS wrapper does not know."""
    if index not in INDEX_KINDS:
        raise UserError(f"unknown index {index!r}; known: {', '.join(INDEX_KINDS)}")


def check_mining(embeddings: Embeddings, options: OffcandiConfig) -> None:
    """Refuse, before any work and both directions first, what mining ``embeddings`` with
    ``options`` cannot do: an unknown index, index settings the vectors do not allow, a K
    beyond the negatives a query has. (A refusal halfway would leave one direction
    replaced and the other not.)"""
    check_index(options.index)
    for direction, k in zip(DIRECTIONS, (options.k_i2t, options.k_t2i), strict=True):
        _, items, _ = _sides(direction, embeddings.images, embeddings.captions,
                             embeddings.layout, k)
        check_index_settings(options.index, *items.shape, options.nlist, options.pq_m,
                             options.pq_bits)


def mine_candidates(embeddings: Embeddings, out_dir: str | Path,
                    options: OffcandiConfig) -> list[Path]:
    """Mine both directions of ``embeddings`` into ``out_dir/{i2t,t2i}.h5`` (the caller holds
    the folder's lock); returns the two paths, t2i last."""
    check_mining(embeddings, options)
    gpus = faiss_gpus(options.gpu)
    outputs = []
    for direction in DIRECTIONS:
        out = candidate_path(out_dir, direction)
        attrs = mine_direction(direction, embeddings, options, out, gpus)
        log.info("%s: K=%d in %.1f s -> %s", direction, attrs["k"], attrs["search_seconds"],
                 out)
        outputs.append(out)
    return outputs
