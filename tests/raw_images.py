"""Tiny raw-image datasets for models that read pixels: real JPEG/PNG files written with PIL
and the files `aoq captions` writes ({split}_caps.txt, _ids.txt, _images.txt)."""

from pathlib import Path

import numpy as np
from PIL import Image

from stages.data.vocab import build_vocab_file

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220),
           "yellow": (230, 220, 30), "white": (240, 240, 240), "black": (15, 15, 15)}
SPLITS = {"train": 24, "dev": 6, "test": 6}
# vse_cnn small enough for tests: resnet18 at 32 px, random weights.
TINY_CNN = ["model.name=vse_cnn", "model.backbone=resnet18", "model.weights=random",
            "model.image_size=32", "model.embed_size=16", "model.word_dim=8",
            "train.batch_size=8", "train.epochs=1", "data.workers=0", "train.device=cpu"]


def write_image(path: Path, colour: tuple[int, int, int], rng: np.random.Generator) -> None:
    """A ``colour`` picture with noise, 40-72 px a side, JPEG or PNG by the suffix."""
    width, height = (int(v) for v in rng.integers(40, 73, size=2))
    noise = rng.integers(-40, 41, (height, width, 3))
    pixels = np.clip(np.asarray(colour)[None, None] + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def write_image_dataset(root: Path, name: str = "pix", splits: dict | None = None,
                        seed: int = 0) -> tuple[Path, Path]:
    """``root/images/`` (the image root) and the dataset folder ``root/name`` with its
    vocabulary; image k of a split is a picture of colour k mod 6, captioned with it.
    Returns (image root, dataset folder)."""
    rng = np.random.default_rng(seed)
    images, dataset = root / "images", root / name
    dataset.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    for split, count in (splits or SPLITS).items():
        (images / split).mkdir(parents=True, exist_ok=True)
        files, captions = [], []
        for k in range(count):
            colour = names[k % len(names)]
            file = f"{split}/{k:04d}.{'png' if k % 4 == 3 else 'jpg'}"
            write_image(images / file, COLOURS[colour], rng)
            files.append(file)
            captions += [f"a {colour} picture", f"something {colour}", f"{colour} noise",
                         f"the colour {colour}", f"a photo that is {colour}"]
        (dataset / f"{split}_images.txt").write_text("".join(f + "\n" for f in files))
        (dataset / f"{split}_ids.txt").write_text("".join(f"{k}\n" for k in range(count)))
        (dataset / f"{split}_caps.txt").write_text("".join(c + "\n" for c in captions))
    build_vocab_file(dataset / "train_caps.txt", dataset / "vocab.json", threshold=1)
    return images, dataset
