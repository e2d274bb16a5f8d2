import argparse
import json
import re

import pytest
import torch
import yaml

from stages.core.errors import UserError
from stages.io.lock import folder_lock
from stages.pipeline.evaluate import evaluate, format_table
from stages.pipeline.stamps import read_record
from stages.pipeline.train import train


@pytest.fixture
def trained(tiny_config, tmp_path):
    return train(tiny_config, tmp_path / "run")


def test_eval_appends_a_record_beside_the_checkpoint(trained):
    record = evaluate([trained])
    assert record["split"] == "test" and record["protocol"] == "all"
    assert record["images"] == 10 and record["epoch"] >= 1
    lines = (trained.parent / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1]) == record
    assert record["rsum"] == pytest.approx(sum(record[f"r{k}_{d}"] for k in (1, 5, 10)
                                               for d in ("i2t", "t2i")))


def test_eval_records_its_settings_only_holding_the_lock(trained, tmp_path):
    """The settings of the last record appended are recorded beside the output (make's
    table stamps its cells' evaluations with them), by an eval holding the output folder's
    lock: an eval refused by another process's lock appends and records nothing."""
    out = tmp_path / "cell" / "eval.jsonl"
    evaluate([trained], out=out)
    assert yaml.safe_load(read_record(out)) == {
        "stage": "eval", "data": {"name": "tiny", "eval_split": "test"},
        "eval": {"fold5": False, "precision": "fp32"}}
    written = out.read_bytes(), read_record(out)
    with folder_lock(out.parent, "another eval"), \
            pytest.raises(UserError, match="being written by another process"):
        evaluate([trained], overrides=["eval.fold5=true"], out=out)
    assert (out.read_bytes(), read_record(out)) == written


def test_an_eval_split_the_dataset_lacks_names_its_splits_and_the_setting(trained):
    with pytest.raises(UserError, match=r"data.eval_split=testall: .* has no such split "
                                        r"\(its splits: dev, test, train\); evaluate another "
                                        r"with --set data.eval_split=NAME") as info:
        evaluate([trained], overrides=["data.eval_split=testall"])
    assert "\n" not in str(info.value)


def test_ensemble_of_a_model_with_itself_equals_the_model(trained, tmp_path):
    single = evaluate([trained], out=tmp_path / "a.jsonl")
    double = evaluate([trained, trained], out=tmp_path / "b.jsonl")
    for key in ("r1_i2t", "r5_t2i", "meanr_t2i", "rsum"):
        assert double[key] == pytest.approx(single[key])
    assert len(double["checkpoints"]) == 2


def test_five_fold_on_testall(tiny_root, trained, tmp_path, caplog, capsys):
    from stages.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tiny_root / "tiny5", {"testall": 20, "test": 7}, seed=4,
                            feature_dim=32)
    tiny5 = ["data.name=tiny5", "eval.fold5=1"]
    with caplog.at_level("WARNING"):
        record = evaluate([trained], overrides=[*tiny5, "data.eval_split=testall"],
                          out=tmp_path / "m.jsonl")
    assert record["protocol"] == "5fold" and record["images"] == 4
    # Not COCO's 5000 images: said, not left to the table's header.
    assert re.search(r"eval.fold5: testall of .*tiny5 has 20 images, evaluated as 5 folds of 4: "
                     r"not COCO's 5-fold 1K protocol", caplog.text)
    assert "(5 folds of 4 images)" in capsys.readouterr().out
    with pytest.raises(UserError, match="5 equal folds.*has 7 images"):
        evaluate([trained], overrides=tiny5, out=tmp_path / "m.jsonl")


def test_foreign_checkpoints_are_refused(tmp_path):
    torch.save({"model": {}, "opt": 1}, tmp_path / "dict.pt")
    with pytest.raises(UserError, match="dict.pt: not a checkpoint of this project"):
        evaluate([tmp_path / "dict.pt"])
    # What VSE++ and SCAN save: a pickled argparse.Namespace among the weights.
    torch.save({"opt": argparse.Namespace(lr=1), "model": []}, tmp_path / "vsepp.pth.tar")
    with pytest.raises(UserError, match="vsepp.pth.tar: not a checkpoint.*argparse"):
        evaluate([tmp_path / "vsepp.pth.tar"])
    with pytest.raises(UserError, match="not found"):
        evaluate([tmp_path / "missing.pt"])


def test_weights_that_do_not_fit_the_model_are_refused(trained, tmp_path):
    state = torch.load(trained, weights_only=True)
    state["model"]["args"]["embed_size"] = 64
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="bad.pt: weights do not fit model 'vsepp'"):
        evaluate([tmp_path / "bad.pt"])


def test_table_layout():
    metrics = {f"{m}_{d}": 1.0 for m in ("r1", "r5", "r10", "medr", "meanr")
               for d in ("i2t", "t2i")}
    text = format_table({"base": {**metrics, "rsum": 6.0}})
    assert "image->text" in text and "text->image" in text and "6.0" in text


def test_data_of_another_feature_dimension_is_refused_before_encoding(tiny_root, trained,
                                                                      tmp_path):
    from stages.data.synthetic import write_synthetic_dataset
    from stages.pipeline.embed import embed

    write_synthetic_dataset(tiny_root / "wide", {"train": 6, "test": 6}, seed=4,
                            feature_dim=48)
    message = (r"wide/test_ims.npy \(test\) holds 48-d features, shape \(6, 12, 48\), but "
               r".*checkpoint.pt was trained on 32-d features")
    with pytest.raises(UserError, match=message):
        evaluate([trained], overrides=["data.name=wide"], out=tmp_path / "m.jsonl")
    with pytest.raises(UserError, match=message.replace("test", "train")):
        embed(trained, overrides=["data.name=wide"], out=tmp_path / "e.h5")
    assert not (tmp_path / "m.jsonl").exists() and not (tmp_path / "e.h5").exists()


def test_eval_scores_with_the_split_s_caption_layout(trained, tmp_path, monkeypatch):
    """The eval split's layout (here 1 to 9 captions per image over the tiny split's 50)
    reaches the ranks, the record says it, and the ranks carry it for the table."""
    import dataclasses

    import numpy as np

    import stages.pipeline.evaluate as evaluate_module
    from stages.core.layout import CaptionLayout
    from stages.metrics.retrieval import evaluate_ranks, fold_ranks
    from stages.pipeline.table import per_image_rsum
    from tests.metrics.test_retrieval import loop_ranks

    counts = [1, 3, 5, 2, 7, 8, 4, 6, 9, 5]
    layout = CaptionLayout.from_counts(counts)
    opened = evaluate_module.open_model_split

    def open_variable(*args, **kwargs):
        return dataclasses.replace(opened(*args, **kwargs), layout=layout)

    scored = []

    def spy(imgs, caps, *args, **kwargs):
        scored.append((imgs[0], caps[0]))
        return fold_ranks(imgs, caps, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "open_model_split", open_variable)
    monkeypatch.setattr(evaluate_module, "fold_ranks", spy)
    for overrides, folds in (([], 1), (["eval.fold5=true"], 5)):
        record = evaluate([trained], overrides=overrides, out=tmp_path / "m.jsonl",
                          ranks=True)
        assert record["captions_per_image"] == layout.identity() != 5
        ranks = record["ranks"]
        assert ranks["caption_counts"] == counts and ranks.get("folds", 1) == folds
        img, cap = scored[-1]
        want_i2t, want_t2i = [], []
        for f in range(folds):  # folds of 10 // folds images with their own captions
            i0, i1 = f * 10 // folds, (f + 1) * 10 // folds
            c0, c1 = sum(counts[:i0]), sum(counts[:i1])
            a, b = loop_ranks(img[i0:i1] @ cap[c0:c1].T, counts[i0:i1])
            want_i2t += a.tolist()
            want_t2i += b.tolist()
        assert (ranks["i2t"], ranks["t2i"]) == (want_i2t, want_t2i)
        metrics = evaluate_ranks(np.array(want_i2t), np.array(want_t2i), layout, folds)
        assert {k: record[k] for k in metrics} == metrics
        assert per_image_rsum(ranks).mean() == pytest.approx(record["rsum"])


def test_a_five_per_image_record_says_so_and_its_ranks_stay_as_they_were(trained, tmp_path):
    record = evaluate([trained], out=tmp_path / "m.jsonl", ranks=True)
    assert record["captions_per_image"] == 5
    assert set(record["ranks"]) == {"i2t", "t2i"}
    assert len(record["ranks"]["t2i"]) == 5 * len(record["ranks"]["i2t"]) == 50
