"""The loss-comparison table (``make table``): one row per cell, loss x offline negatives
(no/yes) x batch size x seed, each cell a run trained for the same epochs, from scratch or
all from one ``init`` checkpoint.

A cell's run folder is ``<table dir>/<loss>-<off|on>-b<batch>[-s<seed>]/`` (seed 0 has no
suffix) holding the run's ``checkpoint.pt`` and ``eval.jsonl`` (the records ``aoq eval
--out --ranks`` appends). "on" cells are trained with offline negatives mined by
``mined_by`` when given (a checkpoint, ``text:<model folder>`` or ``clip:<arch>:<weights
file>``: :mod:`stages.pipeline.miners`), else by the ``init`` checkpoint when there is one, else by
the cell ``<miner>-off-b<batch>`` (the VSE++ base of the same batch size, seed 0). Losses
that only exist with offline negatives (AOQ's ``aoq``/``offquin``/``offtri``) have only an
"on" cell; their matched control is the "off" cell of the loss they add offline terms to
(the loss class's ``online_counterpart``, ``vse_max``), planned even when not listed.

Every "on" cell is paired with its control of the same batch size and seed (same loss, or
its counterpart; same init and epochs; no offline negatives). :func:`pair_rows` reports per
pair the rsum difference averaged over seeds, its spread over seeds and a 95% paired
bootstrap interval over the test images (resampling images with their captions, both
models scored on the same resample; rsum is the mean over images of a per-image sum, see
:func:`per_image_rsum`).

:func:`collect_rows` builds the rows from the cells' checkpoints and eval records and checks
that they belong together: the eval record is the one of the checkpoint's current weights
(a record of earlier weights is never used), the checkpoint was trained as its cell says
(loss, offline negatives, batch size, seed, init), every cell trained the same epochs,
"on" cells used candidates mined by their miner, and every row was evaluated on the same
split and protocol, with the same captions per image. :func:`write_table` writes
``table.md``, ``table.csv`` (one line per cell), ``pairs.csv`` and ``table.png`` (each
pair's rsum side by side).
"""

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.core.errors import UserError
from stages.core.layout import LEGACY_CAPTIONS_PER_IMAGE, CaptionLayout
from stages.io.atomic import atomic_path, write_text
from stages.io.checkpoint import load_checkpoint, weights_hash
from stages.metrics.retrieval import RECALL_KS

BOOTSTRAP_RESAMPLES = 2000

log = logging.getLogger(__name__)

DIRECTIONS = ("i2t", "t2i")
METRIC_KEYS = [f"{key}_{d}" for d in DIRECTIONS
               for key in (*(f"r{k}" for k in RECALL_KS), "medr")] + ["rsum"]
CSV_COLUMNS = ["loss", "offline_negatives", "finetune", "batch_size", "seed", "epochs",
               "best_epoch",
               *METRIC_KEYS, "meanr_i2t", "meanr_t2i", "weights", "negatives_mined_by",
               "checkpoint", "init", "mined_by", "dataset", "split", "protocol", "images",
               "captions_per_image"]
PAIR_COLUMNS = ["loss", "control", "batch_size", "seeds", "control_rsum", "control_rsum_std",
                "offline_rsum", "offline_rsum_std", "delta_rsum", "delta_std",
                "delta_ci_low", "delta_ci_high", "delta_per_seed"]


@dataclass(frozen=True)
class Cell:
    """One run of the grid: ``loss`` trained with (``offline``) or without offline
    negatives at ``batch_size``, with ``train.seed`` = ``seed``."""

    loss: str
    offline: bool
    batch_size: int
    seed: int = 0

    @property
    def name(self) -> str:
        """The run folder's name: ``<loss>-<off|on>-b<batch>``, ``-s<seed>`` for seed > 0."""
        return (f"{self.loss}-{'on' if self.offline else 'off'}-b{self.batch_size}"
                + (f"-s{self.seed}" if self.seed else ""))

    @property
    def group(self) -> tuple[str, bool, int]:
        """What the cell's seeds share: (loss, offline, batch size)."""
        return self.loss, self.offline, self.batch_size


def split_words(text: str) -> list[str]:
    """``"a b,c"`` -> ``["a", "b", "c"]`` (the Makefile passes lists space-separated)."""
    return [w for w in text.replace(",", " ").split() if w]


def parse_batches(text: str) -> list[int]:
    """Batch sizes from ``"128 256"``; each a positive integer, none twice."""
    batches = []
    for word in split_words(text):
        if not word.isdigit() or int(word) < 1:
            raise UserError(f"batch size {word!r} is not a positive integer; give e.g. "
                            "BATCHES='128 256'")
        batches.append(int(word))
    if not batches:
        raise UserError("no batch size given; give e.g. BATCHES=128")
    if len(set(batches)) != len(batches):
        raise UserError(f"a batch size is listed twice in {text!r}")
    return batches


def _offline_only(loss: str) -> bool:
    """Whether the registered loss ``loss`` needs offline negatives (unknown: an error
    that lists the known losses)."""
    from stages.losses import LOSSES

    return LOSSES.class_of(loss).requires_offline


def control_loss(loss: str) -> str:
    """The loss of an offline cell's matched control: itself, or for a loss that needs
    offline negatives the loss it adds its offline terms to."""
    from stages.losses import LOSSES

    cls = LOSSES.class_of(loss)
    return cls.online_counterpart if cls.requires_offline else loss


def plan_cells(losses: list[str], batches: list[int], miner: str, seeds: int = 1
               ) -> list[Cell]:
    """The table's rows in order: per batch size, per loss as listed (then the controls of
    offline-only losses not listed), "off" then "on", per seed 0..``seeds`` − 1; losses
    that need offline negatives get only an "on" cell."""
    if seeds < 1:
        raise UserError(f"SEEDS={seeds}: give a whole number >= 1")
    if not losses:
        raise UserError("no loss given; give e.g. LOSSES='vse_max aoq'")
    if len(set(losses)) != len(losses):
        raise UserError(f"a loss is listed twice in {' '.join(losses)!r}")
    for loss in [*losses, miner]:
        if "-" in loss:  # run folders are <loss>-<off|on>-b<batch>
            raise UserError(f"loss name {loss!r} contains '-'; the table cannot name its run")
    if _offline_only(miner):
        raise UserError(f"miner {miner!r} needs offline negatives itself; the miner must be "
                        "a loss trained without them (vse_max: VSE++)")
    offline_only = {loss: _offline_only(loss) for loss in losses}
    controls = [c for c in dict.fromkeys(control_loss(loss) for loss in losses)
                if c not in losses]
    offline_of = {**offline_only, **{c: None for c in controls}}
    variants = {True: (True,), False: (False, True), None: (False,)}
    return [Cell(loss, offline, batch, seed) for batch in batches
            for loss in [*losses, *controls] for offline in variants[offline_of[loss]]
            for seed in range(seeds)]


def _eval_record(path: Path, weights: str) -> dict:
    """The last single-model eval record in ``path`` of the model with ``weights``."""
    if not path.is_file():
        raise UserError(f"{path} not found: the cell has not been evaluated; run `make "
                        "table` again (it evaluates what is missing)")
    found = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}, line {number}: not JSON ({exc.msg}); delete the file "
                            "and run `make table` again to re-evaluate") from exc
        if record.get("stage") == "eval" and record.get("weights") == [weights]:
            found = record
    if found is None:
        raise UserError(f"{path} has no eval record of the current {path.parent}/"
                        f"checkpoint.pt (weights {weights}): its records are of other "
                        f"weights; delete {path} and run `make table` again")
    return found


def _same_path(a: str, b: str) -> bool:
    return (a == b == "") or (bool(a) and bool(b) and Path(a).resolve() == Path(b).resolve())


def _check_trained_as(cell: Cell, config: dict, path: Path, init: str) -> None:
    """The checkpoint's own config must say what the cell's name says."""
    expected = {"loss.name": cell.loss, "train.offline_negatives": cell.offline,
                "train.batch_size": cell.batch_size, "train.seed": cell.seed,
                "train.init_from": init}
    for key, want in expected.items():
        section, name = key.split(".")
        got = config.get(section, {}).get(name)
        if got != want and not (key == "train.init_from" and _same_path(got or "", want)):
            raise UserError(f"{path} was trained with {key}={got!r}, but its cell "
                            f"{cell.name} needs {want!r}; delete {path.parent} and run "
                            "`make table` again")


def collect_rows(table_dir: str | Path, cells: list[Cell], miner: str, init: str = "",
                 mined_by: str = "") -> list[dict]:
    """One row per cell (keys :data:`CSV_COLUMNS`, plus ``ranks`` when its eval record has
    them) from its checkpoint and eval record, checked as the module docstring says.
    ``mined_by``: what mined the "on" cells' candidates (as :mod:`stages.pipeline.miners` names
    it; default: ``init``, else the miner cell)."""
    table_dir = Path(table_dir)
    miner_weights: dict[int, str] = {}

    def load(cell: Cell) -> tuple[Path, dict, str]:
        path = table_dir / cell.name / "checkpoint.pt"
        if not path.is_file():
            raise UserError(f"{path} not found: cell {cell.name} has not finished "
                            "training; run `make table` again (it resumes)")
        state = load_checkpoint(path)
        return path, state, weights_hash(state["state_dict"])

    def miner_of(batch_size: int) -> tuple[str, str]:
        source = mined_by or init
        if batch_size not in miner_weights:
            if source:
                from stages.pipeline.miners import miner_weights as weights_of
                miner_weights[batch_size] = weights_of(source)
            else:
                miner_weights[batch_size] = load(Cell(miner, False, batch_size))[2]
        return miner_weights[batch_size], source or f"{miner}-off-b{batch_size}"

    rows = []
    for cell in cells:
        path, state, weights = load(cell)
        _check_trained_as(cell, state["config"], path, init)
        miner_hash = miner_name = ""
        if cell.offline:
            miner_hash, miner_name = miner_of(cell.batch_size)
            used = state["data_fingerprint"].get("candidates", {})
            used_weights = {d.get("weights") for d in used.values()}
            if used_weights != {miner_hash}:
                raise UserError(f"{path} was trained with candidates mined by weights "
                                f"{', '.join(sorted(map(str, used_weights))) or 'unknown'}, "
                                f"not by its miner {miner_name} (weights {miner_hash}); "
                                f"delete {path.parent} and run `make table` again")
        record = _eval_record(table_dir / cell.name / "eval.jsonl", weights)
        rows.append({"loss": cell.loss, "offline_negatives": "yes" if cell.offline else "no",
                     "finetune": finetune(state["model"]), "batch_size": cell.batch_size,
                     "seed": cell.seed, "epochs": state["config"]["train"]["epochs"],
                     "best_epoch": state["best_epoch"],
                     **{k: record[k] for k in [*METRIC_KEYS, "meanr_i2t", "meanr_t2i"]},
                     "weights": weights, "negatives_mined_by": miner_hash,
                     "checkpoint": str(path), "init": init, "mined_by": miner_name,
                     "dataset": record["dataset"],
                     "split": record["split"], "protocol": record["protocol"],
                     "images": record["images"],
                     "captions_per_image": record.get("captions_per_image",
                                                      LEGACY_CAPTIONS_PER_IMAGE),
                     "ranks": record.get("ranks")})
    _check_comparable(rows)
    return rows


def ranks_layout(ranks: dict) -> CaptionLayout:
    """The caption layout of an eval record's ``ranks``: its ``caption_counts`` when images
    own different numbers of captions, else as many per image as the ranks say (5 in
    records written before layouts)."""
    if "caption_counts" in ranks:
        layout = CaptionLayout.from_counts(ranks["caption_counts"])
    else:
        num_images = len(ranks["i2t"])
        layout = CaptionLayout.uniform(num_images, len(ranks["t2i"]) // max(num_images, 1))
    if (layout.num_images, layout.num_captions) != (len(ranks["i2t"]), len(ranks["t2i"])):
        raise UserError(f"an eval record's ranks do not fit its captions: "
                        f"{len(ranks['i2t'])} i2t and {len(ranks['t2i'])} t2i ranks for "
                        f"{layout!r}; delete that cell's eval.jsonl and run `make table` "
                        "again (it re-evaluates)")
    return layout


def per_image_rsum(ranks: dict) -> np.ndarray:
    """(N,) each test image's share of rsum, so that rsum is the mean over images: 100 x
    (its i2t hits at K = 1, 5, 10 plus its captions' t2i hits times images / captions of
    its fold; with n captions per image, the mean over its n captions). ``ranks``: an eval
    record's ``{"i2t": (N,), "t2i": (C,)}`` 0-based ranks, with ``caption_counts`` (N,)
    when images own different numbers of captions and ``folds`` when there were several
    (its rsum averages each fold's recalls)."""
    layout = ranks_layout(ranks)
    i2t, t2i = np.asarray(ranks["i2t"]), np.asarray(ranks["t2i"])
    hits_i2t = sum((i2t < k).astype(np.float64) for k in RECALL_KS)
    hits_t2i = sum((t2i < k).astype(np.float64) for k in RECALL_KS)
    per_image = np.add.reduceat(hits_t2i, layout.first_caption)  # (N,) its captions' sum
    fold = np.arange(layout.num_images) // (layout.num_images // ranks.get("folds", 1))
    fold_images = np.bincount(fold).astype(np.float64)  # (folds,)
    fold_captions = np.bincount(fold, weights=layout.counts)  # (folds,)
    return 100.0 * (hits_i2t + per_image * fold_images[fold] / fold_captions[fold])


def paired_bootstrap(offline: np.ndarray, control: np.ndarray,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
                     ) -> tuple[float, float]:
    """95% percentile interval of mean(offline) − mean(control) over the test images,
    resampling images with replacement (the same images for both: a paired test).
    ``offline``/``control``: (S, N) per-image rsum shares of S seeds each, averaged over
    seeds before the difference."""
    difference = offline.mean(axis=0) - control.mean(axis=0)  # (N,)
    picks = np.random.default_rng(seed).integers(0, len(difference),
                                                 (resamples, len(difference)))
    means = difference[picks].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def group_rows(rows: list[dict]) -> list[dict]:
    """One row per (loss, offline negatives, batch size), in table order: every metric the
    mean over its seeds, with ``seeds`` and ``rsum_std`` (sample std over seeds, 0 for one
    seed) and the epochs of the best checkpoint per seed."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["loss"], row["offline_negatives"], row["batch_size"]),
                          []).append(row)
    out = []
    for members in groups.values():
        first = members[0]
        out.append({**{k: first[k] for k in ("loss", "offline_negatives", "finetune",
                                             "batch_size", "epochs")},
                    **{k: float(np.mean([m[k] for m in members])) for k in METRIC_KEYS},
                    "seeds": len(members), "rsum_std": _std([m["rsum"] for m in members]),
                    "best_epochs": [m["best_epoch"] for m in members],
                    "weights": [m["weights"] for m in members]})
    return out


def pair_rows(rows: list[dict]) -> list[dict]:
    """Each offline group against its matched control, seed by seed (keys
    :data:`PAIR_COLUMNS`); the interval needs every row's ``ranks``."""
    by_cell = {(r["loss"], r["offline_negatives"], r["batch_size"], r["seed"]): r
               for r in rows}
    pairs: dict[tuple, list[tuple[dict, dict]]] = {}
    for (loss, offline, batch, seed), row in by_cell.items():
        if offline == "yes":
            control = by_cell.get((control_loss(loss), "no", batch, seed))
            if control is None:
                raise UserError(f"{row['checkpoint']} has no matched control "
                                f"{control_loss(loss)}-off-b{batch} with seed {seed}")
            pairs.setdefault((loss, control_loss(loss), batch), []).append((row, control))
    out = []
    for (loss, control, batch), members in pairs.items():
        for row in (r for pair in members for r in pair):
            if row["ranks"] is None:
                raise UserError(f"the eval record of {row['checkpoint']} holds no per-query "
                                "ranks, which the paired bootstrap needs: delete its "
                                "eval.jsonl and run `make table` again (it evaluates with "
                                "--ranks)")
        deltas = [on["rsum"] - off["rsum"] for on, off in members]
        low, high = paired_bootstrap(np.stack([per_image_rsum(on["ranks"]) for on, _ in members]),
                                     np.stack([per_image_rsum(off["ranks"])
                                               for _, off in members]))
        out.append({"loss": loss, "control": control, "batch_size": batch,
                    "seeds": len(members),
                    "control_rsum": float(np.mean([off["rsum"] for _, off in members])),
                    "control_rsum_std": _std([off["rsum"] for _, off in members]),
                    "offline_rsum": float(np.mean([on["rsum"] for on, _ in members])),
                    "offline_rsum_std": _std([on["rsum"] for on, _ in members]),
                    "delta_rsum": float(np.mean(deltas)), "delta_std": _std(deltas),
                    "delta_ci_low": low, "delta_ci_high": high,
                    "delta_per_seed": " ".join(f"{d:+.1f}" for d in deltas)})
    return out


def finetune(model: dict) -> str:
    """"yes" when the checkpoint's model (its ``{"name", "args"}`` entry) trained its image
    backbone from raw images (``vse_cnn`` with ``finetune``; ``clip``, whose image tower
    always trains), else "no" (precomputed features, or a frozen backbone)."""
    return "yes" if model["args"].get("finetune") or model["name"] == "clip" else "no"


def _check_comparable(rows: list[dict]) -> None:
    """Every row trained the same epochs and was evaluated on the same split/protocol (and
    the same captions per image: records written before layouts hold 5)."""
    for keys, what in ((("epochs",), "trained for different epochs"),
                       (("dataset", "split", "protocol", "images", "captions_per_image"),
                        "evaluated differently")):
        seen = {tuple(r[k] for k in keys): r["checkpoint"] for r in rows}
        if len(seen) > 1:
            listed = "; ".join(f"{path}: {', '.join(map(str, value))}"
                               for value, path in seen.items())
            raise UserError(f"the cells were {what} ({'/'.join(keys)}): {listed}. A table "
                            "compares equals: delete the odd cells' folders and run `make "
                            "table` again")


def _number(value: float) -> str:
    return f"{value:.1f}"


def format_markdown(rows: list[dict], pairs: list[dict], miner: str, init: str = "",
                    mined_by: str = "") -> str:
    """The table as Markdown: the cells (mean over seeds), then each offline cell beside
    its matched control, with a line that says what was compared on what."""
    first = rows[0]
    protocol = (f"5-fold {first['images']}" if first["protocol"] == "5fold"
                else f"{first['images']} images")
    groups = group_rows(rows)
    seeds = max(g["seeds"] for g in groups)
    start = (f"continued from {init}" if init else "trained from scratch")
    mined = (f"mined by {mined_by or init}" if mined_by or init
             else f"mined by the {miner} model without them of the same batch size")
    header = ["loss", "offline negatives", "finetune", "batch", "epochs (best)", "seeds",
              *(f"{d} {m}" for d in DIRECTIONS for m in (*(f"R@{k}" for k in RECALL_KS),
                                                         "medr")), "rsum", "weights"]
    lines = [f"Loss comparison on {first['dataset']} {first['split']} ({protocol}). Every "
             f"cell {start} for {first['epochs']} epochs, with train.seed 0..{seeds - 1}; "
             f"offline negatives {mined}. Metrics are means over the seeds (rsum ± the "
             "sample std over seeds); `weights`: hashes of the evaluated checkpoints.", "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"]
    for g in groups:
        rsum = _number(g["rsum"]) + (f" ± {g['rsum_std']:.1f}" if g["seeds"] > 1 else "")
        cells = [g["loss"], g["offline_negatives"], g["finetune"], str(g["batch_size"]),
                 f"{g['epochs']} ({', '.join(map(str, g['best_epochs']))})", str(g["seeds"]),
                 *(_number(g[k]) for k in METRIC_KEYS[:-1]), rsum,
                 " ".join(f"`{w}`" for w in g["weights"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Offline negatives against their matched control (same loss, or the loss "
              "AOQ adds its terms to; same init, epochs and seed). Δ: offline − control "
              "rsum, the mean over seeds; CI: 95% paired bootstrap over the test images "
              f"({BOOTSTRAP_RESAMPLES} resamples; it does not cover seed variation, the std "
              "over seeds does).", "",
              "| offline | control | batch | seeds | control rsum | offline rsum | Δ rsum | "
              "Δ std over seeds | 95% CI | Δ per seed |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for q in pairs:
        lines.append(
            f"| {q['loss']} | {q['control']} | {q['batch_size']} | {q['seeds']} | "
            f"{q['control_rsum']:.1f} ± {q['control_rsum_std']:.1f} | "
            f"{q['offline_rsum']:.1f} ± {q['offline_rsum_std']:.1f} | "
            f"{q['delta_rsum']:+.1f} | {q['delta_std']:.1f} | "
            f"[{q['delta_ci_low']:+.1f}, {q['delta_ci_high']:+.1f}] | {q['delta_per_seed']} |")
    return "\n".join(lines) + "\n"


def format_csv(rows: list[dict], columns: list[str] = CSV_COLUMNS) -> str:
    """Rows as CSV with a header line (default columns :data:`CSV_COLUMNS`)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n",
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_pairs(pairs: list[dict], rows: list[dict], path: Path) -> None:
    """Each offline cell's rsum beside its control's (means over seeds, bars of the std
    over seeds), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(1.3 * len(pairs) + 4.0, 3.6))
    x = np.arange(len(pairs))
    for offset, key, colour, label in ((-0.2, "control", "tab:blue", "control (no offline)"),
                                       (0.2, "offline", "tab:orange", "offline negatives")):
        bars = ax.bar(x + offset, [q[f"{key}_rsum"] for q in pairs], width=0.4,
                      yerr=[q[f"{key}_rsum_std"] for q in pairs], capsize=3, color=colour,
                      label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(x, [f"{q['loss']} vs {q['control']}\nb{q['batch_size']}, "
                      f"Δ {q['delta_rsum']:+.1f}" for q in pairs], fontsize=8)
    ax.set_ylabel("rsum")
    first = rows[0]
    seeds = max(q["seeds"] for q in pairs)
    ax.set_title(f"{first['dataset']} {first['split']}: offline negatives vs matched control, "
                 f"{first['epochs']} epochs, {seeds} seed{'s' if seeds > 1 else ''}",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.margins(y=0.15)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        # tight: a title wider than one or two pairs' bars is kept whole, not cut
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_table(table_dir: str | Path, losses: list[str], batches: list[int],
                miner: str, seeds: int = 1, init: str = "", mined_by: str = "") -> list[dict]:
    """Collect the cells' rows and write ``table.md``, ``table.csv``, ``pairs.csv`` and
    ``table.png`` into ``table_dir``; returns the rows. Nothing is written unless every row
    checks out."""
    table_dir = Path(table_dir)
    rows = collect_rows(table_dir, plan_cells(losses, batches, miner, seeds), miner, init,
                        mined_by)
    pairs = pair_rows(rows)
    markdown = format_markdown(rows, pairs, miner, init, mined_by)
    write_text(table_dir / "table.md", markdown)
    write_text(table_dir / "table.csv", format_csv(rows))
    write_text(table_dir / "pairs.csv", format_csv(pairs, PAIR_COLUMNS))
    plot_pairs(pairs, rows, table_dir / "table.png")
    log.info("wrote %s, table.csv, pairs.csv, table.png", table_dir / "table.md")
    print(markdown)
    return rows
