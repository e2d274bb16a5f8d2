import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from stages.data.dataset import (
    CaptionDataset,
    ImageDataset,
    PairDataset,
    collate_pairs,
    open_split,
)
from stages.data.vocab import Vocab
from stages.training.batches import epoch_batches, epoch_permutation
from tests.conftest import write_precomp

CAPTIONS = [f"image {i} caption {j}" for i in range(6) for j in range(5)]


def _features(shape):
    return np.random.default_rng(0).normal(size=shape).astype(np.float32)


def _write_h5(folder, split, features, num_regions=None):
    folder.mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / f"{split}.h5", "w") as f:
        f.create_dataset("features", data=features, chunks=(1, *features.shape[1:]))
        if num_regions is not None:
            f.create_dataset("num_regions", data=num_regions)
    (folder / f"{split}_caps.txt").write_text("".join(c + "\n" for c in CAPTIONS))


@pytest.mark.parametrize("layout", ["npy", "h5"])
@pytest.mark.parametrize("shape", [(6, 4, 3), (6, 3)])
def test_caption_c_is_paired_with_image_c_div_5(tmp_path, layout, shape):
    feats = _features(shape)
    if layout == "npy":
        write_precomp(tmp_path, "train", feats, CAPTIONS)
    else:
        _write_h5(tmp_path, "train", feats)
    split = open_split(tmp_path, "train")
    assert split.num_images == 6 and split.features.has_regions == (len(shape) == 3)
    vocab = Vocab.build(CAPTIONS, threshold=1)
    pairs = PairDataset(split, vocab)
    assert len(pairs) == 30
    for c in (0, 4, 5, 17, 29):
        image, regions, tokens, cap_id, image_id = pairs[c]
        assert (cap_id, image_id) == (c, c // 5)
        np.testing.assert_array_equal(image.numpy(), feats[c // 5])
        assert regions == (shape[1] if len(shape) == 3 else 1)
        assert vocab.decode(tokens.tolist())[1:-1] == CAPTIONS[c].split()
    # A batch fetched at once equals the items fetched one by one.
    batch = pairs.__getitems__([29, 0, 5, 6, 0])
    for item, c in zip(batch, [29, 0, 5, 6, 0], strict=True):
        np.testing.assert_array_equal(item[0].numpy(), feats[c // 5])
    images = ImageDataset(split)
    np.testing.assert_array_equal(images[3][0].numpy(), feats[3])
    assert CaptionDataset(split, vocab)[7][1] == 7


def test_one_feature_row_per_caption_is_read_as_one_image(tmp_path):
    feats = np.repeat(_features((6, 3)), 5, axis=0)  # some VSE++ releases repeat rows
    write_precomp(tmp_path, "dev", feats, CAPTIONS)
    split = open_split(tmp_path, "dev")
    assert split.num_images == 6
    np.testing.assert_array_equal(split.features[2], feats[10])


@pytest.mark.parametrize("ids", [None, "per-image", "per-caption"])
def test_repeated_rows_are_read_as_one_image_when_the_ids_or_rows_say_so(tmp_path, ids):
    feats = np.repeat(_features((6, 3)), 5, axis=0)
    write_precomp(tmp_path, "dev", feats, CAPTIONS)
    if ids:
        per = 1 if ids == "per-image" else 5
        (tmp_path / "dev_ids.txt").write_text("".join(f"{10 + i // per}\n"
                                                      for i in range(6 * per)))
    assert open_split(tmp_path, "dev").num_images == 6


@pytest.mark.parametrize("ids", [True, False])
def test_one_caption_per_image_is_not_read_as_five(tmp_path, ids):
    """30 images with one caption each (and 30 ids) were once read as 6 images of 5
    captions, pairing captions with the wrong images: the ids (one per image) or the rows
    (no two consecutive ones equal) say it is one caption per image."""
    feats = _features((30, 3))
    write_precomp(tmp_path, "dev", feats, CAPTIONS)
    if ids:
        (tmp_path / "dev_ids.txt").write_text("".join(f"{100 + i}\n" for i in range(30)))
    split = open_split(tmp_path, "dev")
    assert split.num_images == 30 and split.layout.owner.tolist() == list(range(30))
    np.testing.assert_array_equal(split.features[29], feats[29])


def test_padded_region_counts_from_hdf5(tmp_path):
    feats = _features((6, 4, 3))
    counts = np.array([4, 2, 1, 4, 3, 4], dtype=np.int32)
    _write_h5(tmp_path, "train", feats, counts)
    split = open_split(tmp_path, "train")
    assert [split.features.num_regions(i) for i in range(6)] == counts.tolist()
    np.testing.assert_array_equal(split.features.regions_many([1, 2, 1]), [2, 1, 2])


def test_limit_takes_first_images_and_their_captions(tmp_path):
    write_precomp(tmp_path, "dev", _features((6, 3)), CAPTIONS)
    split = open_split(tmp_path, "dev").limit(2)
    assert split.num_images == 2 and split.captions == CAPTIONS[:10]


def test_loader_batches_and_workers(tmp_path):
    feats = _features((6, 4, 3))
    _write_h5(tmp_path, "train", feats)
    vocab = Vocab.build(CAPTIONS, threshold=1)
    loader = DataLoader(PairDataset(open_split(tmp_path, "train"), vocab),
                        batch_sampler=[[0, 9, 29], [3, 4]], collate_fn=collate_pairs,
                        num_workers=1)
    first, second = list(loader)
    assert first["images"].shape == (3, 4, 3) and first["tokens"].shape[0] == 3
    torch.testing.assert_close(first["images"][2], torch.from_numpy(feats[5]))
    assert first["image_ids"].tolist() == [0, 1, 5]
    assert second["lengths"].tolist() == [6, 6]  # <start> image 0 caption 3 <end>


def test_epoch_permutation_depends_only_on_seed_and_epoch():
    a = epoch_permutation(100, seed=1, epoch=3)
    np.testing.assert_array_equal(a, epoch_permutation(100, seed=1, epoch=3))
    assert sorted(a) == list(range(100))
    assert not np.array_equal(a, epoch_permutation(100, seed=1, epoch=4))


def test_epoch_batches_split_across_ranks_cover_the_single_process_order():
    single = epoch_batches(103, 4, seed=2, epoch=1)
    assert [i for b in single for i in b] == epoch_permutation(103, 2, 1).tolist()
    ranks = [epoch_batches(103, 2, seed=2, epoch=1, rank=r, world_size=2) for r in (0, 1)]
    merged = [sorted(a + b) for a, b in zip(ranks[0], ranks[1], strict=False)]
    assert merged[:25] == [sorted(b) for b in single[:25]]
    assert sorted(i for r in ranks for b in r for i in b) == list(range(103))


def test_splits_of_other_feature_extractors_are_refused(tmp_path):
    from stages.core.errors import UserError
    from stages.data.dataset import check_compatible

    write_precomp(tmp_path, "train", _features((6, 4, 3)), CAPTIONS)
    write_precomp(tmp_path, "dev", _features((6, 4, 3)), CAPTIONS)
    write_precomp(tmp_path, "dim", _features((6, 4, 5)), CAPTIONS)
    write_precomp(tmp_path, "pooled", _features((6, 3)), CAPTIONS)
    train = open_split(tmp_path, "train")
    check_compatible(train, open_split(tmp_path, "dev"))
    with pytest.raises(UserError, match=r"dim_ims.npy \(dim\) holds features of shape "
                                        r"\(6, 4, 5\) but .*train_ims.npy \(train\) \(6, 4, 3\)"):
        check_compatible(train, open_split(tmp_path, "dim"))
    with pytest.raises(UserError, match=r"pooled_ims.npy .*\(6, 3\) but .*\(6, 4, 3\)"):
        check_compatible(train, open_split(tmp_path, "pooled"))
