import base64

import h5py
import numpy as np
import pytest

import stages.features.butd_tsv as butd_tsv
from stages.core.errors import UserError
from stages.data.dataset import open_split
from stages.features.butd_tsv import tsv_to_hdf5

DIM = 8


def encode(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes()).decode()


def make_images(ids, boxes_per_image, seed=0):
    """{id: (width, height, boxes (r, 4), features (r, DIM))}."""
    rng = np.random.default_rng(seed)
    return {i: (int(rng.integers(100, 640)), int(rng.integers(100, 480)),
                rng.random((r, 4), dtype=np.float32) * 100,
                rng.normal(size=(r, DIM)).astype(np.float32))
            for i, r in zip(ids, boxes_per_image, strict=True)}


def tsv_line(image_id, width, height, boxes, feats) -> str:
    return f"{image_id}\t{width}\t{height}\t{len(boxes)}\t{encode(boxes)}\t{encode(feats)}\n"


def write_tsv(path, images, order=None):
    with open(path, "w") as f:
        for i in order if order is not None else images:
            f.write(tsv_line(i, *images[i]))
    return path


@pytest.fixture
def folder(tmp_path):
    """A dataset folder with train (6 images), testall (4) and test (2 of testall's) ids."""
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train_ids.txt").write_text("".join(f"{i}\n" for i in [11, 3, 7, 20, 5, 9]))
    (d / "testall_ids.txt").write_text("".join(f"{i}\n" for i in [40, 41, 42, 43]))
    (d / "test_ids.txt").write_text("42\n40\n")
    return d


SPLITS = ["train", "testall", "test"]
ALL_IDS = [11, 3, 7, 20, 5, 9, 40, 41, 42, 43]


def read_split(path):
    with h5py.File(path, "r") as f:
        return {k: np.asarray(f[k]) for k in f}, dict(f.attrs)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rows_land_in_split_order_padded_with_counts(folder, tmp_path, dtype):
    images = make_images(ALL_IDS + [99], [5, 2, 6, 6, 1, 3, 4, 6, 2, 5, 6])
    # Shuffled rows, an id no split lists (99), and the rows spread over two files.
    order = [42, 99, 3, 40, 11, 9, 43, 5, 7, 41, 20]
    first = write_tsv(tmp_path / "a.tsv", images, order[:5])
    second = write_tsv(tmp_path / "b.tsv", images, order[5:])
    outputs = tsv_to_hdf5([first, second], folder, SPLITS, max_regions=6, feature_dim=DIM,
                          dtype=dtype)
    assert [p.name for p in outputs] == ["train.h5", "testall.h5", "test.h5"]
    for split in SPLITS:
        data, attrs = read_split(folder / f"{split}.h5")
        ids = [int(x) for x in (folder / f"{split}_ids.txt").read_text().split()]
        assert data["image_ids"].tolist() == ids
        assert data["features"].dtype == np.dtype(dtype) and data["features"].shape[1:] == (6, DIM)
        for row, image_id in enumerate(ids):
            width, height, boxes, feats = images[image_id]
            r = len(feats)
            assert data["num_regions"][row] == r
            np.testing.assert_allclose(data["features"][row, :r], feats, rtol=1e-3, atol=1e-3)
            assert not data["features"][row, r:].any()  # zero padding
            np.testing.assert_array_equal(data["boxes"][row, :r], boxes)
            assert data["image_size"][row].tolist() == [width, height]
        assert "written" not in data and attrs["tsv_rows_skipped"] == 1
        assert attrs["dtype"] == dtype and attrs["source"] == "butd-tsv"
    assert not list(folder.glob("*.partial"))
    # Training reads it: padded regions are masked by num_regions.
    (folder / "test_caps.txt").write_text("a cat\n" * 10)
    split = open_split(folder, "test")
    assert split.features.regions_many([0, 1]).tolist() == [2, 4]


def _write_folder_tsv(folder, tmp_path, **changes):
    images = make_images(ALL_IDS, [3] * len(ALL_IDS))
    lines = [tsv_line(i, *images[i]) for i in ALL_IDS]
    for index, line in changes.items():
        lines[int(index[1:])] = line
    path = tmp_path / "bad.tsv"
    path.write_text("".join(lines))
    return path, images


@pytest.mark.parametrize("bad_line, message", [
    ("3\t10\t10\t3\tAAAA\n", r"bad.tsv:2: 5 tab-separated fields, expected 6"),
    ("3\t10\t10\t3\t" + "A" * 63 + "!\tAAAA\n", "bad.tsv:2: field 'boxes' of image 3 is not "
                                                "valid base64"),
    ("3\t10\t10\t2\t" + encode(np.zeros((3, 4))) + "\tAAAA\n",
     "image 3 has num_boxes=2, but its boxes hold 12 float32 values, not 2 x 4"),
    ("3\tx\t10\t3\tAA\tAA\n", "bad.tsv:2: image_id, image_w, image_h and num_boxes must be"),
    ("abc\t1\t1\t1\tA\tA\n", r"bad.tsv:2: the first field \(image_id\) is b'abc'"),
    ("11\t10\t10\t1\t" + encode(np.zeros((1, 4))) + "\t" + encode(np.zeros((1, DIM))) + "\n",
     "image 11 appears twice in the TSV input"),
])
def test_malformed_rows_name_the_line_and_leave_no_output(folder, tmp_path, bad_line, message):
    path, _ = _write_folder_tsv(folder, tmp_path, l1=bad_line)
    with pytest.raises(UserError, match=message):
        tsv_to_hdf5([path], folder, SPLITS, max_regions=6, feature_dim=DIM)
    assert not list(folder.glob("*.h5"))


def test_truncated_last_row(folder, tmp_path):
    path, _ = _write_folder_tsv(folder, tmp_path)
    text = path.read_text()
    path.write_text(text[:-50])  # killed download
    with pytest.raises(UserError, match="bad.tsv:10: .*(base64|float32 values)"):
        tsv_to_hdf5([path], folder, SPLITS, max_regions=6, feature_dim=DIM)
    assert not list(folder.glob("*.h5"))


def test_missing_ids_are_listed_and_too_many_boxes_refused(folder, tmp_path):
    images = make_images(ALL_IDS, [3] * 10)
    path = write_tsv(tmp_path / "a.tsv", images, [i for i in ALL_IDS if i not in (7, 41)])
    with pytest.raises(UserError, match=r"1 image ids of .*train_ids.txt are in none of .*"
                                        r"a.tsv \(first: 7\)"):
        tsv_to_hdf5([path], folder, SPLITS, max_regions=6, feature_dim=DIM)
    assert not list(folder.glob("*.h5*"))  # neither outputs nor partial files
    write_tsv(path, make_images(ALL_IDS, [7] * 10))
    with pytest.raises(UserError, match="has 7 boxes, more than --max-regions 6"):
        tsv_to_hdf5([path], folder, SPLITS, max_regions=6, feature_dim=DIM)
    with pytest.raises(UserError, match="nope_ids.txt not found"):
        tsv_to_hdf5([path], folder, ["nope"], max_regions=6, feature_dim=DIM)


def test_killed_conversion_resumes_where_it_stopped(folder, tmp_path, monkeypatch):
    images = make_images(ALL_IDS, [4] * 10)
    path = write_tsv(tmp_path / "a.tsv", images)
    decoded = []
    real_parse = butd_tsv.parse_row

    def parse_then_die(line, where, dim):
        if len(decoded) == 6:
            raise KeyboardInterrupt
        decoded.append(int(line.split(b"\t")[0]))
        return real_parse(line, where, dim)

    monkeypatch.setattr(butd_tsv, "parse_row", parse_then_die)
    with pytest.raises(KeyboardInterrupt):
        tsv_to_hdf5([path], folder, SPLITS, max_regions=4, feature_dim=DIM,
                    checkpoint_seconds=0)  # checkpoint after every row
    assert not list(folder.glob("*.h5")) and len(list(folder.glob("*.partial"))) == 3
    monkeypatch.setattr(butd_tsv, "parse_row", real_parse)
    decoded_after = []
    monkeypatch.setattr(butd_tsv, "parse_row", lambda line, where, dim: (
        decoded_after.append(int(line.split(b"\t")[0])) or real_parse(line, where, dim)))
    tsv_to_hdf5([path], folder, SPLITS, max_regions=4, feature_dim=DIM)
    assert decoded_after == ALL_IDS[6:]  # only the rows after the last checkpoint
    data, attrs = read_split(folder / "train.h5")
    assert attrs["tsv_rows_written"] == 10 and attrs["tsv_rows_skipped"] == 0
    for row, image_id in enumerate([11, 3, 7, 20, 5, 9]):
        np.testing.assert_array_equal(data["features"][row], images[image_id][3])
    assert not list(folder.glob("*.partial"))


def test_partial_files_from_other_inputs_restart(folder, tmp_path, monkeypatch):
    images = make_images(ALL_IDS, [4] * 10)
    path = write_tsv(tmp_path / "a.tsv", images)
    real_parse = butd_tsv.parse_row
    calls = []

    def die_at_third(line, where, dim):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_parse(line, where, dim)

    monkeypatch.setattr(butd_tsv, "parse_row", die_at_third)
    with pytest.raises(KeyboardInterrupt):
        tsv_to_hdf5([path], folder, SPLITS, max_regions=4, feature_dim=DIM,
                    checkpoint_seconds=0)
    monkeypatch.setattr(butd_tsv, "parse_row", real_parse)
    # Other options (float16): the partial files are not reused, the result is complete.
    tsv_to_hdf5([path], folder, SPLITS, max_regions=4, feature_dim=DIM, dtype="float16")
    data, attrs = read_split(folder / "testall.h5")
    assert attrs["dtype"] == "float16" and data["num_regions"].tolist() == [4, 4, 4, 4]
    np.testing.assert_allclose(data["features"][2], images[42][3], atol=1e-2)


def test_a_full_disk_keeps_the_partial_files_and_a_rerun_finishes(folder, tmp_path,
                                                                  monkeypatch):
    import errno

    from stages.core.errors import NoSpaceError
    from stages.features.writer import SplitWriter

    images = make_images(ALL_IDS, [3] * len(ALL_IDS))
    tsv = write_tsv(tmp_path / "f.tsv", images)
    real_write = SplitWriter._write
    calls = []

    def disk_fills_up(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, *args)

    monkeypatch.setattr(SplitWriter, "_write", disk_fills_up)
    with pytest.raises(NoSpaceError, match=r"no space left on .*\.h5\.partial, need about"):
        tsv_to_hdf5([tsv], folder, SPLITS, max_regions=4, feature_dim=DIM)
    assert sorted(p.name for p in folder.glob("*.partial")) == [
        "test.h5.partial", "testall.h5.partial", "train.h5.partial"]
    monkeypatch.undo()
    tsv_to_hdf5([tsv], folder, SPLITS, max_regions=4, feature_dim=DIM)
    feats, _ = read_split(folder / "train.h5")
    np.testing.assert_array_equal(feats["features"][0, :3], images[11][3])
