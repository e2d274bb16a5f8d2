"""Raw images as a split source: transforms, seeded augmentation, errors, fingerprint."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from stages.core.errors import UserError
from stages.data.dataset import ImageDataset, PairDataset, collate_images, open_split
from stages.data.images import CROP_RATIO, CROP_SCALE, UnreadableImage, crop_box, open_images
from stages.data.vocab import Vocab
from stages.features.cnn import image_transform
from tests.raw_images import write_image_dataset

SIZE = 32


@pytest.fixture
def pixels(tmp_path):
    return write_image_dataset(tmp_path)


def test_eval_transform_is_the_features_stage_one(pixels):
    images, dataset = pixels
    store = open_images(dataset, "dev", images, SIZE)
    got = store.read_many([3, 0])
    assert got.shape == (2, 3, SIZE, SIZE) and got.dtype == np.float32
    for row, index in zip(got, (3, 0), strict=True):
        with Image.open(images / store.files[index]) as image:
            want = image_transform(1, SIZE)(image.convert("RGB"))[0]
        np.testing.assert_array_equal(row, want.numpy())


def test_training_crops_are_drawn_per_seed_epoch_and_image(pixels):
    images, dataset = pixels
    store = open_images(dataset, "train", images, SIZE, augment=True, seed=5)
    first = store.read_many(range(8))
    assert np.array_equal(first, store.read_many(range(8)))  # the same draw again
    # Per image: the same whatever else is in the batch, and in whatever order.
    np.testing.assert_array_equal(store.read_many([6, 2, 2])[1:], first[[2, 2]])
    assert not np.array_equal(first, store.read_many(range(8))[::-1])
    store.set_epoch(1)
    second = store.read_many(range(8))
    assert all(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    other = open_images(dataset, "train", images, SIZE, augment=True, seed=6)
    assert all(not np.array_equal(a, b) for a, b in
               zip(first, other.read_many(range(8)), strict=True))
    # Crops differ from the evaluation view.
    plain = open_images(dataset, "train", images, SIZE)
    assert not np.array_equal(first, plain.read_many(range(8)))


def test_crops_do_not_depend_on_workers(pixels):
    images, dataset = pixels
    split = open_split(dataset, "train", open_images(dataset, "train", images, SIZE,
                                                     augment=True, seed=1))
    split.set_epoch(3)

    def crops(workers):
        loader = DataLoader(PairDataset(split, Vocab.load(dataset / "vocab.json")),
                            batch_size=10, num_workers=workers,
                            collate_fn=lambda items: torch.stack([i[0] for i in items]))
        return torch.cat(list(loader))

    assert torch.equal(crops(0), crops(2))


def test_crop_boxes_stay_inside_within_scale_and_ratio():
    rng = np.random.default_rng(0)
    for width, height in ((64, 48), (30, 200), (500, 40), (7, 7)):
        for _ in range(200):
            top, left, h, w = crop_box(width, height, rng)
            assert top >= 0 and top + h <= height and left >= 0 and left + w <= width
            assert h > 0 and w > 0
    # Images of a usual shape get crops of the area and ratio range (rounding aside).
    areas, ratios = [], []
    for _ in range(500):
        _, _, h, w = crop_box(400, 300, rng)
        areas.append(h * w / (400 * 300))
        ratios.append(w / h)
    assert CROP_SCALE[0] * 0.9 <= min(areas) and max(areas) <= CROP_SCALE[1]
    assert CROP_RATIO[0] * 0.95 <= min(ratios) and max(ratios) <= CROP_RATIO[1] * 1.05
    assert np.median(areas) < 0.7  # drawn, not always the whole image


def test_an_unreadable_image_is_one_line_naming_it(pixels):
    images, dataset = pixels
    bad = images / "dev" / "0002.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    split = open_split(dataset, "dev", open_images(dataset, "dev", images, SIZE))
    with pytest.raises(UnreadableImage, match="0002.jpg") as info:
        split.features.read_many([1, 2])
    assert "dev_images.txt" in str(info.value)
    loader = DataLoader(ImageDataset(split), batch_size=3, num_workers=1,
                        collate_fn=collate_images)
    with pytest.raises(UnreadableImage) as info:  # raised in a worker
        list(loader)
    message = str(info.value)
    assert "\n" not in message and message.startswith("cannot read image") \
        and "0002.jpg" in message


def test_missing_root_list_or_files_are_clear_errors(pixels, tmp_path):
    images, dataset = pixels
    with pytest.raises(UserError, match="set data.images"):
        open_images(dataset, "dev", "", SIZE)
    with pytest.raises(UserError, match="image folder .* not found"):
        open_images(dataset, "dev", tmp_path / "nowhere", SIZE)
    with pytest.raises(UserError, match=r"has no split 'testall' \(no testall_caps.txt; "
                                        r"its splits: dev, test, train\)"):
        open_images(dataset, "testall", images, SIZE)
    (dataset / "test_images.txt").unlink()  # the split's captions are there, its list not
    with pytest.raises(UserError, match="test_images.txt not found; models that read raw"):
        open_images(dataset, "test", images, SIZE)
    (images / "dev" / "0001.jpg").unlink()
    with pytest.raises(UserError, match=r"1 of the 6 images .* dev/0001.jpg"):
        open_images(dataset, "dev", images, SIZE)


def test_captions_must_match_the_image_list(pixels):
    images, dataset = pixels
    caps = dataset / "dev_caps.txt"
    caps.write_text("".join(caps.read_text().splitlines(keepends=True)[:-5]))
    with pytest.raises(UserError, match="25 captions but .* 6 images"):
        open_split(dataset, "dev", open_images(dataset, "dev", images, SIZE))


def test_fingerprint_follows_the_images_not_their_folder(pixels, tmp_path):
    images, dataset = pixels
    before = open_images(dataset, "dev", images, SIZE).fingerprint()
    moved = tmp_path / "moved"
    images.rename(moved)
    assert open_images(dataset, "dev", moved, SIZE).fingerprint() == before
    last = moved / "dev" / "0005.jpg"
    Image.new("RGB", (50, 50), (1, 2, 3)).save(last)
    assert open_images(dataset, "dev", moved, SIZE).fingerprint() != before


def test_limit_keeps_the_first_images(pixels):
    images, dataset = pixels
    split = open_split(dataset, "train", open_images(dataset, "train", images, SIZE))
    head = split.limit(4)
    assert head.num_images == 4 and len(head.captions) == 20
    np.testing.assert_array_equal(head.features.read_many([3]), split.features.read_many([3]))
