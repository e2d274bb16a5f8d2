"""Which offline candidates retraining may draw: false-negative-aware selection.

A candidate file ranks, for every query, K candidates hardest first (see
:mod:`stages.mining.candidate_files`). Mined negatives include true matches of the query that belong
to other images ("a white dog running in the snow" as a negative of a photo captioned "a
brown and white dog is running through the snow"); the filters below drop such suspects
*when the sampler draws*, from the scores and captions the files already hold, so changing
a filter never needs mining again. Each filter is off at 0:

* ``skip_top`` r: the r hardest candidates of every row (a rank range: skip the top r,
  sample from the next h; sentence-transformers' ``range_min``);
* ``false_negative_ratio`` ρ: candidates scoring above ρ x the query's positive score
  (positive-aware mining, NV-Retriever's TopK-PercPos keeps those below 0.95 x positive);
* ``false_negative_margin`` μ: candidates scoring above positive − μ (an absolute margin
  to the positive, sentence-transformers' ``absolute_margin``);
* ``duplicate_overlap`` τ: candidates whose text nearly repeats the anchor's: the Jaccard
  overlap of the word sets of two captions is at least τ, for i2t between the candidate
  caption and any of the anchor image's captions, for t2i between the anchor caption and
  any caption of the candidate image.

The query's positive score is the file's ``positive_scores`` (i2t: the mean over the
image's captions; t2i: the caption with its own image). What passes is the row's
*eligible* list, still hardest first; :class:`Selection` holds it as positions into the
row. The sampler draws from a window of it (see :mod:`stages.mining.sampler`): h wide for
i2t, ceil(h / k) for a caption of an image of k captions (:func:`sampling_windows`).
"""

import logging
import re
from dataclasses import dataclass

import numpy as np

from stages.core.errors import UserError
from stages.core.layout import CaptionLayout
from stages.data.vocab import file_sha256
from stages.mining.candidate_files import Candidates, load_candidates, padded_captions

log = logging.getLogger(__name__)

# Why a candidate was dropped: bit flags, several may apply to one candidate.
TOP = 1
RATIO = 2
MARGIN = 4
DUPLICATE = 8
REASONS = {TOP: "t", RATIO: "r", MARGIN: "m", DUPLICATE: "d"}
REASON_NAMES = {TOP: "skip_top", RATIO: "false_negative_ratio",
                MARGIN: "false_negative_margin", DUPLICATE: "duplicate_overlap"}


@dataclass(frozen=True)
class SelectionRules:
    """The filters' settings (``offcandi.*``); 0 turns a filter off."""

    skip_top: int = 0
    ratio: float = 0.0
    margin: float = 0.0
    duplicate_overlap: float = 0.0

    @classmethod
    def from_config(cls, offcandi) -> "SelectionRules":
        return cls(offcandi.skip_top, offcandi.false_negative_ratio,
                   offcandi.false_negative_margin, offcandi.duplicate_overlap)

    @property
    def needs_scores(self) -> bool:
        return self.ratio > 0 or self.margin > 0

    @property
    def active(self) -> bool:
        return bool(self.skip_top or self.ratio or self.margin or self.duplicate_overlap)


class CaptionWords:
    """Each caption's set of distinct words (lower-cased runs of letters and digits), as
    word ids padded to one length: ``ids`` (C, L) int32, padding −1, ``sizes`` (C,), and
    ``vocabulary_size`` V (ids are 0..V−1)."""

    def __init__(self, captions: list[str]):
        vocabulary: dict[str, int] = {}
        sets = [sorted({vocabulary.setdefault(w, len(vocabulary))
                        for w in re.findall(r"[a-z0-9]+", text.lower())}) for text in captions]
        self.vocabulary_size = len(vocabulary)
        self.sizes = np.array([len(s) for s in sets], dtype=np.int64)
        self.ids = np.full((len(sets), max(self.sizes.max(initial=0), 1)), -1, np.int32)
        for row, words in enumerate(sets):
            self.ids[row, :len(words)] = words


NO_FILTERS = SelectionRules()

# Own captions one word table holds: one bit each of its uint8 entries.
TABLE_BITS = 8


def sampling_windows(layout: CaptionLayout, hardest: int) -> dict[str, np.ndarray]:
    """How many eligible candidates each row's draw ranges over (:mod:`stages.mining.sampler`):
    i2t (N,) h for every image; t2i (C,) ceil(h / k) for a caption of an image of k captions
    (the sampler's I' = t2i[c][n // k] for n < h)."""
    counts = layout.counts[layout.owner]
    return {"i2t": np.full(layout.num_images, hardest, np.int64),
            "t2i": -(-hardest // counts)}


def window_text(window: np.ndarray) -> str:
    """A row-window array as text: ``"4"``, or ``"2-5"`` when rows differ."""
    low, high = (int(window.min()), int(window.max())) if len(window) else (0, 0)
    return str(high) if low == high else f"{low}-{high}"


def duplicate_scores(direction: str, indices: np.ndarray, words: CaptionWords,
                     layout: CaptionLayout, rows: np.ndarray | None = None,
                     block: int = 256) -> np.ndarray:
    """(Q, K) float32: the largest word overlap (Jaccard of word sets, exact; two empty
    captions overlap 0) between each candidate and its query's text: i2t, the candidate
    caption against each of the anchor image's captions; t2i, the anchor caption against
    each caption of the candidate image (captions owned as ``layout`` says). ``rows``: the
    query ids of ``indices``' rows (default 0..Q−1).

    Per block of queries, a (b, V + 1) table holds which of the query's own captions (one
    bit each, up to 8 per table) contain each word, so a candidate caption's overlaps are
    table lookups of its words: b x K x L x m operations (m captions per image), not a
    comparison of every word pair. Images of fewer captions than a block's widest repeat
    their last caption (:func:`~stages.mining.candidate_files.padded_captions`), which
    leaves the maxima as they are.
    """
    q, k = indices.shape
    rows = np.arange(q) if rows is None else np.asarray(rows)
    pad = words.vocabulary_size  # the table's always-empty column: padding looks it up
    ids = np.where(words.ids < 0, pad, words.ids)
    best = np.zeros((q, k), np.float32)
    for start in range(0, q, block):
        stop = min(q, start + block)
        n = stop - start
        if direction == "i2t":  # own: the anchor's captions; each candidate is one caption
            own, _ = padded_captions(layout, rows[start:stop])  # (n, m)
            theirs = indices[start:stop, :, None].astype(np.int64)  # (n, K, 1)
        else:  # own: the anchor caption; each candidate is an image of its captions
            own = rows[start:stop, None]
            theirs, _ = padded_captions(layout, indices[start:stop].ravel())
            theirs = theirs.reshape(n, k, -1)  # (n, K, m)
        for first in range(0, own.shape[1], TABLE_BITS):
            group = own[:, first:first + TABLE_BITS]
            table = np.zeros((n, pad + 1), np.uint8)
            for j in range(group.shape[1]):
                table[np.arange(n)[:, None], ids[group[:, j]]] |= np.uint8(1 << j)
            table[:, pad] = 0
            bits = table[np.arange(n)[:, None, None, None], ids[theirs]]  # (n, K, c, L)
            for j in range(group.shape[1]):
                common = ((bits >> j) & 1).sum(axis=-1)  # (n, K, c)
                union = words.sizes[group[:, j]][:, None, None] + words.sizes[theirs] - common
                jaccard = np.where(union > 0, common / np.maximum(union, 1), 0.0)
                best[start:stop] = np.maximum(best[start:stop], jaccard.max(axis=-1))
    return best


def drop_reasons(direction: str, candidates: Candidates, rules: SelectionRules,
                 words: CaptionWords | None = None, rows: np.ndarray | None = None
                 ) -> np.ndarray:
    """(Q, K) uint8: for each candidate, the bit flags of the filters that drop it (0: it
    stays eligible). ``candidates`` must hold scores when the ratio or margin filter is
    on, and ``words`` the split's captions when the duplicate filter is (owned as
    ``candidates.layout`` says)."""
    indices = candidates.indices
    reasons = np.zeros(indices.shape, np.uint8)
    if rules.skip_top:
        reasons[:, :rules.skip_top] |= TOP
    if rules.needs_scores:
        if candidates.scores is None or candidates.positive_scores is None:
            raise UserError(f"{candidates.path} has no candidate or positive scores (imported, "
                            "or mined before version 2), which offcandi.false_negative_ratio "
                            "and false_negative_margin need; mine again with `make offcandi` "
                            "or turn those filters off")
        positive = candidates.positive_scores[:, None]
        if rules.ratio:
            reasons[candidates.scores > rules.ratio * positive] |= RATIO
        if rules.margin:
            reasons[candidates.scores > positive - rules.margin] |= MARGIN
    if rules.duplicate_overlap:
        if words is None:
            raise ValueError("the duplicate filter needs the split's CaptionWords")
        overlap = duplicate_scores(direction, indices, words, candidates.layout, rows)
        reasons[overlap >= rules.duplicate_overlap] |= DUPLICATE
    return reasons


@dataclass
class Selection:
    """One direction's candidates as the sampler sees them: ``indices`` (Q, K) the mined
    candidate ids, ``eligible`` (Q, K) int32 positions into each row of the candidates
    that passed the filters (hardest first, then padding), ``counts`` (Q,) how many did."""

    indices: np.ndarray
    eligible: np.ndarray
    counts: np.ndarray

    @classmethod
    def from_reasons(cls, indices: np.ndarray, reasons: np.ndarray) -> "Selection":
        keep = reasons == 0
        # A stable sort puts each row's eligible positions first, in rank order.
        order = np.argsort(~keep, axis=1, kind="stable").astype(np.int32)
        return cls(indices, order, keep.sum(axis=1).astype(np.int64))

    @classmethod
    def unfiltered(cls, indices: np.ndarray) -> "Selection":
        q, k = indices.shape
        return cls(indices, np.broadcast_to(np.arange(k, dtype=np.int32), (q, k)),
                   np.full(q, k, np.int64))

    @property
    def k(self) -> int:
        return self.indices.shape[1]


def select(direction: str, candidates: Candidates, rules: SelectionRules,
           window: int | np.ndarray, words: CaptionWords | None = None) -> Selection:
    """Apply ``rules`` to a loaded candidate file and log what they drop; ``window`` (an
    int, or (Q,) per row) is how many eligible candidates the sampler draws from per row
    (:func:`sampling_windows`)."""
    if not rules.active:
        return Selection.unfiltered(candidates.indices)
    if rules.skip_top >= candidates.k:
        raise UserError(f"offcandi.skip_top={rules.skip_top} skips every one of the "
                        f"K={candidates.k} candidates per query of {candidates.path}; give "
                        f"skip_top < {candidates.k}, or mine a larger K")
    reasons = drop_reasons(direction, candidates, rules, words)
    selection = Selection.from_reasons(candidates.indices, reasons)
    empty = float((selection.counts == 0).mean())
    if empty == 1.0:
        raise UserError(f"the false-negative filters leave no candidate for any query of "
                        f"{candidates.path}, which would all train on their last, filtered "
                        "candidate; loosen the filters (aoq inspect shows what each one "
                        "drops) or mine a larger K")
    if empty:
        log.warning("%s: %.2f%% of the queries keep no candidate after the filters; they "
                    "train on their last (least similar) candidate (aoq inspect shows what "
                    "each filter drops)", candidates.path, 100 * empty)
    by_rule = ", ".join(f"{name} {(reasons & bit).astype(bool).sum(1).mean():.1f}"
                        for bit, name in REASON_NAMES.items() if (reasons & bit).any())
    short = selection.counts < window
    log.info("%s: the filters drop %.1f of K=%d candidates per query on average (%s); "
             "%.1f%% of queries keep fewer than the %s sampled from (they sample from what "
             "they keep), %d keep none (they fall back to their last candidate)",
             candidates.path, (reasons > 0).sum(1).mean(), candidates.k,
             by_rule or "none", 100 * short.mean(), window_text(np.atleast_1d(window)),
             int((selection.counts == 0).sum()))
    return selection


def load_selections(folder, dataset: str, split, hardest: int, weights: str,
                    rules: SelectionRules, words: CaptionWords | None
                    ) -> tuple[dict[str, Selection], dict[str, dict]]:
    """The candidate files ``folder/{i2t,t2i}.h5``, checked against ``split`` (the run's
    training :class:`~stages.data.dataset.Split` of ``dataset``: its images and caption
    layout) and the sampling windows of ``hardest`` (t2i needs ceil(h / the fewest captions
    an image has) columns; :func:`~stages.mining.candidate_files.load_candidates`;
    ``weights``: the hash of the model that must have mined them, empty for any), then
    filtered by ``rules``. Returns each direction's :class:`Selection` and its file's
    record (``weights``, ``k``, ``index``, ``sha256``)."""
    windows = sampling_windows(split.layout, hardest)
    i2t, t2i = (load_candidates(folder, direction, dataset, split.name, split.num_images,
                                int(windows[direction].max(initial=1)), weights,
                                with_scores=rules.needs_scores, layout=split.layout)
                for direction in windows)
    if i2t.attrs["weights"] != t2i.attrs["weights"]:
        raise UserError(f"{i2t.path} and {t2i.path} were mined with different models "
                        f"({i2t.attrs['weights']} vs {t2i.attrs['weights']}); mine both "
                        "again with `make offcandi`")
    log.info("offline negatives from %s (mined with %s), sampled from the top %d",
             folder, i2t.attrs.get("checkpoint"), hardest)
    selections = {c.attrs["direction"]: select(c.attrs["direction"], c, rules,
                                               windows[c.attrs["direction"]], words)
                  for c in (i2t, t2i)}
    records = {c.attrs["direction"]: {"weights": c.attrs["weights"], "k": c.k,
                                      "index": c.attrs.get("index", ""),
                                      "sha256": file_sha256(c.path)} for c in (i2t, t2i)}
    return selections, records
