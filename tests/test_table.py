"""`make table` (loss x offline negatives x batch size) and `aoq table`, on tiny data."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.core.errors import UserError
from stages.core.layout import CaptionLayout
from stages.io.checkpoint import load_checkpoint, weights_hash
from stages.metrics.retrieval import evaluate_ranks, recall_metrics
from stages.pipeline.table import (
    METRIC_KEYS,
    Cell,
    _check_comparable,
    collect_rows,
    control_loss,
    pair_rows,
    paired_bootstrap,
    parse_batches,
    per_image_rsum,
    plan_cells,
    ranks_layout,
    split_words,
    write_table,
)
from tests.test_pipeline import REPO, make, workdir  # noqa: F401  (workdir: a fixture)

TABLE = ["LOSSES=vse_max aoq", "BATCHES=16"]
CELLS = ["vse_max-off-b16", "vse_max-on-b16", "aoq-on-b16"]


def test_plan_orders_cells_and_gives_offline_only_losses_one_cell():
    cells = plan_cells(["vse_sum", "aoq", "vse_max"], [128, 64], miner="vse_max")
    assert [c.name for c in cells] == [
        "vse_sum-off-b128", "vse_sum-on-b128", "aoq-on-b128", "vse_max-off-b128",
        "vse_max-on-b128", "vse_sum-off-b64", "vse_sum-on-b64", "aoq-on-b64",
        "vse_max-off-b64", "vse_max-on-b64"]
    assert cells[2] == Cell("aoq", True, 128)
    assert split_words("a, b  c") == ["a", "b", "c"]


@pytest.mark.parametrize("losses, batches, miner, message", [
    (["vse_max", "no_such_loss"], [8], "vse_max", "unknown loss 'no_such_loss'; known: aoq"),
    (["vse_max", "vse_max"], [8], "vse_max", "listed twice"),
    (["vse_max"], [8], "offtri", "miner 'offtri' needs offline negatives"),
    ([], [8], "vse_max", "no loss given"),
])
def test_plan_refuses_bad_losses(losses, batches, miner, message):
    with pytest.raises(UserError, match=message):
        plan_cells(losses, batches, miner)


@pytest.mark.parametrize("text, message", [("128 x", "'x' is not a positive integer"),
                                           ("0", "'0' is not a positive integer"),
                                           ("", "no batch size"), ("8 8", "listed twice")])
def test_batches_are_checked(text, message):
    with pytest.raises(UserError, match=message):
        parse_batches(text)


def commands(work, *args) -> list[str]:
    """The aoq sub-commands (with their run folder or output) `make table` would run now."""
    out = make(work, "table", *TABLE, *args, dry_run=True)
    runs = []
    for line in out.splitlines():
        if "stages.cli " not in line or "--plan" in line:
            continue
        words = line.split("stages.cli ")[1].split()
        if words[0] == "settings":  # make's settings stamps, checked on every call
            continue
        target = next((words[i + 1] for i, w in enumerate(words)
                       if w in ("--run-dir", "--out", "--out-dir")), "")
        runs.append(f"{words[0]} {target.split('/table/')[-1]}".strip())
    return runs


def test_a_table_dir_of_its_own_mines_its_own_candidates(workdir):  # noqa: F811
    """Two experiments (TABLE_DIR) never share a candidate folder: the second one's mining
    would replace the files the first one's cells were trained with."""
    def mined_into(*args):
        out = make(workdir, "table", *TABLE, *args, dry_run=True)
        return {line.split("--out-dir ")[1].split()[0] for line in out.splitlines()
                if "stages.cli offcandi " in line}

    assert mined_into() == {"offcandi/tiny/table-b16"}  # the default table's, as before
    assert mined_into("TABLE_DIR=runs/tiny/exp1") == {"offcandi/tiny/table-exp1-b16"}
    assert mined_into("TABLE_DIR=runs/tiny/exp2/") == {"offcandi/tiny/table-exp2-b16"}
    assert mined_into("TABLE_DIR=runs/tiny/a/exp") == {"offcandi/tiny/table-a-exp-b16"}


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_table_trains_every_cell_writes_md_csv_png_and_resumes(workdir):  # noqa: F811
    work = workdir
    out = make(work, "table", *TABLE)
    table_dir = work / "runs/tiny/table"
    for cell in CELLS:
        assert (table_dir / cell / "checkpoint.pt").is_file(), cell
    assert (work / "offcandi/tiny/table-b16/t2i.h5").is_file()  # mined once, by vse_max-off

    # every row is its cell's checkpoint and the eval record of exactly those weights
    rows = read_csv(table_dir / "table.csv")
    assert [(r["loss"], r["offline_negatives"], r["batch_size"]) for r in rows] == [
        ("vse_max", "no", "16"), ("vse_max", "yes", "16"), ("aoq", "yes", "16")]
    miner = weights_hash(load_checkpoint(table_dir / CELLS[0] / "checkpoint.pt")["state_dict"])
    for cell, row in zip(CELLS, rows, strict=True):
        state = load_checkpoint(table_dir / cell / "checkpoint.pt")
        assert row["weights"] == weights_hash(state["state_dict"])
        records = [json.loads(line) for line in (table_dir / cell / "eval.jsonl").open()]
        assert len(records) == 1 and records[0]["weights"] == [row["weights"]]
        for key in METRIC_KEYS:
            assert float(row[key]) == pytest.approx(records[0][key]), (cell, key)
        assert row["finetune"] == "no" and row["epochs"] == "1"
        assert row["negatives_mined_by"] == ("" if cell == CELLS[0] else miner)
        config = yaml.safe_load((table_dir / cell / "config.yaml").read_text())
        assert config["loss"]["name"] == cell.split("-")[0]
        assert config["train"]["batch_size"] == 16
        assert config["train"]["offline_negatives"] == ("-on-" in cell)
    markdown = (table_dir / "table.md").read_text()
    assert markdown in out  # printed too
    lines = [line for line in markdown.splitlines() if line.startswith("| aoq ")]
    assert lines and lines[0].split(" | ")[1:4] == ["yes", "no", "16"]
    assert f"{float(rows[2]['rsum']):.1f}" in lines[0] and rows[2]["weights"] in lines[0]
    assert (table_dir / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert commands(work) == ["table"]  # everything is up to date

    # a cell killed before it finished: only that cell trains and is evaluated again
    (table_dir / "aoq-on-b16" / "checkpoint.pt").unlink()
    assert commands(work) == ["train aoq-on-b16", "eval aoq-on-b16/eval.jsonl", "table"]
    before = {c: (table_dir / c / "checkpoint.pt").stat().st_mtime_ns for c in CELLS[:2]}
    make(work, "table", *TABLE)
    assert commands(work) == ["table"]
    assert before == {c: (table_dir / c / "checkpoint.pt").stat().st_mtime_ns
                      for c in CELLS[:2]}

    # a cell retrained (new weights) but not yet re-evaluated: its record is stale, and
    # nothing is written
    assert [r["loss"] for r in collect_rows(table_dir, plan_cells(["vse_max"], [16], "vse_max"),
                                            "vse_max")] == ["vse_max"] * 2
    records = table_dir / "vse_max-on-b16" / "eval.jsonl"
    record = json.loads(records.read_text())
    records.write_text(json.dumps({**record, "weights": ["0123456789abcdef"]}) + "\n")
    written = {name: (table_dir / name).read_bytes() for name in ("table.md", "table.csv")}
    with pytest.raises(UserError, match="no eval record of the current .* weights"):
        write_table(table_dir, ["vse_max"], [16], "vse_max")
    assert written == {name: (table_dir / name).read_bytes() for name in written}
    records.write_text(json.dumps(record) + "\n")

    # a run folder whose checkpoint is not what its name says
    (table_dir / "vse_sum-off-b16").symlink_to(table_dir / "vse_max-off-b16")
    with pytest.raises(UserError, match="trained with loss.name='vse_max', but its cell "
                                        "vse_sum-off-b16 needs 'vse_sum'"):
        write_table(table_dir, ["vse_sum"], [16], "vse_max")

    # other settings: the cells are stale, and training refuses to mix them in, saying how
    # to start the table over (RUN=/AOQ_RUN= name no table cell)
    result = subprocess.run(
        ["make", "-f", str(REPO / "Makefile"), "--no-print-directory",
         f"AOQ={sys.executable} -m stages.cli", "STAMP=stamp", "DATA=tiny", "EXP=tiny",
         f"DATA_PATH={work.parent}", "table", *TABLE, "TABLE_SET=train.lr=1e-4"],
        cwd=work, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "made with other settings: train.lr" in result.stderr
    assert "a table holds one experiment: delete runs/tiny/table to train it with these " \
        "settings, give the settings it was made with, or another TABLE_DIR" in result.stderr
    assert "RUN=" not in result.stderr
    # back to the settings the table was made with: nothing is mined or trained again
    assert commands(work) == ["table"]


def test_demo_continues_base_for_equal_epochs(workdir):  # noqa: F811
    """`make demo-compare`: AOQ and DEMO_OTHER_LOSS (offline negatives) and each one's
    matched control start from the base model and train DEMO_EPOCHS more epochs."""
    work = workdir
    out = make(work, "demo-compare", "DEMO_EPOCHS=2", "DEMO_OTHER_LOSS=vse_sum")
    runs = {"base_plus2": ("vse_max", False), "vse_sum_offline_plus2": ("vse_sum", True),
            "vse_sum_plus2": ("vse_sum", False), "aoq_plus2": ("aoq", True)}
    for run, (loss, offline) in runs.items():
        config = yaml.safe_load((work / "runs/tiny" / run / "config.yaml").read_text())
        assert config["train"]["init_from"] == "runs/tiny/base/checkpoint.pt"
        assert config["train"]["epochs"] == 2
        assert (config["loss"]["name"], config["train"]["offline_negatives"]) == (loss, offline)
        assert run in out
    base = yaml.safe_load((work / "runs/tiny/base/config.yaml").read_text())
    assert base["train"]["init_from"] == "" and "base" in out and "rsum" in out
    assert "vse_sum_offline_plus2 vs its control vse_sum_plus2" in out
    header = next(line for line in out.splitlines() if line.split()[:1] == ["base"])
    assert header.split() == ["base", "base_plus2", "aoq_plus2", "vse_sum_plus2",
                              "vse_sum_offline_plus2"]  # each pair side by side


def test_seeds_and_the_controls_of_offline_only_losses_are_planned():
    cells = plan_cells(["aoq", "infonce"], [16], miner="vse_max", seeds=2)
    assert [c.name for c in cells] == [
        "aoq-on-b16", "aoq-on-b16-s1", "infonce-off-b16", "infonce-off-b16-s1",
        "infonce-on-b16", "infonce-on-b16-s1", "vse_max-off-b16", "vse_max-off-b16-s1"]
    assert control_loss("aoq") == control_loss("offtri") == "vse_max"
    assert control_loss("infonce") == "infonce"
    with pytest.raises(UserError, match="SEEDS=0"):
        plan_cells(["aoq"], [16], "vse_max", seeds=0)


def test_per_image_rsum_averages_to_rsum():
    rng = np.random.default_rng(0)
    ranks = {"i2t": rng.integers(0, 30, 40), "t2i": rng.integers(0, 30, 200)}
    shares = per_image_rsum(ranks)
    assert shares.shape == (40,)
    assert shares.mean() == pytest.approx(recall_metrics(ranks["i2t"], ranks["t2i"])["rsum"])


def loop_per_image_rsum(i2t, t2i, counts, folds=1):
    """Each image's share of rsum by loops: its i2t hits plus its captions' t2i hits times
    images / captions of its fold."""
    size = len(counts) // folds
    shares, caption = [], 0
    for image, count in enumerate(counts):
        fold = counts[image // size * size:(image // size + 1) * size]
        hits = sum(int(t2i[c] < k) for c in range(caption, caption + count)
                   for k in (1, 5, 10))
        shares.append(100 * (sum(int(i2t[image] < k) for k in (1, 5, 10))
                             + hits * len(fold) / sum(fold)))
        caption += count
    return np.array(shares)


@pytest.mark.parametrize("counts", [[1] * 40, [1, 3, 5, 2, 7, 1, 4, 6, 2, 5] * 4, [5] * 40])
@pytest.mark.parametrize("folds", [1, 5])
def test_per_image_rsum_of_any_layout_against_a_loop(counts, folds):
    rng = np.random.default_rng(3)
    layout = CaptionLayout.from_counts(counts)
    ranks = {"i2t": rng.integers(0, 12, 40), "t2i": rng.integers(0, 12, sum(counts))}
    if layout.per_image is None:
        ranks["caption_counts"] = counts
    if folds > 1:
        ranks["folds"] = folds
    assert ranks_layout(ranks) == layout
    shares = per_image_rsum(ranks)
    np.testing.assert_allclose(shares, loop_per_image_rsum(ranks["i2t"], ranks["t2i"], counts,
                                                           folds), rtol=1e-12)
    # rsum is the mean of the shares: the bootstrap resamples what the table reports.
    want = evaluate_ranks(ranks["i2t"], ranks["t2i"], layout, folds)["rsum"]
    assert shares.mean() == pytest.approx(want, rel=1e-12)


def test_per_image_rsum_of_five_per_image_is_the_mean_over_5_captions_bit_for_bit():
    """The share of records of 5 captions per image (all records before layouts) is what
    it was: i2t hits plus the mean of the image's 5 captions' t2i hits."""
    rng = np.random.default_rng(5)
    ranks = {"i2t": rng.integers(0, 30, 1000), "t2i": rng.integers(0, 30, 5000)}
    hits_i2t = sum((ranks["i2t"] < k).astype(np.float64) for k in (1, 5, 10))
    hits_t2i = sum((ranks["t2i"] < k).astype(np.float64) for k in (1, 5, 10))
    before = 100.0 * (hits_i2t + hits_t2i.reshape(-1, 5).mean(axis=1))
    np.testing.assert_array_equal(per_image_rsum(ranks), before)
    np.testing.assert_array_equal(per_image_rsum({**ranks, "folds": 5}), before)


def test_ranks_that_do_not_fit_their_layout_are_refused():
    with pytest.raises(UserError, match="10 i2t and 49 t2i ranks for CaptionLayout.*delete "
                                        "that cell's eval.jsonl"):
        ranks_layout({"i2t": [0] * 10, "t2i": [0] * 49})
    with pytest.raises(UserError, match="3 i2t and 7 t2i ranks"):
        ranks_layout({"i2t": [0] * 3, "t2i": [0] * 7, "caption_counts": [1, 2, 3]})


def test_paired_bootstrap_against_a_loop():
    rng = np.random.default_rng(1)
    offline, control = rng.normal(size=(3, 50)), rng.normal(size=(3, 50))
    low, high = paired_bootstrap(offline, control, resamples=300, seed=4)
    difference = offline.mean(0) - control.mean(0)
    picks = np.random.default_rng(4).integers(0, 50, (300, 50))
    means = sorted(float(np.mean([difference[i] for i in row])) for row in picks)
    assert low == pytest.approx(np.percentile(means, 2.5))
    assert high == pytest.approx(np.percentile(means, 97.5))
    assert low < difference.mean() < high
    shifted = paired_bootstrap(control + 2.0, control, resamples=50)
    assert shifted == pytest.approx((2.0, 2.0))  # a constant gain has no spread


def test_pairs_match_each_offline_cell_with_its_control_seed_by_seed():
    def row(loss, offline, seed, rsum, hits):
        ranks = {"i2t": [0 if h else 99 for h in hits],
                 "t2i": [0 if h else 99 for h in hits for _ in range(5)]}
        return {"loss": loss, "offline_negatives": offline, "batch_size": 8, "seed": seed,
                "rsum": rsum, "ranks": ranks, "checkpoint": f"{loss}{seed}"}
    rows = [row("vse_max", "no", 0, 100.0, [1, 0, 0, 0]), row("vse_max", "no", 1, 110.0,
                                                                [1, 0, 0, 0]),
            row("aoq", "yes", 0, 130.0, [1, 1, 0, 0]), row("aoq", "yes", 1, 125.0,
                                                          [1, 1, 0, 0])]
    (pair,) = pair_rows(rows)
    assert (pair["loss"], pair["control"], pair["seeds"]) == ("aoq", "vse_max", 2)
    assert pair["delta_per_seed"] == "+30.0 +15.0" and pair["delta_rsum"] == 22.5
    assert pair["delta_std"] == pytest.approx(np.std([30, 15], ddof=1))
    assert pair["control_rsum"] == 105.0 and pair["offline_rsum"] == 127.5
    assert pair["delta_ci_low"] <= 150.0 <= pair["delta_ci_high"]  # ranks: +600 / 4 images
    with pytest.raises(UserError, match="no matched control vse_max-off-b8 with seed 1"):
        pair_rows(rows[:1] + rows[2:])
    with pytest.raises(UserError, match="holds no per-query ranks"):
        pair_rows([{**r, "ranks": None} for r in rows])


def test_table_with_seeds_continued_from_one_checkpoint(workdir):  # noqa: F811
    work = workdir
    args = ["LOSSES=aoq", "BATCHES=16", "SEEDS=2", "TABLE_INIT=runs/tiny/base/checkpoint.pt"]
    out = make(work, "table", *args)
    table_dir = work / "runs/tiny/table-from-base"
    base = weights_hash(load_checkpoint(work / "runs/tiny/base/checkpoint.pt")["state_dict"])
    for cell, seed in (("aoq-on-b16", 0), ("aoq-on-b16-s1", 1), ("vse_max-off-b16", 0),
                       ("vse_max-off-b16-s1", 1)):
        config = yaml.safe_load((table_dir / cell / "config.yaml").read_text())
        assert config["train"]["seed"] == seed
        assert config["train"]["init_from"] == "runs/tiny/base/checkpoint.pt"
        record = json.loads((table_dir / cell / "eval.jsonl").read_text())
        assert len(record["ranks"]["i2t"]) == 10 and len(record["ranks"]["t2i"]) == 50
    assert read_csv(table_dir / "table.csv")[0]["negatives_mined_by"] == base
    (pair,) = read_csv(table_dir / "pairs.csv")
    assert (pair["loss"], pair["control"], pair["seeds"]) == ("aoq", "vse_max", "2")
    assert "| aoq | vse_max | 16 | 2 |" in out and "continued from runs/tiny/base" in out
    assert (work / "offcandi/tiny/table-base/t2i.h5").is_file()
    refused = make(work, "table", *args, "SET=train.seed=3", dry_run=True, check=False)
    assert refused.returncode != 0 and "drop train.seed from SET" in refused.stderr


def test_the_table_checks_the_miner_it_is_told_about(workdir, monkeypatch):  # noqa: F811
    """`aoq table --mined-by`: the "on" cells must have used candidates of that miner."""
    work = workdir
    make(work, "table", "LOSSES=aoq", "BATCHES=16", "TABLE_INIT=runs/tiny/base/checkpoint.pt")
    monkeypatch.chdir(work)
    table_dir, init = Path("runs/tiny/table-from-base"), "runs/tiny/base/checkpoint.pt"
    rows = write_table(table_dir, ["aoq"], [16], "vse_max", 1, init, mined_by=init)
    assert rows[0]["mined_by"] == init and rows[0]["negatives_mined_by"] == weights_hash(
        load_checkpoint(init)["state_dict"])
    other = str(table_dir / "vse_max-off-b16" / "checkpoint.pt")
    with pytest.raises(UserError, match=f"not by its miner {other}"):
        write_table(table_dir, ["aoq"], [16], "vse_max", 1, init, mined_by=other)


def test_table_candidates_from_a_text_miner(workdir):  # noqa: F811
    """MINER=text:<folder>: the "on" cells train on candidates mined by the text model, and
    the table checks them against it."""
    out = make(workdir, "table-files", "LOSSES=aoq", "BATCHES=16", "MINER=text:/models/lm",
               "TABLE_INIT=runs/tiny/base/checkpoint.pt",
               "TABLE_CELLS=aoq-on-b16 vse_max-off-b16", dry_run=True)
    assert "embed-text --text-model /models/lm" in out
    assert "--out-dir offcandi/tiny/table-miner-text-lm" in out
    assert "--set offcandi.base_ckpt=text:/models/lm" in out
    assert "--set train.init_from=runs/tiny/base/checkpoint.pt" in out
    assert "--mined-by text:/models/lm" in out


def test_per_loss_settings_reach_that_loss_s_cells_only(workdir):  # noqa: F811
    """TABLE_SET_<loss>: loss.* settings for one loss's cells, stamped with them; a loss the
    table does not train, or a setting that is not the loss's, is refused."""
    cells = ["TABLE_CELLS=aoq-on-b16 vse_max-off-b16", "LOSSES=aoq", "BATCHES=16"]
    out = make(workdir, "table-files", *cells, "TABLE_SET_aoq=loss.offline_weight=0.5",
               dry_run=True)
    trains = [line for line in out.splitlines() if "stages.cli train" in line]
    by_run = {line.split("--run-dir ")[1].split()[0].split("/")[-1]: line for line in trains}
    assert "--set loss.offline_weight=0.5" in by_run["aoq-on-b16"]
    assert "offline_weight" not in by_run["vse_max-off-b16"]
    stamps = [line for line in out.splitlines() if "stages.cli settings" in line]
    assert any("aoq-on-b16" in s and "loss.offline_weight=0.5" in s for s in stamps)
    for setting, message in (("TABLE_SET_infonce=loss.temperature=0.05",
                              "TABLE_SET_infonce is given, but LOSSES='aoq' has no loss"),
                             ("TABLE_SET_aoq=train.lr=1e-4", "only loss.\\* settings go"),
                             ("TABLE_SET_aoq=loss.name=infonce", "may not rename the loss"),
                             ("TABLE_SET_vse_max=loss.margin=0.1", "would change the miner")):
        refused = make(workdir, "table", *cells[1:], setting, dry_run=True, check=False)
        assert refused.returncode != 0
        assert re.search(message, refused.stderr), refused.stderr


def test_table_set_re_mines_in_the_offline_cells_only(workdir):  # noqa: F811
    """TABLE_SET=offcandi.remine_every=1 re-mines inside every "on" cell; the controls,
    which have no offline negatives, train as they would without it (refused otherwise)."""
    make(workdir, "table", "LOSSES=aoq", "BATCHES=16",
         "TABLE_SET=train.epochs=2 offcandi.remine_every=1")
    table_dir = workdir / "runs/tiny/table"
    assert sorted(r["loss"] for r in read_csv(table_dir / "table.csv")) == ["aoq", "vse_max"]
    remined = table_dir / "aoq-on-b16" / "remined" / "epoch-1"
    assert (remined / "t2i.h5").is_file()
    history = load_checkpoint(table_dir / "aoq-on-b16" / "last.pt")["remined"]
    assert [h["epoch"] for h in history] == [1]
    control = yaml.safe_load((table_dir / "vse_max-off-b16" / "config.yaml").read_text())
    assert control["offcandi"]["remine_every"] == 0
    assert not (table_dir / "vse_max-off-b16" / "remined").exists()


def test_cells_scored_with_other_captions_per_image_are_not_compared():
    row = {"epochs": 2, "dataset": "coco", "split": "test", "protocol": "all", "images": 100,
           "captions_per_image": 5, "checkpoint": "a/checkpoint.pt"}
    _check_comparable([row, {**row, "checkpoint": "b/checkpoint.pt"}])
    other = {**row, "captions_per_image": "counts:0123456789abcdef",
             "checkpoint": "b/checkpoint.pt"}
    with pytest.raises(UserError, match=r"evaluated differently \(dataset/split/protocol/"
                                        r"images/captions_per_image\): .*b/checkpoint.pt: "
                                        r"coco, test, all, 100, counts:0123456789abcdef"):
        _check_comparable([row, other])
