"""open_split takes the caption layout from the data: one caption per image, k per image,
counts that differ per image (an ids file listing one id per caption), SCAN's repeated rows;
what the files do not determine is refused, never guessed."""

import h5py
import numpy as np
import pytest
import torch

from stages.core.errors import UserError
from stages.core.layout import CaptionLayout
from stages.data.dataset import ImageDataset, PairDataset, collate_pairs, open_split
from stages.data.features import FeatureStore
from stages.data.splits import read_id_runs, read_ids_file, read_split_runs
from stages.data.synthetic import write_synthetic_dataset
from stages.data.vocab import Vocab
from tests.conftest import write_precomp

COUNTS = [1, 3, 5, 2, 7, 1, 4, 6]  # captions of each of 8 images


def _features(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _captions(counts):
    return [f"image {i} caption {j}" for i, n in enumerate(counts) for j in range(n)]


def _write_ids(folder, split, lines):
    (folder / f"{split}_ids.txt").write_text("".join(f"{i}\n" for i in lines))


def _naive_owner(ids_lines):
    """The image of each caption, by reading the ids file's lines one by one: a new image
    starts where the id changes."""
    owner, image = [], -1
    for k, line in enumerate(ids_lines):
        if k == 0 or line != ids_lines[k - 1]:
            image += 1
        owner.append(image)
    return owner


def _per_caption_ids(counts, base=100):
    return [base + i for i, n in enumerate(counts) for _ in range(n)]


def _check_pairs(split, feats, owner):
    """Every PairDataset item pairs its caption with its own image's features and id."""
    vocab = Vocab.build(split.captions, threshold=1)
    pairs = PairDataset(split, vocab)
    assert len(pairs) == len(owner)
    for c in range(len(owner)):
        image, _, tokens, cap_id, image_id = pairs[c]
        assert (cap_id, image_id) == (c, owner[c])
        np.testing.assert_array_equal(image.numpy(), feats[owner[c]])
        assert vocab.decode(tokens.tolist())[1:-1] == split.captions[c].split()
    order = list(range(len(owner)))[::-1]
    batch = collate_pairs(pairs.__getitems__(order))
    assert batch["image_ids"].tolist() == [owner[c] for c in order]
    torch.testing.assert_close(batch["images"], torch.from_numpy(feats[[owner[c] for c in order]]))


# --- one caption per image ---------------------------------------------------------------------
@pytest.mark.parametrize("ids", [None, "per-image"])
def test_one_caption_per_image_is_read_as_such(tmp_path, ids):
    feats = _features((30, 3))
    captions = _captions([1] * 30)
    write_precomp(tmp_path, "dev", feats, captions)
    if ids:
        _write_ids(tmp_path, "dev", range(100, 130))
    split = open_split(tmp_path, "dev")
    assert split.num_images == 30 and split.layout == CaptionLayout.uniform(30, 1)
    assert split.features.row_step == 1
    _check_pairs(split, feats, list(range(30)))


def test_one_caption_per_image_of_fewer_rows_than_checked(tmp_path):
    feats = _features((3, 4))
    write_precomp(tmp_path, "dev", feats, _captions([1] * 3))
    assert open_split(tmp_path, "dev").layout == CaptionLayout.uniform(3, 1)


# --- k per image and counts that differ ------------------------------------------------------
@pytest.mark.parametrize("per_image", [2, 7])
def test_the_same_count_for_every_image_comes_from_captions_over_images(tmp_path, per_image):
    feats = _features((6, 4, 3))
    write_precomp(tmp_path, "train", feats, _captions([per_image] * 6))
    split = open_split(tmp_path, "train")
    assert split.layout == CaptionLayout.uniform(6, per_image)
    _check_pairs(split, feats, [c // per_image for c in range(6 * per_image)])


@pytest.mark.parametrize("kind", ["npy", "h5"])
def test_counts_that_differ_come_from_an_ids_file_of_one_id_per_caption(tmp_path, kind):
    feats = _features((len(COUNTS), 4, 3))
    captions = _captions(COUNTS)
    lines = _per_caption_ids(COUNTS)
    if kind == "npy":
        write_precomp(tmp_path, "train", feats, captions)
    else:
        with h5py.File(tmp_path / "train.h5", "w") as f:
            f.create_dataset("features", data=feats, chunks=(1, 4, 3))
        (tmp_path / "train_caps.txt").write_text("".join(c + "\n" for c in captions))
    _write_ids(tmp_path, "train", lines)
    split = open_split(tmp_path, "train")
    owner = _naive_owner(lines)
    assert split.num_images == len(COUNTS) and split.layout.per_image is None
    assert split.layout.owner.tolist() == owner
    # The captions say which image they were written for: the layout agrees.
    assert all(caption.split()[1] == str(owner[c]) for c, caption in enumerate(split.captions))
    _check_pairs(split, feats, owner)
    images = ImageDataset(split)
    np.testing.assert_array_equal(images[4][0].numpy(), feats[4])


def test_limit_keeps_the_first_images_and_their_own_captions(tmp_path):
    feats = _features((len(COUNTS), 3))
    write_precomp(tmp_path, "dev", feats, _captions(COUNTS))
    _write_ids(tmp_path, "dev", _per_caption_ids(COUNTS))
    split = open_split(tmp_path, "dev").limit(3)
    assert split.num_images == 3 and split.layout.counts.tolist() == COUNTS[:3]
    assert split.captions == _captions(COUNTS[:3])
    np.testing.assert_array_equal(split.features.read_many([0, 1, 2]), feats[:3])
    _check_pairs(split, feats[:3], _naive_owner(_per_caption_ids(COUNTS[:3])))


# --- SCAN's layout: one feature row per caption ----------------------------------------------
def test_repeated_rows_with_counts_that_differ_read_each_images_first_row(tmp_path):
    feats = _features((len(COUNTS), 3))
    rows = np.repeat(feats, COUNTS, axis=0)
    write_precomp(tmp_path, "train", rows, _captions(COUNTS))
    _write_ids(tmp_path, "train", _per_caption_ids(COUNTS))
    split = open_split(tmp_path, "train")
    assert split.num_images == len(COUNTS) and split.features.row_step is None
    np.testing.assert_array_equal(split.features.read_many(range(len(COUNTS))), feats)
    _check_pairs(split, feats, _naive_owner(_per_caption_ids(COUNTS)))
    head = split.limit(5).features
    np.testing.assert_array_equal(head.read_many(range(5)), feats[:5])
    with pytest.raises(IndexError):
        head.read_many([5])
    print_ = split.features.fingerprint()
    assert print_["row_step"] is None and print_["shape"] == list(rows.shape)


def test_repeated_rows_of_an_hdf5_file_give_each_images_region_count(tmp_path):
    feats = _features((len(COUNTS), 4, 3))
    regions = np.array([4, 2, 1, 3, 4, 2, 1, 3], dtype=np.int32)
    with h5py.File(tmp_path / "train.h5", "w") as f:
        f.create_dataset("features", data=np.repeat(feats, COUNTS, axis=0), chunks=(1, 4, 3))
        f.create_dataset("num_regions", data=np.repeat(regions, COUNTS))
    (tmp_path / "train_caps.txt").write_text("".join(c + "\n" for c in _captions(COUNTS)))
    _write_ids(tmp_path, "train", _per_caption_ids(COUNTS))
    store = open_split(tmp_path, "train").features
    assert store.regions_many(range(8)).tolist() == regions.tolist()
    assert [store.num_regions(i) for i in range(8)] == regions.tolist()


@pytest.mark.parametrize("ids", ["per-image", "per-caption"])
def test_repeated_rows_with_another_common_count_read_every_kth_row(tmp_path, ids):
    feats = _features((6, 3))
    write_precomp(tmp_path, "dev", np.repeat(feats, 3, axis=0), _captions([3] * 6))
    _write_ids(tmp_path, "dev", range(6) if ids == "per-image" else np.repeat(range(6), 3))
    split = open_split(tmp_path, "dev")
    assert split.layout == CaptionLayout.uniform(6, 3) and split.features.row_step == 3
    _check_pairs(split, feats, [c // 3 for c in range(18)])


def test_scans_five_repeated_rows_without_ids_are_read_as_before(tmp_path):
    feats = _features((6, 3))
    write_precomp(tmp_path, "dev", np.repeat(feats, 5, axis=0), _captions([5] * 6))
    split = open_split(tmp_path, "dev")
    assert split.layout == CaptionLayout.uniform(6, 5) and split.features.row_step == 5
    assert split.features.fingerprint()["row_step"] == 5
    _check_pairs(split, feats, [c // 5 for c in range(30)])


# --- refusals ------------------------------------------------------------------------------------
def test_an_ids_file_whose_runs_do_not_match_the_features_names_both(tmp_path):
    write_precomp(tmp_path, "train", _features((5, 3)), _captions(COUNTS))
    _write_ids(tmp_path, "train", _per_caption_ids(COUNTS))
    with pytest.raises(UserError, match=r"train_ims.npy has 5 images but \S*train_ids.txt "
                                        r"lists 8 \(one id per caption.*same split"):
        open_split(tmp_path, "train")


def test_an_ids_file_of_other_captions_names_both(tmp_path):
    write_precomp(tmp_path, "train", _features((8, 3)), _captions(COUNTS)[:-1])
    _write_ids(tmp_path, "train", _per_caption_ids(COUNTS))
    with pytest.raises(UserError, match=r"train_caps.txt has 28 captions but \S*train_ids.txt "
                                        r"lists one id per caption for 29"):
        open_split(tmp_path, "train")


def test_one_id_per_image_needs_the_same_count_for_each(tmp_path):
    write_precomp(tmp_path, "train", _features((8, 3)), _captions(COUNTS))
    _write_ids(tmp_path, "train", range(8))
    with pytest.raises(UserError, match=r"train_caps.txt has 29 captions but \S*train_ids.txt "
                                        r"lists 8 images once each.*once per caption"):
        open_split(tmp_path, "train")


def test_an_ids_file_of_other_images_is_refused_even_for_five_per_image(tmp_path):
    write_precomp(tmp_path, "train", _features((6, 3)), _captions([5] * 6))
    _write_ids(tmp_path, "train", range(5))
    with pytest.raises(UserError, match=r"train_ims.npy has 6 images but \S*train_ids.txt "
                                        r"lists 5 \(one id per image\)"):
        open_split(tmp_path, "train")


def test_repeated_rows_in_runs_no_file_explains_are_refused(tmp_path):
    """As many rows as captions, rows repeated in runs of varying length and no ids file:
    reading it as one caption per image would pair each caption with a wrong row's image."""
    rows = np.repeat(_features((len(COUNTS), 3)), COUNTS, axis=0)
    write_precomp(tmp_path, "train", rows, _captions(COUNTS))
    with pytest.raises(UserError, match=r"train_caps.txt has 29 captions for the 29 feature "
                                        r"rows .*consecutive rows equal.*write \S*train_ids.txt"
                                        " listing each image's id once per caption"):
        open_split(tmp_path, "train")


@pytest.mark.parametrize("per_image", [6, 10])
def test_repeated_rows_in_runs_longer_than_five_without_ids_are_refused(tmp_path, per_image):
    """10 images of 6 (or 10) repeated rows each: both ends' first 5 rows are one row
    repeated, as in SCAN's layout, but read as 5 per image caption 7 would get image 1's
    row's neighbour; without an ids file that says so, it is refused."""
    rows = np.repeat(_features((10, 3)), per_image, axis=0)
    write_precomp(tmp_path, "train", rows, _captions([per_image] * 10))
    with pytest.raises(UserError, match=r"write \S*train_ids.txt"):
        open_split(tmp_path, "train")
    _write_ids(tmp_path, "train", range(10))
    assert open_split(tmp_path, "train").layout == CaptionLayout.uniform(10, per_image)


def test_captions_not_a_multiple_of_the_images_without_ids_name_the_fix(tmp_path):
    write_precomp(tmp_path, "train", _features((8, 3)), _captions(COUNTS))
    with pytest.raises(UserError, match=r"has 29 captions but \S*train_ims.npy has 8 images; "
                                        r".*train_ids.txt listing each image's id once per"):
        open_split(tmp_path, "train")


# --- id files --------------------------------------------------------------------------------
def test_id_runs_are_the_caption_counts(tmp_path):
    path = tmp_path / "train_ids.txt"
    lines = _per_caption_ids(COUNTS)
    path.write_text("".join(f"{i}\n" for i in lines))
    ids, runs = read_id_runs(path)
    assert ids.tolist() == list(range(100, 108)) and runs.tolist() == COUNTS
    assert CaptionLayout.from_counts(runs).owner.tolist() == _naive_owner(lines)
    path.write_text("7\n3\n9\n")
    ids, runs = read_id_runs(path)
    assert ids.tolist() == [7, 3, 9] and runs is None
    path.write_text("7\n7\n3\n7\n")
    with pytest.raises(UserError, match="1 image ids listed more than once .*first: 7"):
        read_id_runs(path)


def test_a_list_of_images_still_refuses_runs_other_than_five(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("1\n1\n2\n")
    with pytest.raises(UserError, match="1 image ids listed more than once"):
        read_ids_file(path)
    path.write_text("4\n" * 5 + "2\n" * 5)
    assert read_ids_file(path).tolist() == [4, 2]


def test_split_runs_are_checked_against_the_captions(tmp_path):
    _write_ids(tmp_path, "train", _per_caption_ids(COUNTS))
    (tmp_path / "train_caps.txt").write_text("".join(c + "\n" for c in _captions(COUNTS)))
    ids, runs = read_split_runs(tmp_path, "train")
    assert len(ids) == 8 and runs.tolist() == COUNTS
    (tmp_path / "train_caps.txt").write_text("a\n" * 30)
    with pytest.raises(UserError, match=r"has 30 captions but the ids file lists 8 images "
                                        r"with 29 captions"):
        read_split_runs(tmp_path, "train")
    _write_ids(tmp_path, "train", range(8))
    with pytest.raises(UserError, match=r"has 30 captions but the ids file lists 8 images "
                                        r"\(\S*train_ids.txt: one id per image"):
        read_split_runs(tmp_path, "train")
    (tmp_path / "train_caps.txt").write_text("a\n" * 16)
    assert read_split_runs(tmp_path, "train")[1] is None


def test_feature_store_image_rows_and_their_fingerprint(tmp_path):
    rows = _features((10, 3))
    np.save(tmp_path / "x_ims.npy", rows)
    store = FeatureStore(tmp_path / "x_ims.npy", 10, (3,), image_rows=np.array([0, 2, 3, 7]))
    assert len(store) == 4
    np.testing.assert_array_equal(store.read_many([3, 0, 3]), rows[[7, 0, 7]])
    other = FeatureStore(tmp_path / "x_ims.npy", 10, (3,), image_rows=np.array([0, 2, 4, 7]))
    assert store.fingerprint() != other.fingerprint()


# --- the synthetic data --------------------------------------------------------------------------
def test_synthetic_data_with_counts_that_differ(tmp_path):
    splits = {"train": 11, "dev": 4}
    write_synthetic_dataset(tmp_path / "d", splits, feature_dim=8, captions_per_image=COUNTS)
    for split, n in splits.items():
        want = np.resize(COUNTS, n).tolist()
        lines = [int(x) for x in (tmp_path / "d" / f"{split}_ids.txt").read_text().split()]
        assert len(lines) == sum(want) and _naive_owner(lines) == np.repeat(
            np.arange(n), want).tolist()
        opened = open_split(tmp_path / "d", split)
        assert opened.layout.counts.tolist() == want
    write_synthetic_dataset(tmp_path / "one", splits, feature_dim=8, captions_per_image=1)
    opened = open_split(tmp_path / "one", "train")
    assert opened.layout == CaptionLayout.uniform(11, 1)
    assert len((tmp_path / "one" / "train_ids.txt").read_text().split()) == 11
