"""The loss-comparison table (``make table``): one row per cell, loss x offline negatives
(no/yes) x batch size, each cell a run trained from scratch for the same epochs.

A cell's run folder is ``<table dir>/<loss>-<off|on>-b<batch>/`` holding the run's
``checkpoint.pt`` and ``eval.jsonl`` (the records ``aoq eval --out`` appends). "on" cells
are trained with offline negatives mined by the *miner* cell ``<miner>-off-b<batch>`` (the
VSE++ base of the same batch size); losses that only exist with offline negatives (AOQ's
``aoq``/``offquin``/``offtri``) have only an "on" cell.

:func:`collect_rows` builds the rows from the cells' checkpoints and eval records and checks
that they belong together: the eval record is the one of the checkpoint's current weights
(a record of earlier weights is never used), the checkpoint was trained as its cell says
(loss, offline negatives, batch size, from scratch), every cell trained the same epochs,
"on" cells used candidates mined by their miner, and every row was evaluated on the same
split and protocol. :func:`write_table` writes ``table.md``, ``table.csv`` and ``table.png``.
"""

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .io.atomic import atomic_path, write_text
from .io.checkpoint import load_checkpoint, weights_hash
from .metrics.retrieval import RECALL_KS

log = logging.getLogger(__name__)

DIRECTIONS = ("i2t", "t2i")
METRIC_KEYS = [f"{key}_{d}" for d in DIRECTIONS
               for key in (*(f"r{k}" for k in RECALL_KS), "medr")] + ["rsum"]
CSV_COLUMNS = ["loss", "offline_negatives", "finetune", "batch_size", "epochs", "best_epoch",
               *METRIC_KEYS, "meanr_i2t", "meanr_t2i", "weights", "negatives_mined_by",
               "checkpoint", "dataset", "split", "protocol", "images"]


@dataclass(frozen=True)
class Cell:
    """One run of the grid: ``loss`` trained with (``offline``) or without offline
    negatives at ``batch_size``."""

    loss: str
    offline: bool
    batch_size: int

    @property
    def name(self) -> str:
        """The run folder's name: ``<loss>-<off|on>-b<batch>``."""
        return f"{self.loss}-{'on' if self.offline else 'off'}-b{self.batch_size}"


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
    from .losses import LOSSES

    return LOSSES.class_of(loss).requires_offline


def plan_cells(losses: list[str], batches: list[int], miner: str) -> list[Cell]:
    """The table's rows in order: per batch size, per loss as listed, "off" then "on";
    losses that need offline negatives get only an "on" cell."""
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
    return [Cell(loss, offline, batch) for batch in batches for loss in losses
            for offline in ((True,) if offline_only[loss] else (False, True))]


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


def _check_trained_as(cell: Cell, config: dict, path: Path) -> None:
    """The checkpoint's own config must say what the cell's name says."""
    expected = {"loss.name": cell.loss, "train.offline_negatives": cell.offline,
                "train.batch_size": cell.batch_size, "train.init_from": ""}
    for key, want in expected.items():
        section, name = key.split(".")
        got = config.get(section, {}).get(name)
        if got != want:
            raise UserError(f"{path} was trained with {key}={got!r}, but its cell "
                            f"{cell.name} needs {want!r}; delete {path.parent} and run "
                            "`make table` again")


def collect_rows(table_dir: str | Path, cells: list[Cell], miner: str) -> list[dict]:
    """One row per cell (keys :data:`CSV_COLUMNS`) from its checkpoint and eval record,
    checked as the module docstring says."""
    table_dir = Path(table_dir)
    miner_weights: dict[int, str] = {}

    def load(cell: Cell) -> tuple[Path, dict, str]:
        path = table_dir / cell.name / "checkpoint.pt"
        if not path.is_file():
            raise UserError(f"{path} not found: cell {cell.name} has not finished "
                            "training; run `make table` again (it resumes)")
        state = load_checkpoint(path)
        return path, state, weights_hash(state["state_dict"])

    rows = []
    for cell in cells:
        path, state, weights = load(cell)
        _check_trained_as(cell, state["config"], path)
        mined_by = ""
        if cell.offline:
            if cell.batch_size not in miner_weights:
                miner_weights[cell.batch_size] = load(Cell(miner, False, cell.batch_size))[2]
            want = miner_weights[cell.batch_size]
            used = state["data_fingerprint"].get("candidates", {})
            mined_by = {d.get("weights") for d in used.values()}
            if mined_by != {want}:
                raise UserError(f"{path} was trained with candidates mined by weights "
                                f"{', '.join(sorted(map(str, mined_by))) or 'unknown'}, not by "
                                f"its miner {miner}-off-b{cell.batch_size} (weights {want}); "
                                f"delete {path.parent} and run `make table` again")
            mined_by = want
        record = _eval_record(table_dir / cell.name / "eval.jsonl", weights)
        rows.append({"loss": cell.loss, "offline_negatives": "yes" if cell.offline else "no",
                     "finetune": finetune(state["model"]), "batch_size": cell.batch_size,
                     "epochs": state["config"]["train"]["epochs"],
                     "best_epoch": state["best_epoch"],
                     **{k: record[k] for k in [*METRIC_KEYS, "meanr_i2t", "meanr_t2i"]},
                     "weights": weights, "negatives_mined_by": mined_by,
                     "checkpoint": str(path), "dataset": record["dataset"],
                     "split": record["split"], "protocol": record["protocol"],
                     "images": record["images"]})
    _check_comparable(rows)
    return rows


def finetune(model: dict) -> str:
    """"yes" when the checkpoint's model (its ``{"name", "args"}`` entry) trained its image
    backbone from raw images (``vse_cnn`` with ``finetune``; ``clip``, whose image tower
    always trains), else "no" (precomputed features, or a frozen backbone)."""
    return "yes" if model["args"].get("finetune") or model["name"] == "clip" else "no"


def _check_comparable(rows: list[dict]) -> None:
    """Every row trained the same epochs and was evaluated on the same split/protocol."""
    for keys, what in ((("epochs",), "trained for different epochs"),
                       (("dataset", "split", "protocol", "images"), "evaluated differently")):
        seen = {tuple(r[k] for k in keys): r["checkpoint"] for r in rows}
        if len(seen) > 1:
            listed = "; ".join(f"{path}: {', '.join(map(str, value))}"
                               for value, path in seen.items())
            raise UserError(f"the cells were {what} ({'/'.join(keys)}): {listed}. A table "
                            "compares equals: delete the odd cells' folders and run `make "
                            "table` again")


def _number(value: float) -> str:
    return f"{value:.1f}"


def format_markdown(rows: list[dict], miner: str) -> str:
    """The table as Markdown, with a line that says what was compared on what."""
    first = rows[0]
    protocol = (f"5-fold {first['images']}" if first["protocol"] == "5fold"
                else f"{first['images']} images")
    header = ["loss", "offline negatives", "finetune", "batch", "epochs (best)",
              *(f"{d} {m}" for d in DIRECTIONS for m in (*(f"R@{k}" for k in RECALL_KS),
                                                         "medr")), "rsum", "weights"]
    lines = [f"Loss comparison on {first['dataset']} {first['split']} ({protocol}). Every "
             f"cell trained from scratch for {first['epochs']} epochs; offline negatives "
             f"mined by the {miner} model without them of the same batch size. "
             "`weights`: hash of the evaluated checkpoint's weights.", "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"]
    for r in rows:
        cells = [r["loss"], r["offline_negatives"], r["finetune"], str(r["batch_size"]),
                 f"{r['epochs']} ({r['best_epoch']})",
                 *(_number(r[k]) for k in METRIC_KEYS), f"`{r['weights']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_csv(rows: list[dict]) -> str:
    """The rows as CSV with a header line (columns :data:`CSV_COLUMNS`)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_rsum(rows: list[dict], path: Path) -> None:
    """A bar per cell of its rsum, coloured by offline negatives, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    labels = [f"{r['loss']}\nb{r['batch_size']}" for r in rows]
    colours = ["tab:orange" if r["offline_negatives"] == "yes" else "tab:blue" for r in rows]
    fig, ax = plt.subplots(figsize=(0.9 * len(rows) + 4.0, 3.6))
    bars = ax.bar(range(len(rows)), [r["rsum"] for r in rows], color=colours)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("rsum")
    first = rows[0]
    ax.set_title(f"{first['dataset']} {first['split']}: rsum per cell, "
                 f"{first['epochs']} epochs each", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:blue", "tab:orange")]
    ax.legend(handles, ["offline negatives: no", "offline negatives: yes"], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.margins(y=0.15)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_table(table_dir: str | Path, losses: list[str], batches: list[int],
                miner: str) -> list[dict]:
    """Collect the cells' rows and write ``table.md``, ``table.csv``, ``table.png`` into
    ``table_dir``; returns the rows. Nothing is written unless every row checks out."""
    table_dir = Path(table_dir)
    rows = collect_rows(table_dir, plan_cells(losses, batches, miner), miner)
    markdown = format_markdown(rows, miner)
    write_text(table_dir / "table.md", markdown)
    write_text(table_dir / "table.csv", format_csv(rows))
    plot_rsum(rows, table_dir / "table.png")
    log.info("wrote %s, table.csv, table.png", table_dir / "table.md")
    print(markdown)
    return rows
