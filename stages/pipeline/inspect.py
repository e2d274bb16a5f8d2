"""``aoq inspect``: one query's offline candidates, as text a person can judge.

For an image: its captions, then its hardest candidate captions; for a caption: its
text and its image's other captions, then its hardest candidate images (each shown by its
first caption). Scores, the query's positive score, which candidates each false-negative
filter drops (:mod:`stages.mining.selection`) and the window retraining samples from are
shown where the file has them. The
captions come from the dataset the candidate file records (``<data.path>/<dataset>/
<split>_caps.txt``); only the query's row of the file is read.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from stages.core.errors import UserError
from stages.core.layout import CaptionLayout
from stages.data.captions import read_captions
from stages.io.atomic import plain_attrs
from stages.mining.candidate_files import (
    CANDIDATES_FORMAT,
    Candidates,
    candidate_path,
    file_layout,
    is_positive,
    queries_and_items,
)
from stages.mining.selection import (
    DUPLICATE,
    MARGIN,
    NO_FILTERS,
    RATIO,
    REASON_NAMES,
    REASONS,
    TOP,
    CaptionWords,
    SelectionRules,
    drop_reasons,
)


@dataclass
class QueryRow:
    """One query's row of a candidate file: ``indices`` (K,) int64, ``scores`` (K,)
    float32 or None (imported files), ``positive_score`` or None (files before version 2),
    the file's attributes and caption layout."""

    path: Path
    attrs: dict
    layout: CaptionLayout
    query: int
    indices: np.ndarray
    scores: np.ndarray | None
    positive_score: float | None


def _open(path: Path):
    if not path.is_file():
        raise UserError(f"candidate file {path} not found; mine candidates with `make "
                        "offcandi` (or `aoq offcandi`) and pass their folder to --candidates")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{path}: cannot be read as HDF5 ({exc}); mine it again") from exc
    found = f.attrs.get("format")
    if found != CANDIDATES_FORMAT:
        f.close()
        raise UserError(f"{path}: not a candidate file of this project (format {found!r}); "
                        "see offcandi/README.md")
    return f


def read_query(folder: str | Path, direction: str, query: int) -> QueryRow:
    """Read query ``query``'s row of ``folder/<direction>.h5``; an index outside the file's
    queries is an error that names the valid range."""
    path = candidate_path(folder, direction)
    with _open(path) as f:
        attrs = plain_attrs(f.attrs)
        if attrs.get("direction") != direction:
            raise UserError(f"{path} holds {attrs.get('direction')!r} candidates, not "
                            f"{direction}; mine the folder again with `make offcandi`")
        layout = file_layout(f, attrs, path)
        n, items = queries_and_items(direction, layout)
        if not 0 <= query < n:
            what = "image" if direction == "i2t" else "caption"
            raise UserError(f"{what} {query} is out of range: {path} holds {what}s 0..{n - 1} "
                            f"({attrs['num_images']} {attrs['split']} images of "
                            f"{attrs['dataset']})")
        indices = np.asarray(f["indices"][query], dtype=np.int64)
        scores = np.asarray(f["scores"][query], dtype=np.float32) if "scores" in f else None
        positive = float(f["positive_scores"][query]) if "positive_scores" in f else None
    if len(indices) and (indices.min() < 0 or indices.max() >= items):
        raise UserError(f"{path}: row {query} lists ids outside [0, {items}): the file is "
                        "damaged; mine it again with `make offcandi`")
    return QueryRow(path, attrs, layout, query, indices, scores, positive)


def caption_positive_scores(folder: str | Path, row: QueryRow, image: int
                            ) -> np.ndarray | None:
    """(k,) score of each of the k captions of ``image`` with it, from ``t2i.h5`` when it
    was mined by the same model and on the same captions as ``row``'s file and has positive
    scores; else None."""
    path = candidate_path(folder, "t2i")
    if not path.is_file():
        return None
    with _open(path) as f:
        attrs = plain_attrs(f.attrs)
        if ("positive_scores" not in f or attrs.get("weights") != row.attrs.get("weights")
                or file_layout(f, attrs, path) != row.layout):
            return None
        own = row.layout.captions_of(image)
        return np.asarray(f["positive_scores"][own.start:own.stop])


def dataset_captions(row: QueryRow, data_path: str | Path) -> tuple[list[str], Path]:
    """The captions of the split ``row``'s candidate file indexes, checked against its
    caption count: under ``data_path``, else in the dataset folder the file records it was
    mined from (``dataset_dir``, absolute)."""
    attrs, path = row.attrs, row.path
    name = f"{attrs['split']}_caps.txt"
    caps_file = Path(data_path) / attrs["dataset"] / name
    if not caps_file.is_file() and attrs.get("dataset_dir"):
        recorded = Path(str(attrs["dataset_dir"])) / name
        caps_file = recorded if recorded.is_file() else caps_file
    if not caps_file.is_file():
        raise UserError(f"{caps_file} not found: {path} indexes {attrs['dataset']} "
                        f"{attrs['split']}; point data.path at the datasets root that holds "
                        f"{attrs['dataset']}/ (--set data.path=... or DATA_PATH=...)")
    captions = read_captions(caps_file)
    want = row.layout.num_captions
    if len(captions) != want:
        raise UserError(f"{caps_file} has {len(captions)} captions, but {path} indexes "
                        f"{attrs['num_images']} images ({want} captions): another dataset "
                        "or a changed split")
    return captions, caps_file


def _row_reasons(row: QueryRow, rules: SelectionRules, captions: list[str] | None
                 ) -> np.ndarray:
    """(K,) uint8 drop flags of the row's candidates (:func:`drop_reasons`); the ratio and
    margin filters are left out when the file lacks the scores they need."""
    if rules.needs_scores and (row.scores is None or row.positive_score is None):
        rules = dataclasses.replace(rules, ratio=0.0, margin=0.0)
    one = Candidates(row.path, row.indices[None], row.attrs, row.layout,
                     None if row.scores is None else row.scores[None],
                     None if row.positive_score is None
                     else np.array([row.positive_score], dtype=np.float32))
    words = CaptionWords(captions) if rules.duplicate_overlap else None
    return drop_reasons(row.attrs["direction"], one, rules, words,
                        rows=np.array([row.query]))[0]


def _filter_lines(row: QueryRow, rules: SelectionRules, reasons: np.ndarray,
                  window: int, positive_what: str) -> list[str]:
    """What the false-negative filters do for this query, as text lines."""
    lines = []
    if row.scores is None:
        lines.append("no scores in this file (imported candidates): scores and the "
                     "score filters cannot be shown")
    elif row.positive_score is None:
        lines.append(f"no positive scores in this file (version {row.attrs.get('version')}, "
                     "mined before they were stored): the score filters cannot be shown; "
                     "mine again with `make offcandi`")
    else:
        lines.append(f"positive score {row.positive_score:.4f} ({positive_what})")
    if not rules.active:
        lines.append("false-negative filters off (offcandi.false_negative_ratio, "
                     "false_negative_margin, duplicate_overlap, skip_top all 0); e.g. "
                     "--set offcandi.false_negative_ratio=0.95 marks candidates scoring "
                     "above 0.95 x the positive")
        return lines
    if rules.needs_scores and (row.scores is None or row.positive_score is None):
        lines.append("the ratio/margin filters need the file's scores: left out below")
    settings = [f"{REASON_NAMES[bit]}={value:g}" for bit, value in (
        (TOP, rules.skip_top), (RATIO, rules.ratio), (MARGIN, rules.margin),
        (DUPLICATE, rules.duplicate_overlap)) if value]
    lines.append(f"filters {', '.join(settings)}: the mark says which dropped a candidate "
                 "(t: among the skip_top hardest, r: above ratio x positive, m: above "
                 "positive - margin, d: nearly repeats the anchor's words)")
    kept = int((reasons == 0).sum())
    lines.append(f"  dropped: {len(reasons) - kept} of this query's K={len(reasons)} "
                 f"candidates; retraining samples from the first {min(kept, window)} of the "
                 f"{kept} kept (window {window})"
                 + ("" if kept else "; none kept: it falls back to the last candidate"))
    return lines


def _table(row: QueryRow, top: int, reasons: np.ndarray, window: int,
           describe) -> list[str]:
    """The top candidates, hardest first: rank, score, mark, id, text. Marks: ``+`` a
    positive (a broken file), the letters of the filters that drop it, ``*`` in the
    window retraining samples from (under ``offcandi.curriculum_epochs``, its window from
    epoch E + 1 on: earlier epochs sample easier kept candidates)."""
    direction = row.attrs["direction"]
    shown = min(top, len(row.indices))
    positive = is_positive(direction, np.array([row.query]), row.indices[None, :shown],
                           row.layout)[0]
    sampled = np.zeros(len(row.indices), bool)
    sampled[np.flatnonzero(reasons == 0)[:window]] = True
    lines = []
    for rank in range(shown):
        score = "     -" if row.scores is None else f"{row.scores[rank]:.4f}"
        if positive[rank]:
            mark = "+"
        elif reasons[rank]:
            mark = "".join(letter for bit, letter in REASONS.items() if reasons[rank] & bit)
        else:
            mark = "*" if sampled[rank] else " "
        lines.append(f"{rank + 1:5d}  {score} {mark:<4} {describe(int(row.indices[rank]))}")
    if positive.any():
        lines.append(f"+ a positive of the query listed as a negative: {row.path} is broken "
                     "(another caption order?); mine it again")
    return lines


def _header(row: QueryRow) -> str:
    a = row.attrs
    made = (f"imported from {a.get('checkpoint')}" if a.get("index") == "imported"
            else f"mined with {a.get('checkpoint')}, {a.get('index')} index")
    return (f"{row.path}: {a['direction']} candidates of {a['dataset']} {a['split']} "
            f"({a['num_images']} images), K={len(row.indices)}, {made}")


def inspect_image(folder: str | Path, image: int, data_path: str | Path, top: int = 10,
                  rules: SelectionRules = NO_FILTERS, hardest: int = 300) -> str:
    """Image ``image``'s captions and its ``top`` hardest candidate captions, as text,
    marked by the false-negative ``rules``; ``hardest``: h, the window retraining samples
    from."""
    row = read_query(folder, "i2t", image)
    captions, caps_file = dataset_captions(row, data_path)
    own = caption_positive_scores(folder, row, image)
    mine = row.layout.captions_of(image)
    lines = [_header(row), "", f"image {image}, its {len(mine)} caption"
             f"{'s' if len(mine) > 1 else ''} "
             f"({caps_file}{', score with the image' if own is not None else ''}):"]
    for j, c in enumerate(mine):
        score = f"{own[j]:.4f}" if own is not None else "     -"
        lines.append(f"       {score} +  caption {c:>7}  {captions[c]}")
    reasons = _row_reasons(row, rules, captions)
    owner = row.layout.owner
    lines += ["", *_filter_lines(row, rules, reasons, hardest,
                                 f"mean over the {len(mine)} caption"
                                 f"{'s' if len(mine) > 1 else ''}"),
              "", f"top {min(top, len(row.indices))} of {len(row.indices)} candidate "
              "captions, hardest first (* in the window retraining samples from):",
              " rank   score  mark candidate (caption id, its image)"]
    lines += _table(row, top, reasons, hardest,
                    lambda c: f"caption {c:>7} (image {owner[c]:>6})  {captions[c]}")
    return "\n".join(lines)


def inspect_caption(folder: str | Path, caption: int, data_path: str | Path, top: int = 10,
                    rules: SelectionRules = NO_FILTERS, hardest: int = 300) -> str:
    """Caption ``caption``, its image's other captions and its ``top`` hardest candidate
    images (each shown by its first caption), as text; retraining samples from the top
    ceil(h / k) of them, k the captions of its image."""
    row = read_query(folder, "t2i", caption)
    captions, caps_file = dataset_captions(row, data_path)
    image = int(row.layout.owner[caption])
    own = caption_positive_scores(folder, row, image)
    mine = row.layout.captions_of(image)
    others = [(j, c) for j, c in enumerate(mine) if c != caption]
    lines = [_header(row), "", f"caption {caption} ({caps_file}):", f"    {captions[caption]}",
             f"its image {image}, whose other captions are"
             f"{' (score with the image)' if own is not None else ''}:"
             if others else f"its image {image}, which has no other caption"]
    for j, c in others:
        score = f"{own[j]:.4f}" if own is not None else "     -"
        lines.append(f"       {score} +  caption {c:>7}  {captions[c]}")
    window = -(-hardest // len(mine))
    first = row.layout.first_caption
    reasons = _row_reasons(row, rules, captions)
    lines += ["", *_filter_lines(row, rules, reasons, window, "the caption with its image"),
              "", f"top {min(top, len(row.indices))} of {len(row.indices)} candidate images, "
              "hardest first (each by its first caption; * in the window retraining samples "
              "from):", " rank   score  mark candidate"]
    lines += _table(row, top, reasons, window,
                    lambda i: f"image {i:>7}  {captions[first[i]]}")
    return "\n".join(lines)
