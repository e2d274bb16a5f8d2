"""How hard the negatives are: the numbers behind ``aoq plot``, from a training split's
embeddings and the offline candidates mined from them.

Per direction (i2t: image queries; t2i: caption queries): the positive pairs' similarities,
the hardest *online* negative (the most similar other-image item in a random batch of
``train.batch_size`` pairs, as VSE++'s max-violation loss sees it), the offline candidates
(the first of each row and the top-h range retraining samples from) and the rank of the
positive among all items for a sample of queries. Embeddings are read with
:func:`stages.mining.embedding_files.open_embeddings` (a file or its shards): images (N, E)
in memory, captions (C, E) block by block, so memory stays at the images, one block and
the outputs. Which image owns each caption is the embeddings' caption layout
(:mod:`stages.core.layout`).
"""

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from stages.core.layout import CaptionLayout
from stages.metrics.retrieval import rank_metrics
from stages.mining.candidate_files import (
    DIRECTIONS,
    Candidates,
    load_candidates,
    padded_captions,
)
from stages.mining.embedding_files import Embeddings, open_embeddings
from stages.mining.mine import positive_scores
from stages.mining.selection import (
    NO_FILTERS,
    CaptionWords,
    Selection,
    SelectionRules,
    drop_reasons,
    sampling_windows,
)

log = logging.getLogger(__name__)

QUANTITIES = ("positive", "online", "offline_top1", "offline_range")
SIMS_PER_BLOCK = 1 << 23  # similarities computed at once for the t2i ranks (32 MiB)


def read_rows(dataset, ids: np.ndarray, block_size: int = 8192) -> np.ndarray:
    """(len(ids), E) float32: rows ``ids`` (any order, repeats allowed) of a 2-D array or
    HDF5 dataset, read one block of ``block_size`` rows at a time (blocks holding none of
    the ids are not read)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.empty((len(ids), dataset.shape[1]), dtype=np.float32)
    blocks = ids // block_size
    for b in np.unique(blocks):
        start = int(b) * block_size
        rows = np.asarray(dataset[start:start + block_size], dtype=np.float32)
        sel = np.flatnonzero(blocks == b)
        out[sel] = rows[ids[sel] - start]
    return out


def pair_scores(images: np.ndarray, captions, image_ids: np.ndarray, caption_ids: np.ndarray,
                block_size: int = 8192, chunk: int = 16384) -> np.ndarray:
    """(P,) float32 inner products images[image_ids[p]] . captions[caption_ids[p]], reading
    ``captions`` (C, E) one block at a time and pairing ``chunk`` pairs at once."""
    image_ids = np.asarray(image_ids, dtype=np.int64).ravel()
    caption_ids = np.asarray(caption_ids, dtype=np.int64).ravel()
    out = np.empty(len(caption_ids), dtype=np.float32)
    order = np.argsort(caption_ids, kind="stable")
    bounds = np.searchsorted(caption_ids[order],
                             np.arange(0, captions.shape[0] + block_size, block_size))
    for b in range(len(bounds) - 1):
        if bounds[b] == bounds[b + 1]:
            continue
        start = b * block_size
        rows = np.asarray(captions[start:start + block_size], dtype=np.float32)
        for lo in range(bounds[b], bounds[b + 1], chunk):
            sel = order[lo:min(lo + chunk, bounds[b + 1])]
            out[sel] = np.einsum("pd,pd->p", images[image_ids[sel]],
                                 rows[caption_ids[sel] - start])
    return out


def positive_ranks(images: np.ndarray, captions, layout: CaptionLayout, sample: np.ndarray,
                   block_size: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of the positives for the images ``sample`` (m,) and their captions,
    as in :mod:`stages.metrics.retrieval` (counts of items scored strictly higher).

    i2t (m,): the best of the image's captions among all C captions; t2i (S,): the
    caption's image among all N images, for the captions of each sampled image in order
    (S of them). ``images`` (N, E); ``captions`` (C, E) of ``layout``, read ``block_size``
    rows at a time; memory: the sample's captions (S, E) and (m, block_size) + 32 MiB of
    similarities.
    """
    sample = np.asarray(sample, dtype=np.int64)
    grid, real = padded_captions(layout, sample)  # (m, g): each sampled image's captions
    grid_rows = read_rows(captions, grid.ravel(), block_size)  # (m g, E)
    queries = images[sample]  # (m, E)
    own_scores = np.einsum("md,mcd->mc", queries,
                           grid_rows.reshape(len(sample), grid.shape[1], -1))
    best = own_scores.max(axis=1)  # (m,) (repeated captions change no maximum)
    i2t = np.zeros(len(sample), dtype=np.int64)
    for start in range(0, captions.shape[0], block_size):
        rows = np.asarray(captions[start:start + block_size], dtype=np.float32)
        sims = queries @ rows.T  # (m, b)
        owner = layout.owner[start:start + len(rows)]
        sims[owner[None, :] == sample[:, None]] = -np.inf  # never count an own caption
        i2t += (sims > best[:, None]).sum(axis=1)
    own = grid[real]  # (S,) the sampled images' captions, in order
    own_rows = grid_rows[real.ravel()]
    t2i = np.empty(len(own), dtype=np.int64)
    rows_per_block = max(1, SIMS_PER_BLOCK // len(images))
    for start in range(0, len(own), rows_per_block):
        sims = own_rows[start:start + rows_per_block] @ images.T  # (b, N)
        mine = layout.owner[own[start:start + rows_per_block]]
        rows = np.arange(len(sims))
        positive = sims[rows, mine].copy()
        sims[rows, mine] = -np.inf
        t2i[start:start + len(sims)] = (sims > positive[:, None]).sum(axis=1)
    return i2t, t2i


def online_hardest(images: np.ndarray, captions, layout: CaptionLayout, batch_size: int,
                   num_batches: int, seed: int = 0, block_size: int = 8192
                   ) -> dict[str, np.ndarray]:
    """Hardest in-batch negatives of ``num_batches`` random batches of ``batch_size``
    (image, caption) pairs, drawn without replacement from the C captions of ``layout``
    (fewer batches when the split has fewer pairs).

    Returns per anchor (concatenated over batches, (A,) each): ``i2t`` the highest score
    of the anchor image with a caption of another image in the batch, ``t2i`` of the
    anchor caption with another image, ``positive`` the anchor pair's own score. Anchors
    whose batch holds no other image are left out.
    """
    num_pairs = captions.shape[0]
    batch_size = min(batch_size, num_pairs)
    num_batches = max(1, min(num_batches, num_pairs // batch_size))
    rng = np.random.default_rng(seed)
    picked = rng.permutation(num_pairs)[:num_batches * batch_size]
    caption_rows = read_rows(captions, picked, block_size)
    out = {"i2t": [], "t2i": [], "positive": []}
    for b in range(num_batches):
        ids = picked[b * batch_size:(b + 1) * batch_size]
        image_ids = layout.owner[ids]
        sims = images[image_ids] @ caption_rows[b * batch_size:(b + 1) * batch_size].T
        positive = np.diag(sims).copy()
        sims[image_ids[:, None] == image_ids[None, :]] = -np.inf  # same image: not negative
        # Row i and column i are all masked alike: when every pair shares anchor i's image.
        keep = np.isfinite(sims.max(axis=1))
        out["i2t"].append(sims.max(axis=1)[keep])
        out["t2i"].append(sims.max(axis=0)[keep])
        out["positive"].append(positive[keep])
    return {k: np.concatenate(v).astype(np.float32) for k, v in out.items()}


@dataclass
class Offline:
    """One direction's candidates as scored for the diagnostics: ``top1`` (Q,) the first
    candidate of each row, ``sampled`` (Q, h') the range retraining samples from (each
    row's first eligible candidates under the false-negative filters), ``positive`` (Q,)
    each query's positive score (i2t: mean over its captions), ``rescored``: scores
    computed from the embeddings (imported candidates, or mined by another model) instead
    of read from the file, ``window`` (Q,) how many of a row's h' columns it samples from
    (t2i: fewer for captions of images with more captions than the fewest)."""

    top1: np.ndarray
    sampled: np.ndarray
    positive: np.ndarray
    rescored: bool
    window: np.ndarray
    dropped: np.ndarray | None = None  # (Q,) candidates the filters drop per row

    def sampled_values(self) -> np.ndarray:
        """(S,) the scores of each row's sampled range, row by row."""
        return self.sampled[np.arange(self.sampled.shape[1]) < self.window[:, None]]


def offline_scores(folder: str | Path, direction: str, embeddings: Embeddings,
                   pair_positive: np.ndarray, hardest: int, rules: SelectionRules,
                   words: CaptionWords | None = None) -> Offline:
    """Score one direction's candidates in ``folder`` for ``embeddings``'s model.

    ``pair_positive`` (C,): each caption's score with its image. ``hardest``: h (t2i
    samples from the top ceil(h / k), k its image's captions); ``rules``: the
    false-negative filters retraining applies (``words``: the split's captions, for the
    duplicate filter), so the sampled range is each row's first eligible candidates. The
    file must index the embeddings' dataset, split, image count and caption layout; its
    stored scores are used when it was mined from the same weights, otherwise candidates
    are rescored (and the ratio and margin filters, which need the miner's own scores, are
    left out, with a warning; the others still apply).
    """
    a, layout = embeddings.attrs, embeddings.layout
    cand = load_candidates(folder, direction, a["dataset"], a["split"], int(a["num_images"]),
                           min_k=1, layout=layout)
    window = sampling_windows(layout, hardest)[direction]
    keep = int(window.max(initial=1))
    positive = image_means(pair_positive, layout) if direction == "i2t" else pair_positive
    with h5py.File(cand.path, "r") as f:
        stored = "scores" in f and cand.attrs.get("weights") == a["weights"]
        scores = np.asarray(f["scores"], dtype=np.float32) if stored else None
    if scores is None:
        if cand.attrs.get("index") != "imported":
            log.warning("%s was mined with model weights %s, %s holds weights %s: its "
                        "candidates are scored with the latter", cand.path,
                        cand.attrs.get("weights"), embeddings.path, a["weights"])
        queries = np.repeat(np.arange(cand.indices.shape[0]), cand.k)
        targets = cand.indices.ravel().astype(np.int64)
        image_ids, caption_ids = ((queries, targets) if direction == "i2t"
                                  else (targets, queries))
        scores = pair_scores(embeddings.images, embeddings.captions, image_ids,
                             caption_ids).reshape(cand.indices.shape)
    dropped = None
    if not stored and rules.needs_scores:  # rescored: not the scores retraining filters by
        log.warning("%s: the ratio/margin filters need the miner's own scores, which this "
                    "file lacks for these embeddings; the sampled range shows the other "
                    "filters only", cand.path)
        rules = dataclasses.replace(rules, ratio=0.0, margin=0.0)
    if rules.active:
        reasons = drop_reasons(direction, Candidates(cand.path, cand.indices, cand.attrs, layout,
                                                     scores, positive), rules, words)
        dropped = (reasons > 0).sum(axis=1)
        selection = Selection.from_reasons(cand.indices, reasons)
        width = min(keep, cand.k)
        # Rows keeping fewer than the window repeat their last kept candidate's position,
        # as the sampler draws only from what they keep; rows keeping none, their last.
        columns = np.minimum(np.arange(width)[None, :],
                             np.maximum(selection.counts[:, None] - 1, 0))
        positions = np.where(selection.counts[:, None] > 0,
                             np.take_along_axis(selection.eligible, columns, axis=1),
                             cand.k - 1)
        sampled = np.take_along_axis(scores, positions, axis=1)
    else:
        sampled = scores[:, :min(keep, cand.k)]
    return Offline(scores[:, 0].copy(), sampled, positive, not stored,
                   np.minimum(window, sampled.shape[1]), dropped)


def image_means(values: np.ndarray, layout: CaptionLayout) -> np.ndarray:
    """(N,) float32 mean of the per-caption ``values`` (C,) over each image's captions."""
    grid, real = padded_captions(layout, np.arange(layout.num_images))
    sums = np.where(real, values[grid], np.float32(0)).sum(axis=1)
    return sums / layout.counts.astype(np.float32)


@dataclass
class RoundStats:
    """Everything one (embeddings, candidates) pair contributes to the figures.

    ``values[direction][quantity]``: 1-D arrays of similarities, quantity in
    :data:`QUANTITIES`; ``ranks[direction]``: 0-based positive ranks of the sampled
    queries; ``summary``: the figures' key numbers (JSON-ready); ``layout``: the caption
    layout of the embeddings' split."""

    label: str
    embeddings: Path
    candidates: Path
    layout: CaptionLayout
    values: dict = field(default_factory=dict)
    ranks: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def round_stats(embeddings_path: str | Path, candidates_dir: str | Path, label: str, *,
                batch_size: int, hardest: int, rules: SelectionRules = NO_FILTERS,
                words: CaptionWords | None = None, rank_sample: int = 1000,
                online_batches: int = 160, seed: int = 0) -> RoundStats:
    """The diagnostics of one round: its miner's embeddings and the candidates mined."""
    with open_embeddings(embeddings_path) as emb:
        n, layout = len(emb.images), emb.layout
        stats = RoundStats(label, Path(embeddings_path), Path(candidates_dir), layout)
        pair_positive = positive_scores("t2i", emb)  # (C,)
        online = online_hardest(emb.images, emb.captions, layout, batch_size, online_batches,
                                seed)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(rank_sample, n), replace=False))
        ranks = dict(zip(DIRECTIONS, positive_ranks(emb.images, emb.captions, layout, sample),
                         strict=True))
        summary = {"label": label, "embeddings": str(emb.path),
                   "candidates": str(candidates_dir), "weights": emb.attrs["weights"],
                   "rank_sample_images": len(sample), "online_anchors": len(online["i2t"]),
                   "online_batch_size": min(batch_size, layout.num_captions),
                   "captions_per_image": layout.identity()}
        for direction in DIRECTIONS:
            off = offline_scores(candidates_dir, direction, emb, pair_positive, hardest,
                                 rules, words)
            stats.values[direction] = {"positive": pair_positive, "online": online[direction],
                                       "offline_top1": off.top1,
                                       "offline_range": off.sampled_values()}
            stats.ranks[direction] = ranks[direction]
            summary[direction] = {
                **{f"median_{q}": float(np.median(v))
                   for q, v in stats.values[direction].items()},
                "online_above_positive": float(np.mean(online[direction] > online["positive"])),
                "offline_top1_above_positive": float(np.mean(off.top1 > off.positive)),
                "sampled_range": off.sampled.shape[1],
                "rescored": off.rescored,
                "filtered_per_query_mean": (None if off.dropped is None
                                            else float(off.dropped.mean())),
                **rank_metrics(ranks[direction])}
    stats.summary = summary
    return stats

