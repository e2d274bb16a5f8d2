"""``aoq plot``: PNG figures of how hard the online and offline negatives are, per round.

Each round is a pair: the embeddings of the model that mined (``embeddings_train.h5``) and
the candidate folder mined from them. Written to the output folder (each atomically):

- ``similarities.png``: per round (rows) and direction (columns), histograms of the
  positive pairs' similarities, the hardest online negative in a random batch of
  ``train.batch_size``, the offline candidate ranked first, and the top-h range retraining
  samples from;
- ``positive_rank.png``: per direction, the cumulative distribution of the positive's
  rank among all training items for a sample of images (one curve per round);
- ``rounds.png``: each of those four distributions with the rounds overlaid;
- ``diagnostics.json``: the figures' key numbers per round (medians, how often a negative
  outscores the positive, training-split R@K of the sample).

The numbers come from :mod:`stages.mining.hardness`; figures are drawn with matplotlib's Agg
backend (no display needed).
"""

import logging
from pathlib import Path

import h5py
import numpy as np
from matplotlib.figure import Figure

from stages.config.sections import Config
from stages.core.errors import UserError
from stages.core.layout import CaptionLayout
from stages.data.captions import read_captions
from stages.io.atomic import atomic_path, write_json
from stages.mining.candidate_files import DIRECTIONS, candidate_path
from stages.mining.embedding_files import open_embeddings
from stages.mining.hardness import QUANTITIES, RoundStats, round_stats
from stages.mining.selection import CaptionWords, SelectionRules

log = logging.getLogger(__name__)

DIRECTION_NAMES = {"i2t": "image -> text", "t2i": "text -> image"}
COLOURS = {"positive": "tab:green", "online": "tab:orange", "offline_top1": "tab:red",
           "offline_range": "tab:blue"}
BINS = 80


def quantity_names(batch_size: int, hardest: int, layout: CaptionLayout
                   ) -> dict[str, dict[str, str]]:
    """Legend names per direction (t2i samples from the top ceil(h / k), k the captions of
    the caption's image in ``layout``)."""
    k = layout.per_image
    t2i = str(-(-hardest // k)) if k else f"ceil({hardest} / captions of the image)"
    return {d: {"positive": "positive pairs",
                "online": f"hardest online negative (batch {batch_size})",
                "offline_top1": "offline candidate #1",
                "offline_range": f"offline top {h} (sampled range)"}
            for d, h in (("i2t", str(hardest)), ("t2i", t2i))}


def _bins(values: list[np.ndarray]) -> np.ndarray:
    """Common histogram bins for the arrays drawn in one panel or row."""
    lo = min(float(v.min()) for v in values)
    hi = max(float(v.max()) for v in values)
    pad = 0.02 * (hi - lo) or 0.01
    return np.linspace(lo - pad, hi + pad, BINS + 1)


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def similarity_figure(rounds: list[RoundStats], names: dict) -> Figure:
    """Rows: rounds (each on its own similarity scale); columns: directions; each panel
    the four distributions."""
    fig = Figure(figsize=(13, 3.6 * len(rounds)), layout="constrained")
    axes = fig.subplots(len(rounds), 2, squeeze=False, sharex="row")
    for row, stats in zip(axes, rounds, strict=True):
        bins = _bins([v for d in DIRECTIONS for v in stats.values[d].values()])
        for ax, direction in zip(row, DIRECTIONS, strict=True):
            for q in QUANTITIES:
                v = stats.values[direction][q]
                ax.hist(v, bins=bins, density=True, histtype="step", linewidth=1.5,
                        color=COLOURS[q],
                        label=f"{names[direction][q]}: median {np.median(v):.4f}")
            ax.set_title(f"{stats.label}: {DIRECTION_NAMES[direction]}", fontsize=10)
            ax.set_ylabel("density")
            ax.set_xlabel("cosine similarity")
            _legend_above_curves(ax, len(QUANTITIES))
    fig.suptitle("Similarity of positives and of online vs offline hard negatives")
    return fig


def rank_figure(rounds: list[RoundStats], layout: CaptionLayout) -> Figure:
    """One panel per direction: CDF of the 1-based positive rank, one curve per round
    (``layout``: the captions of the first round's split)."""
    per_image = layout.per_image
    of_each = f" x {per_image} captions" if per_image else " x their captions"
    fig = Figure(figsize=(13, 4.5), layout="constrained")
    axes = fig.subplots(1, 2)
    colours = _round_colours(len(rounds))
    for ax, direction in zip(axes, DIRECTIONS, strict=True):
        for stats, colour in zip(rounds, colours, strict=True):
            ranks = np.sort(stats.ranks[direction]) + 1
            s = stats.summary[direction]
            ax.step(ranks, np.arange(1, len(ranks) + 1) / len(ranks), where="post",
                    color=colour, label=f"{stats.label}: R@1 {s['r1']:.1f}, R@5 {s['r5']:.1f}, "
                                        f"R@10 {s['r10']:.1f}, medr {s['medr']:.0f}")
        for k in (1, 5, 10):
            ax.axvline(k, color="grey", linewidth=0.5, linestyle=":")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.01)
        ax.set_xlabel("rank of the positive (1 = retrieved first)")
        ax.set_ylabel("fraction of queries with rank <= x")
        its = ("its only caption" if per_image == 1 else
               f"best of its {f'{per_image} ' if per_image else ''}captions")
        what = (f"{its} among all captions"
                if direction == "i2t" else "its image among all images")
        n = rounds[0].summary["rank_sample_images"]
        ax.set_title(f"{DIRECTION_NAMES[direction]}: {what}\n(training split, "
                     f"{n} sampled images{'' if direction == 'i2t' else of_each})",
                     fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    return fig


def rounds_figure(rounds: list[RoundStats], names: dict) -> Figure:
    """Rows: directions; columns: the four distributions; rounds overlaid."""
    fig = Figure(figsize=(18, 7.5), layout="constrained")
    axes = fig.subplots(2, len(QUANTITIES))
    colours = _round_colours(len(rounds))
    for row, direction in zip(axes, DIRECTIONS, strict=True):
        for ax, q in zip(row, QUANTITIES, strict=True):
            bins = _bins([stats.values[direction][q] for stats in rounds])
            for stats, colour in zip(rounds, colours, strict=True):
                v = stats.values[direction][q]
                ax.hist(v, bins=bins, density=True, histtype="step", linewidth=1.5,
                        color=colour, label=f"{stats.label}: median {np.median(v):.4f}")
            ax.set_title(f"{DIRECTION_NAMES[direction]}: {names[direction][q]}", fontsize=10)
            _legend_above_curves(ax, len(rounds))
    for ax in axes[-1]:
        ax.set_xlabel("cosine similarity")
    fig.suptitle("How the distributions move across rounds")
    return fig


def _legend_above_curves(ax, entries: int) -> None:
    """Room above the histograms' peaks for a legend of ``entries`` lines."""
    ax.set_ylim(0, ax.get_ylim()[1] * (1.1 + 0.1 * entries))
    ax.legend(fontsize=8, loc="upper left")


def _round_colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.85 * i / max(n - 1, 1)) for i in range(n)]


def recorded_embeddings(folder: Path) -> Path:
    """The embeddings file a candidate folder records it was mined from."""
    path = candidate_path(folder, "i2t")
    if not path.is_file():
        raise UserError(f"candidate file {path} not found; mine candidates with `make "
                        "offcandi`, or pass the folder that holds i2t.h5 and t2i.h5")
    try:
        with h5py.File(path, "r") as f:
            recorded = f.attrs.get("embeddings")
    except OSError as exc:
        raise UserError(f"{path}: cannot be read as HDF5 ({exc}); mine it again") from exc
    if not recorded:
        raise UserError(f"{path} records no embeddings file (imported candidates?); pass "
                        "--embeddings for each --candidates")
    return Path(str(recorded))


def _caption_words(embeddings_path: Path, config: Config, rules: SelectionRules
                   ) -> CaptionWords | None:
    """The words of the captions the embeddings index, when the duplicate filter is on."""
    if not rules.duplicate_overlap:
        return None
    with open_embeddings(embeddings_path) as emb:
        dataset, split = emb.attrs["dataset"], emb.attrs["split"]
    caps = Path(config.data.path) / dataset / f"{split}_caps.txt"
    if not caps.is_file():
        raise UserError(f"{caps} not found: offcandi.duplicate_overlap compares the captions "
                        f"of {dataset} {split}; point data.path at the datasets root that "
                        f"holds {dataset}/")
    return CaptionWords(read_captions(caps))


def plot(candidate_dirs: list[Path], embeddings: list[Path], config: Config, out_dir: Path,
         rank_sample: int = 1000, online_batches: int = 160, seed: int = 0) -> list[Path]:
    """Write the figures and ``diagnostics.json`` for rounds ``candidate_dirs`` (in order),
    each with its miner's embeddings (default: the path its files record)."""
    if not candidate_dirs:
        raise UserError("give at least one --candidates folder")
    if embeddings and len(embeddings) != len(candidate_dirs):
        raise UserError(f"{len(embeddings)} --embeddings for {len(candidate_dirs)} "
                        "--candidates: give one embeddings file per candidate folder (the "
                        "one it was mined from), or none to use the paths the files record")
    if rank_sample < 1 or online_batches < 1:
        raise UserError("--rank-sample and --online-batches must be at least 1")
    embeddings = embeddings or [recorded_embeddings(Path(d)) for d in candidate_dirs]
    rules = SelectionRules.from_config(config.offcandi)
    rounds = []
    for r, (emb, folder) in enumerate(zip(embeddings, candidate_dirs, strict=True), 1):
        label = f"round {r} ({Path(emb).parent.name})"
        log.info("%s: %s with candidates %s", label, emb, folder)
        rounds.append(round_stats(emb, folder, label, batch_size=config.train.batch_size,
                                  hardest=config.offcandi.hardest, rules=rules,
                                  words=_caption_words(emb, config, rules),
                                  rank_sample=rank_sample, online_batches=online_batches,
                                  seed=seed))
    layout = rounds[0].layout
    names = quantity_names(config.train.batch_size, config.offcandi.hardest, layout)
    out_dir = Path(out_dir)
    written = [_save(similarity_figure(rounds, names), out_dir / "similarities.png"),
               _save(rank_figure(rounds, layout), out_dir / "positive_rank.png"),
               _save(rounds_figure(rounds, names), out_dir / "rounds.png")]
    write_json(out_dir / "diagnostics.json", {"rounds": [r.summary for r in rounds]})
    written.append(out_dir / "diagnostics.json")
    for path in written:
        log.info("wrote %s", path)
    return written
