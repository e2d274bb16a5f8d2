import json
import logging

import numpy as np
import pytest

from stages.core.errors import UserError
from stages.data.captions import read_captions
from stages.data.splits import read_split_ids
from stages.features.annotations import coco_splits, karpathy_splits, write_splits


def karpathy_entry(imgid, split, n_captions, cocoid=None, filepath=None, filename=None):
    entry = {"imgid": imgid, "split": split,
             "filename": filename or f"COCO_{imgid:06d}.jpg",
             "sentences": [{"raw": f"image {imgid} caption {j}\n", "tokens": []}
                           for j in range(n_captions)]}
    if cocoid is not None:
        entry["cocoid"] = cocoid
    if filepath:
        entry["filepath"] = filepath
    return entry


def test_karpathy_coco_restval_and_extra_captions(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    images = [karpathy_entry(0, "train", 5, 100, "train2014"),
              karpathy_entry(1, "restval", 7, 101, "val2014"),
              karpathy_entry(2, "val", 5, 102, "val2014"),
              karpathy_entry(3, "test", 6, 103, "val2014"),
              karpathy_entry(4, "train", 5, 104, "train2014")]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    splits = karpathy_splits(path)
    assert {k: [r.image_id for r in v] for k, v in splits.items()} == {
        "train": [100, 101, 104], "dev": [102], "test": [103]}
    assert splits["train"][1].captions == [f"image 1 caption {j}" for j in range(5)]
    assert splits["train"][1].file == "val2014/COCO_000001.jpg"
    assert "2 images have more than 5 captions" in caplog.text
    apart = karpathy_splits(path, restval_into_train=False)
    assert [r.image_id for r in apart["restval"]] == [101]

    out = tmp_path / "coco"
    write_splits(splits, out)
    assert read_captions(out / "train_caps.txt")[5:7] == ["image 1 caption 0",
                                                           "image 1 caption 1"]
    np.testing.assert_array_equal(read_split_ids(out, "train"), [100, 101, 104])
    assert (out / "test_images.txt").read_text() == "val2014/COCO_000003.jpg\n"
    # train_caps.txt is written last: make takes it as the sign that all splits exist.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert max(mtimes, key=mtimes.get) == "train_caps.txt"


def test_karpathy_flickr_ids_from_file_names(tmp_path):
    images = [karpathy_entry(0, "train", 5, filename="1000092795.jpg"),
              karpathy_entry(1, "test", 5, filename="10002456.jpg")]
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images}))
    splits = karpathy_splits(path)
    assert splits["train"][0].image_id == 1000092795 and splits["test"][0].file == "10002456.jpg"
    flickr8k = [karpathy_entry(7, "train", 5, filename="2513260012_03d33305cf.jpg")]
    path.write_text(json.dumps({"images": flickr8k}))
    assert karpathy_splits(path)["train"][0].image_id == 7  # Karpathy's imgid


@pytest.mark.parametrize("entry, message", [
    (karpathy_entry(0, "train", 4, 100), "image COCO_000000.jpg has 4 non-empty captions"),
    (karpathy_entry(0, "bogus", 5, 100), "unknown split"),
    ({k: v for k, v in karpathy_entry(0, "train", 5, filename="abc.jpg").items()
      if k != "imgid"}, "cannot tell the image id of 'abc.jpg'"),
])
def test_karpathy_errors(tmp_path, entry, message):
    path = tmp_path / "dataset_x.json"
    path.write_text(json.dumps({"images": [entry]}))
    with pytest.raises(UserError, match=message):
        karpathy_splits(path)
    with pytest.raises(UserError, match="not found"):
        karpathy_splits(tmp_path / "nope.json")


def coco_json(path, image_ids, captions_per_image):
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 640, "height": 480}
              for i in image_ids]
    annotations, ann_id = [], 1
    for i, n in zip(image_ids, captions_per_image, strict=True):
        for j in range(n):
            annotations.append({"id": ann_id, "image_id": i, "caption": f"coco {i} says {j}"})
            ann_id += 1
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "info": {}, "licenses": []}))
    return path


def test_coco_json_default_splits_and_id_lists(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    train = coco_json(tmp_path / "captions_train2017.json", [9, 4, 7], [5, 6, 5])
    val = coco_json(tmp_path / "captions_val2017.json", [30, 12], [5, 5])
    splits = coco_splits([train, val])
    assert [r.image_id for r in splits["train"]] == [4, 7, 9]  # by id
    assert [r.image_id for r in splits["dev"]] == [12, 30]
    assert splits["train"][0].captions == [f"coco 4 says {j}" for j in range(5)]
    assert splits["dev"][0].file == "val2017/000000000012.jpg"
    assert "1 images have more than 5 captions" in caplog.text
    # Karpathy-style splits that mix the two files, from id lists.
    (tmp_path / "mine.txt").write_text("30\n9\n")
    mixed = coco_splits([train, val], {"test": tmp_path / "mine.txt"})
    assert [r.file for r in mixed["test"]] == ["val2017/000000000030.jpg",
                                               "train2017/000000000009.jpg"]
    (tmp_path / "bad.txt").write_text("30\n555\n")
    with pytest.raises(UserError, match=r"split test: 1 image ids are in none .*first: 555"):
        coco_splits([train, val], {"test": tmp_path / "bad.txt"})
    few = coco_json(tmp_path / "captions_test.json", [1], [3])
    with pytest.raises(UserError, match="image 1 has 3 non-empty captions"):
        coco_splits([few])


def test_ids_file_checks(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    (tmp_path / "train_ids.txt").write_text("".join(f"{i}\n" for i in [5] * 5 + [8] * 5))
    np.testing.assert_array_equal(read_split_ids(tmp_path, "train"), [5, 8])  # per caption
    assert "once per caption" in caplog.text
    (tmp_path / "train_caps.txt").write_text("a\n" * 9)
    with pytest.raises(UserError, match="train_caps.txt has 9 captions but the ids file lists 2"):
        read_split_ids(tmp_path, "train")
    (tmp_path / "dev_ids.txt").write_text("1\n2\n1\n")
    with pytest.raises(UserError, match="1 image ids listed more than once"):
        read_split_ids(tmp_path, "dev")
    (tmp_path / "test_ids.txt").write_text("1\nx2\n")
    with pytest.raises(UserError, match="test_ids.txt:2: 'x2' is not an integer"):
        read_split_ids(tmp_path, "test")


# --- captions per image: k, or all of them ---------------------------------------------------
def _karpathy_file(tmp_path, counts):
    images = [karpathy_entry(i, "train", n, 100 + i) for i, n in enumerate(counts)]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def _open_with_features(dataset, counts):
    """open_split of the captions stage's train split, beside (N, 4) features."""
    from stages.data.dataset import open_split

    np.save(dataset / "train_ims.npy", np.zeros((len(counts), 4), np.float32)
            + np.arange(len(counts), dtype=np.float32)[:, None])
    return open_split(dataset, "train")


def test_keeping_all_captions_lists_one_id_per_caption(tmp_path):
    counts = [5, 7, 1, 6, 5, 3]
    splits = karpathy_splits(_karpathy_file(tmp_path, counts), captions_per_image=0)
    assert [len(r.captions) for r in splits["train"]] == counts
    write_splits(splits, tmp_path / "ds")
    lines = (tmp_path / "ds" / "train_ids.txt").read_text().split()
    assert lines == [str(100 + i) for i, n in enumerate(counts) for _ in range(n)]
    split = _open_with_features(tmp_path / "ds", counts)
    assert split.layout.counts.tolist() == counts
    for c, caption in enumerate(split.captions):  # "image <imgid> caption <j>"
        assert int(caption.split()[1]) == split.layout.owner[c]
    assert read_split_ids(tmp_path / "ds", "train").tolist() == [100 + i for i in range(6)]


def test_keeping_the_first_k_captions(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = _karpathy_file(tmp_path, [5, 7, 2, 6])
    splits = karpathy_splits(path, captions_per_image=2)
    assert [r.captions for r in splits["train"]][1] == ["image 1 caption 0",
                                                         "image 1 caption 1"]
    assert "3 images have more than 2 captions; their first 2 are kept" in caplog.text
    write_splits(splits, tmp_path / "ds")
    assert (tmp_path / "ds" / "train_ids.txt").read_text().split() == ["100", "101", "102",
                                                                       "103"]
    split = _open_with_features(tmp_path / "ds", [2] * 4)
    assert split.layout.per_image == 2 and split.layout.owner.tolist() == [0, 0, 1, 1, 2, 2,
                                                                           3, 3]
    with pytest.raises(UserError, match=r"image COCO_000002.jpg has 2 non-empty captions; "
                                        r"every image needs at least 3 \(--captions-per-image "
                                        r"3\)"):
        karpathy_splits(path, captions_per_image=3)
    with pytest.raises(UserError, match="--captions-per-image -1: give the number"):
        karpathy_splits(path, captions_per_image=-1)


def test_coco_json_keeping_all_captions(tmp_path):
    train = coco_json(tmp_path / "captions_train2017.json", [9, 4, 7], [5, 6, 1])
    splits = coco_splits([train], captions_per_image=0)
    assert [len(r.captions) for r in splits["train"]] == [6, 1, 5]  # images by id: 4, 7, 9
    with pytest.raises(UserError, match="image 7 has 1 non-empty captions"):
        coco_splits([train])
    empty = coco_json(tmp_path / "captions_val2017.json", [3], [0])
    with pytest.raises(UserError, match=r"image 3 has 0 non-empty captions; every image needs "
                                        r"at least 1 \(--captions-per-image 0: all of them\)"):
        coco_splits([empty], {"dev": _ids(tmp_path, [3])}, captions_per_image=0)


def _ids(tmp_path, ids):
    path = tmp_path / "ids.txt"
    path.write_text("".join(f"{i}\n" for i in ids))
    return path


def test_the_captions_command_takes_the_count(tmp_path):
    from click.testing import CliRunner

    from stages.cli import cli

    counts = [5, 7, 1]
    path = _karpathy_file(tmp_path, counts)
    result = CliRunner().invoke(cli, ["captions", "--karpathy", str(path), "--out",
                                      str(tmp_path / "ds"), "--captions-per-image", "0"])
    assert result.exit_code == 0, result.output
    assert len(read_captions(tmp_path / "ds" / "train_caps.txt")) == sum(counts)
    assert _open_with_features(tmp_path / "ds", counts).layout.counts.tolist() == counts
