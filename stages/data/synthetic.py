"""A synthetic image-text dataset that is a fair miniature of the real task.

Each image is a scene: a place and two or three objects, each with a colour, and a spatial
relation between the first two. Its region features are what a detector would give: one
region per object (object, colour and their binding), one for the relation (which of the
two objects is where), a few for the place, a few clutter regions, all plus noise, mapped
through a fixed random ReLU layer into D dimensions and shuffled. Its 5 captions are
paraphrases from templates with synonyms, some leaving details out as people do (or as
many as ``captions_per_image`` says: k each, or counts that differ from image to image).

Scenes come in families: a base scene and variants that change one colour, the relation,
the place, or swap the two objects' roles. So the nearest negatives of an image are
captions that differ in one attribute or relation: genuinely hard negatives, which is what
offline hard-negative mining is about.

The output is the SCAN precomp layout: ``{split}_ims.npy`` (N, R, D) float32,
``{split}_caps.txt`` (5 lines per image), ``{split}_ids.txt`` (one id per image, or per
caption when images have different numbers of captions), plus ``demo_manifest.json``
listing them.
"""

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.core.errors import UserError
from stages.data.dataset import TEXT_CACHE_FOLDER
from stages.io.atomic import (
    HOST,
    check_free_space,
    no_space_as_user_error,
    remove_stale_temp_files,
    temp_path,
)
from stages.io.lock import LOCK_NAME, folder_lock

log = logging.getLogger(__name__)

OBJECTS = [["dog", "puppy"], ["cat", "kitten"], ["man", "guy"], ["woman", "lady"],
           ["child", "kid"], ["car", "automobile"], ["bicycle", "bike"], ["ball"],
           ["horse", "pony"], ["bird"], ["boat"], ["umbrella"], ["bench"], ["table"],
           ["chair"], ["kite"], ["bus"], ["cup", "mug"], ["book"], ["tree"]]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "orange"]
RELATIONS = [["next to", "beside"], ["on", "on top of"], ["under", "below"], ["behind"],
             ["in front of"], ["near", "close to"]]
PLACES = [["park"], ["street", "road"], ["beach"], ["kitchen"], ["field", "meadow"],
          ["room"]]

TEMPLATES = [
    "a {c1} {o1} {r} a {c2} {o2} in the {p} .",
    "there is a {c1} {o1} {r} the {c2} {o2} .",
    "in the {p} , a {o1} that is {c1} is {r} a {c2} {o2} .",
    "a {c1} {o1} and a {c2} {o2} in a {p} .",
    "the {o1} is {r} the {o2} , the {o1} is {c1} .",
    "a {o1} {r} a {c2} {o2} .",
    "a photo of a {c1} {o1} {r} a {o2} at the {p} .",
    "{c1} {o1} {r} {c2} {o2}{extra}",
]

NUM_REGIONS = 12
LATENT_DIM = 64
MANIFEST = "demo_manifest.json"  # written last: the files demo-data wrote into the folder


@dataclass
class Scene:
    """A scene: objects (object, colour) pairs, relation between objects 0 and 1, place."""

    objects: list[tuple[int, int]]
    relation: int
    place: int


class SceneRenderer:
    """Fixed random concept vectors and projection: scenes -> region features (R, D)."""

    def __init__(self, feature_dim: int, seed: int):
        rng = np.random.default_rng([seed, 1])
        self.obj = rng.normal(size=(len(OBJECTS), LATENT_DIM))
        self.col = rng.normal(size=(len(COLORS), LATENT_DIM))
        self.rel = rng.normal(size=(len(RELATIONS), LATENT_DIM))
        self.place = rng.normal(size=(len(PLACES), LATENT_DIM))
        self.role_a = rng.normal(size=LATENT_DIM)
        self.role_b = rng.normal(size=LATENT_DIM)
        self.proj = rng.normal(size=(LATENT_DIM, feature_dim)) / np.sqrt(LATENT_DIM)
        self.bias = rng.normal(scale=0.1, size=feature_dim)

    def render(self, scene: Scene, rng: np.random.Generator, noise: float = 0.6) -> np.ndarray:
        latents = []
        for o, c in scene.objects:
            latents.append(self.obj[o] + 0.7 * self.col[c] + 0.7 * self.obj[o] * self.col[c])
        (o1, _), (o2, _) = scene.objects[:2]
        latents.append(self.rel[scene.relation] + self.obj[o1] * self.role_a
                       + self.obj[o2] * self.role_b)
        latents += [self.place[scene.place]] * 3
        while len(latents) < NUM_REGIONS:  # clutter: parts of objects, background
            o, _ = scene.objects[rng.integers(len(scene.objects))]
            latents.append(0.5 * self.obj[o] + rng.normal(size=LATENT_DIM))
        latents = np.stack(latents[:NUM_REGIONS])
        latents = latents + noise * rng.normal(size=latents.shape)
        features = np.maximum(latents @ self.proj + self.bias, 0.0)
        return features[rng.permutation(NUM_REGIONS)].astype(np.float32)


def _random_scene(rng: np.random.Generator) -> Scene:
    num_objects = int(rng.integers(2, 4))
    kinds = rng.choice(len(OBJECTS), size=num_objects, replace=False)
    objects = [(int(k), int(rng.integers(len(COLORS)))) for k in kinds]
    return Scene(objects, int(rng.integers(len(RELATIONS))), int(rng.integers(len(PLACES))))


def _variant(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with one thing changed: a colour, the relation, the place, or the roles."""
    objects = list(scene.objects)
    relation, place = scene.relation, scene.place
    change = rng.integers(4)
    if change == 0:
        k = int(rng.integers(2))
        o, c = objects[k]
        objects[k] = (o, int((c + rng.integers(1, len(COLORS))) % len(COLORS)))
    elif change == 1:
        relation = int((relation + rng.integers(1, len(RELATIONS))) % len(RELATIONS))
    elif change == 2:
        place = int((place + rng.integers(1, len(PLACES))) % len(PLACES))
    else:
        objects[0], objects[1] = objects[1], objects[0]
    return Scene(objects, relation, place)


def _captions(scene: Scene, rng: np.random.Generator, count: int = 5) -> list[str]:
    def pick(options: list[str]) -> str:
        return options[int(rng.integers(len(options)))]

    (o1, c1), (o2, c2) = scene.objects[:2]
    templates = rng.choice(len(TEMPLATES), size=count, replace=count > len(TEMPLATES))
    captions = []
    for t in templates:
        extra = " ."
        if len(scene.objects) > 2:
            o3, c3 = scene.objects[2]
            extra = f" with a {COLORS[c3]} {pick(OBJECTS[o3])} nearby ."
        captions.append(TEMPLATES[t].format(
            o1=pick(OBJECTS[o1]), c1=COLORS[c1], o2=pick(OBJECTS[o2]), c2=COLORS[c2],
            r=pick(RELATIONS[scene.relation]), p=pick(PLACES[scene.place]), extra=extra))
    return [_fix_articles(c) for c in captions]


def _fix_articles(caption: str) -> str:
    """'a orange' -> 'an orange'."""
    words = caption.split(" ")
    for i in range(len(words) - 1):
        if words[i].lower() == "a" and words[i + 1][:1] in "aeiou":
            words[i] += "n"
    return " ".join(words)


def generate_split(num_images: int, renderer: SceneRenderer, rng: np.random.Generator,
                   family_size: int = 4, counts: np.ndarray | None = None
                   ) -> tuple[np.ndarray, list[str]]:
    """(features (N, R, D) float32, captions) for ``num_images`` scenes in families: image
    i's ``counts[i]`` captions ((N,) ints; None: 5 each), image by image."""
    if counts is None:
        counts = np.full(num_images, 5, dtype=np.int64)
    scenes: list[Scene] = []
    while len(scenes) < num_images:
        base = _random_scene(rng)
        scenes.append(base)
        scenes += [_variant(base, rng) for _ in range(family_size - 1)]
    scenes = [scenes[i] for i in rng.permutation(len(scenes))[:num_images]]
    features = np.stack([renderer.render(s, rng) for s in scenes])
    captions = [c for s, n in zip(scenes, counts.tolist(), strict=True)
                for c in _captions(s, rng, n)]
    return features, captions


def write_synthetic_dataset(out_dir: str | Path, splits: dict[str, int], seed: int = 0,
                            feature_dim: int = 256,
                            captions_per_image: int | Sequence[int] = 5) -> Path:
    """Write a synthetic dataset in the SCAN precomp layout; returns ``out_dir``.

    ``splits`` maps split name to number of images, e.g. ``{"train": 5000, "dev": 500}``.
    ``captions_per_image``: k captions for every image, or counts repeated over each
    split's images (image i has ``counts[i % len(counts)]``; the ids files then list one
    id per caption).
    The dataset is written into a temporary folder beside ``out_dir``, ``MANIFEST`` (the
    list of its files) last, and renamed into place whole: ``out_dir`` never holds half a
    dataset. A non-empty ``out_dir`` is refused unless it holds only what demo-data wrote
    there before (its manifest and the files it lists) and the frozen text towers' output
    cache (``cache/``, dropped with the old dataset): nothing else is ever overwritten.
    """
    out_dir = Path(out_dir)
    check_only_demo_files(out_dir)
    with folder_lock(out_dir, "aoq demo-data"):
        check_only_demo_files(out_dir)  # again, now that no other writer can change it
        target = out_dir.resolve()  # a symbolic link's folder is replaced, not the link
        remove_stale_temp_files(target.parent)
        tmp = temp_path(target)
        try:
            tmp.mkdir()
            _write_splits(tmp, splits, seed, feature_dim, captions_per_image)
            old = target.with_name(f".{target.name}.old.tmp-{os.getpid()}-{HOST}")
            os.rename(target, old)  # only our own files and the lock, checked above
            os.rename(tmp, target)
            shutil.rmtree(old)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    log.info("demo dataset -> %s", out_dir)
    return out_dir


def _write_splits(folder: Path, splits: dict[str, int], seed: int, feature_dim: int,
                  captions_per_image: int | Sequence[int] = 5) -> None:
    """Every split's ``_ims.npy``, ``_ids.txt``, ``_caps.txt``, then the manifest."""
    renderer = SceneRenderer(feature_dim, seed)
    names = []
    for index, (split, num_images) in enumerate(splits.items()):
        rng = np.random.default_rng([seed, 100 + index])
        counts = np.resize(np.asarray(captions_per_image, dtype=np.int64), num_images)
        if num_images and counts.min() < 1:
            raise ValueError(f"captions_per_image {captions_per_image}: at least 1 each")
        features, captions = generate_split(num_images, renderer, rng, counts=counts)
        ids = index * 1_000_000 + np.arange(num_images)
        if len(np.unique(counts)) > 1:  # one id per caption: the runs are the counts
            ids = np.repeat(ids, counts)
        check_free_space(folder, features.nbytes + 100 * len(captions), "the demo dataset")
        with no_space_as_user_error(folder, features.nbytes, "the demo dataset"):
            np.save(folder / f"{split}_ims.npy", features)
            (folder / f"{split}_ids.txt").write_text("".join(f"{i}\n" for i in ids.tolist()))
            (folder / f"{split}_caps.txt").write_text("".join(c + "\n" for c in captions))
        names += [f"{split}_ims.npy", f"{split}_ids.txt", f"{split}_caps.txt"]
        log.info("%s: %d images %s, %d captions", split, num_images,
                 tuple(features.shape[1:]), len(captions))
    layout = ({} if np.array_equal(captions_per_image, 5)
              else {"captions_per_image": np.asarray(captions_per_image).tolist()})
    (folder / MANIFEST).write_text(json.dumps(
        {"format": "aoq-demo-data", "seed": seed, "feature_dim": feature_dim,
         "splits": splits, **layout, "files": names}, indent=1) + "\n")


def check_only_demo_files(out_dir: Path) -> None:
    """Refuse ``out_dir`` if it holds anything but a previous demo-data output."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file, not a folder; choose another --out")
    entries = {p.name for p in out_dir.iterdir()} - {LOCK_NAME, TEXT_CACHE_FOLDER}
    listed = set()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        listed = {MANIFEST, *map(str, json.loads((out_dir / MANIFEST).read_text())["files"])}
    foreign = sorted(entries - listed)
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise UserError(
            f"{out_dir} holds files demo-data did not write ({', '.join(foreign[:5])}{more}); "
            "refusing to write the demo dataset over them: choose another --out (DATA_PATH), "
            f"or delete {out_dir} (`make clean-demo` for data/demo) to generate it afresh")
