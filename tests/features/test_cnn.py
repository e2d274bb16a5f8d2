import json
import os

import h5py
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from stages.core.errors import UserError
from stages.data.dataset import open_split
from stages.data.images import IMAGENET_MEAN, IMAGENET_STD
from stages.features import cnn
from stages.features.annotations import coco_splits, write_splits
from stages.features.cnn import cnn_features
from stages.models.cnn import FeatureExtractor

CROP = 64


@pytest.fixture
def image_dataset(tmp_path):
    """Real JPEG files and COCO caption JSON for 5 train / 2 dev images, written as a
    dataset folder by the captions stage."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for folder, ids in (("train2017", [1, 2, 3, 4, 5]), ("val2017", [6, 7])):
        (root / folder).mkdir(parents=True)
        images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in ids]
        annotations = [{"id": 10 * i + j, "image_id": i, "caption": f"photo {i} number {j}"}
                       for i in ids for j in range(5)]
        for i in ids:
            size = (int(rng.integers(70, 120)), int(rng.integers(70, 120)))
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / folder / f"{i:012d}.jpg", quality=90)
        (tmp_path / f"captions_{folder}.json").write_text(
            json.dumps({"images": images, "annotations": annotations}))
    dataset = tmp_path / "ds"
    write_splits(coco_splits([tmp_path / "captions_train2017.json",
                              tmp_path / "captions_val2017.json"]), dataset)
    return root, dataset


@pytest.fixture
def resnet18_weights(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return path


def reference_resnet18(weights_path):
    """torchvision's own forward, up to the pooled features (fc replaced by identity)."""
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(torch.load(weights_path, weights_only=True))
    model.fc = torch.nn.Identity()
    return model.eval()


def load_image(root, dataset, split, row):
    rel = (dataset / f"{split}_images.txt").read_text().split()[row]
    return Image.open(root / rel).convert("RGB")


def normalise(t):
    return transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(t)


def read(path):
    with h5py.File(path, "r") as f:
        return np.asarray(f["features"]), np.asarray(f["image_ids"]), dict(f.attrs)


def test_global_features_match_torchvision(image_dataset, resnet18_weights):
    root, dataset = image_dataset
    outputs = cnn_features(root, dataset, ["dev", "train"], "resnet18", str(resnet18_weights),
                           crop_size=CROP, batch_size=3, workers=0, device="cpu")
    assert [p.name for p in outputs] == ["dev.h5", "train.h5"]
    feats, ids, attrs = read(dataset / "train.h5")
    assert feats.shape == (5, 512) and ids.tolist() == [1, 2, 3, 4, 5]
    assert attrs["arch"] == "resnet18" and attrs["crops"] == 1
    reference = reference_resnet18(resnet18_weights)
    resize_crop = transforms.Compose([transforms.Resize(CROP * 256 // 224),
                                      transforms.CenterCrop(CROP), transforms.ToTensor()])
    for row in range(5):
        x = normalise(resize_crop(load_image(root, dataset, "train", row)))[None]
        with torch.no_grad():
            want = reference(x)[0].numpy()
        np.testing.assert_allclose(feats[row], want, rtol=1e-4, atol=1e-5)
    split = open_split(dataset, "train")  # training reads it
    assert split.features.read_many([0]).shape == (1, 512)


def test_ten_crops_average_and_grid(image_dataset, resnet18_weights):
    root, dataset = image_dataset
    cnn_features(root, dataset, ["dev"], "resnet18", str(resnet18_weights), crops=10,
                 crop_size=CROP, workers=0, device="cpu")
    ten, _, _ = read(dataset / "dev.h5")
    reference = reference_resnet18(resnet18_weights)
    views = transforms.Compose([transforms.Resize(CROP * 256 // 224),
                                transforms.TenCrop(CROP)])(load_image(root, dataset, "dev", 1))
    x = torch.stack([normalise(transforms.ToTensor()(v)) for v in views])
    with torch.no_grad():
        want = reference(x).mean(0).numpy()
    np.testing.assert_allclose(ten[1], want, rtol=1e-4, atol=1e-5)

    (dataset / "dev.h5").unlink()
    cnn_features(root, dataset, ["dev"], "resnet18", str(resnet18_weights), grid=True,
                 crop_size=CROP, workers=0, device="cpu")
    grid, _, _ = read(dataset / "dev.h5")
    assert grid.shape == (2, 4, 512)  # 64 / 32 = a 2 x 2 map of 512 channels
    one_crop = FeatureExtractor("resnet18", str(resnet18_weights))
    x = cnn.image_transform(1, CROP)(load_image(root, dataset, "dev", 0))
    np.testing.assert_allclose(grid[0].mean(0), one_crop(x)[0].numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch, dim", [("vgg19", 4096), ("mobilenet_v3_large", 1280)])
def test_vgg_fc7_and_mobilenet_penultimate(arch, dim):
    torch.manual_seed(0)
    extractor = FeatureExtractor(arch, "random")
    reference = torchvision.models.get_model(arch, weights=None)
    reference.load_state_dict({**extractor.trunk.state_dict(prefix="features."),
                               **_head_state(extractor, reference)}, strict=False)
    reference.classifier = reference.classifier[:5 if arch == "vgg19" else 2]
    x = torch.randn(2, 3, CROP, CROP)
    with torch.no_grad():
        got, want = extractor(x), reference.eval()(x)
    assert got.shape == (2, dim)
    torch.testing.assert_close(got, want)


def _head_state(extractor, reference):
    """The extractor's head weights under the reference's classifier names."""
    names = [n for n, _ in reference.classifier.named_parameters()]
    return {f"classifier.{n}": p for n, p in zip(names, extractor.head.parameters(),
                                                    strict=False)}


def test_unreadable_images_fail_or_are_dropped_with_their_captions(image_dataset,
                                                                    resnet18_weights):
    root, dataset = image_dataset
    broken = root / "train2017" / "000000000003.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated download
    with pytest.raises(UserError, match="cannot read image .*000000000003.jpg.*--on-bad-image"):
        cnn_features(root, dataset, ["train"], "resnet18", str(resnet18_weights),
                     crop_size=CROP, workers=0, device="cpu")
    assert not (dataset / "train.h5").exists()
    assert (dataset / "train.h5.partial").exists()  # the other images are kept for a rerun
    cnn_features(root, dataset, ["train"], "resnet18", str(resnet18_weights), crop_size=CROP,
                 workers=0, device="cpu", on_bad_image="skip")
    feats, ids, attrs = read(dataset / "train.h5")
    assert ids.tolist() == [1, 2, 4, 5] and feats.shape == (4, 512)
    assert attrs["skipped_images"] == 1
    assert (dataset / "train_skipped.txt").read_text() == "train2017/000000000003.jpg\n"
    split = open_split(dataset, "train")
    assert len(split.captions) == 20 and "photo 3 number 0" not in split.captions
    assert not list(dataset.glob("*.partial")) and not list(dataset.glob("*.kept.h5"))
    # train.h5 is newer than the rewritten captions: make takes the stage as done.
    assert (dataset / "train.h5").stat().st_mtime >= (dataset / "train_caps.txt").stat().st_mtime


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="weights file .*nope.pth not found"):
        FeatureExtractor("resnet18", str(tmp_path / "nope.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match=r"not in torchvision's cache .*resnet18-.*\.pth"):
        FeatureExtractor("resnet18", "imagenet")
    with pytest.raises(UserError, match="unknown CNN 'alexnet9'"):
        FeatureExtractor("alexnet9", "random")


def test_random_weights_are_seeded_and_the_seed_is_recorded(image_dataset, tmp_path):
    import shutil

    root, dataset = image_dataset
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        shutil.copytree(dataset, tmp_path / name)
        cnn_features(root, tmp_path / name, ["dev"], "resnet18", "random", crop_size=CROP,
                     workers=0, device="cpu", seed=seed)
        runs[name] = read(tmp_path / name / "dev.h5")
    np.testing.assert_array_equal(runs["a"][0], runs["b"][0])  # two runs: the same network
    assert not np.allclose(runs["a"][0], runs["c"][0])
    assert runs["a"][2]["seed"] == 0 and runs["c"][2]["seed"] == 1


def test_a_resume_with_another_seed_starts_over(image_dataset, tmp_path):
    import shutil

    root, dataset = image_dataset
    shutil.copytree(dataset, tmp_path / "fresh")
    broken = root / "train2017" / "000000000003.jpg"
    original = broken.read_bytes()
    broken.write_bytes(original[:200])
    with pytest.raises(UserError, match="cannot read image"):  # leaves a seed-0 partial file
        cnn_features(root, dataset, ["train"], "resnet18", "random", crop_size=CROP,
                     workers=0, device="cpu", seed=0)
    assert (dataset / "train.h5.partial").exists()
    broken.write_bytes(original)
    cnn_features(root, dataset, ["train"], "resnet18", "random", crop_size=CROP, workers=0,
                 device="cpu", seed=1)
    cnn_features(root, tmp_path / "fresh", ["train"], "resnet18", "random", crop_size=CROP,
                 workers=0, device="cpu", seed=1)
    np.testing.assert_array_equal(read(dataset / "train.h5")[0],
                                  read(tmp_path / "fresh" / "train.h5")[0])


class Killed(BaseException):
    """A kill: nothing after it runs but the cleanup handlers."""


@pytest.mark.parametrize("kill_at", range(1, 8))
def test_dropping_bad_images_killed_midway_is_finished_by_a_rerun(image_dataset,
                                                                   resnet18_weights,
                                                                   monkeypatch, kill_at):
    """``os.replace`` calls while dropping an image: 1 the compacted features, 2 the
    journal, 3-7 the skipped list, image list, ids, captions and features. A kill at any
    of them leaves files a rerun finishes: never captions of one set with ids of another."""
    import os

    root, dataset = image_dataset
    broken = root / "train2017" / "000000000003.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    run = {"images_root": root, "dataset_dir": dataset, "splits": ["train"],
           "arch": "resnet18", "weights": str(resnet18_weights), "crop_size": CROP,
           "workers": 0, "device": "cpu", "on_bad_image": "skip"}
    calls = []
    real_replace = os.replace

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == kill_at:
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        cnn_features(**run)
    monkeypatch.undo()
    ids = (dataset / "train_ids.txt").read_text().split()
    caps = (dataset / "train_caps.txt").read_text().splitlines()
    images = (dataset / "train_images.txt").read_text().split()
    if kill_at <= 2:  # before the journal: the old set, whole
        assert len(ids) == 5 and len(caps) == 25 and len(images) == 5
    cnn_features(**run)
    feats, h5_ids, attrs = read(dataset / "train.h5")
    assert h5_ids.tolist() == [1, 2, 4, 5] and attrs["skipped_images"] == 1
    assert (dataset / "train_ids.txt").read_text().split() == ["1", "2", "4", "5"]
    split = open_split(dataset, "train")
    assert len(split.captions) == 20 and "photo 3 number 0" not in split.captions
    assert (dataset / "train_skipped.txt").read_text() == "train2017/000000000003.jpg\n"
    assert len((dataset / "train_images.txt").read_text().split()) == 4
    assert sorted(p.name for p in dataset.iterdir() if p.name.startswith(".")) == []
    assert not list(dataset.glob("*.partial")) and not list(dataset.glob("*.kept.h5"))
    assert (dataset / "train.h5").stat().st_mtime >= (dataset / "train_caps.txt").stat().st_mtime


def test_workers_are_sized_to_the_machine_and_said_once(image_dataset, tmp_path, monkeypatch,
                                                        caplog):
    """`--workers 4` (the default) on a 2-core machine: 2 decoding processes, one line
    saying so, and none of PyTorch's "suggested max" warnings (it gave two per split)."""
    import warnings

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    root, dataset = image_dataset
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO"):
        warnings.simplefilter("always")
        cnn_features(root, dataset, ["train", "dev"], "resnet18", "random", crop_size=CROP,
                     workers=4, device="cpu")
    assert [str(w.message) for w in caught if "worker" in str(w.message)] == []
    said = [r.getMessage() for r in caplog.records if "--workers" in r.getMessage()]
    assert said == ["--workers 4: this process may use 2 cores; decoding images in 2 worker "
                    "processes"]
    assert read(dataset / "train.h5")[0].shape[0] == 5


def test_dropping_an_image_keeps_the_others_captions_when_counts_differ(image_dataset,
                                                                        resnet18_weights):
    root, dataset = image_dataset
    counts = [2, 1, 4, 3, 1]  # train images 1..5
    captions = [f"photo {i + 1} number {j}" for i, n in enumerate(counts) for j in range(n)]
    (dataset / "train_caps.txt").write_text("".join(c + "\n" for c in captions))
    (dataset / "train_ids.txt").write_text("".join(f"{i + 1}\n" * n
                                                   for i, n in enumerate(counts)))
    broken = root / "train2017" / "000000000003.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    cnn_features(root, dataset, ["train"], "resnet18", str(resnet18_weights), crop_size=CROP,
                 workers=0, device="cpu", on_bad_image="skip")
    feats, ids, _ = read(dataset / "train.h5")
    assert ids.tolist() == [1, 2, 4, 5]
    kept = [2, 1, 3, 1]
    assert (dataset / "train_ids.txt").read_text().split() == [
        str(i) for i, n in zip([1, 2, 4, 5], kept, strict=True) for _ in range(n)]
    split = open_split(dataset, "train")
    assert split.layout.counts.tolist() == kept
    assert split.captions == [c for c in captions if not c.startswith("photo 3 ")]
    for c, caption in enumerate(split.captions):
        assert int(caption.split()[1]) == ids[split.layout.owner[c]]
    np.testing.assert_array_equal(split.features.read_many(range(4)), feats)
