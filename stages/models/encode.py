"""Encode a split with a model, unshuffled: unique images (N, E) and captions (C, E)."""

from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from stages.core.errors import UserError
from stages.core.precision import autocast
from stages.core.progress import Progress
from stages.data.dataset import (
    CaptionDataset,
    ImageDataset,
    Split,
    collate_captions,
    collate_images,
)
from stages.data.tokenizers import CaptionTokenizer


def check_finite(images: torch.Tensor, image_ids: torch.Tensor, split: Split) -> None:
    """Refuse a batch of image features (B, R, D) | (B, D) holding NaN or inf.

    ``image_ids`` (B,) are the images' indices in ``split``. A NaN feature gives a NaN
    similarity, which the ranking treats as larger than any other: the image would rank
    first for every caption and silently inflate the recalls.
    """
    finite = torch.isfinite(images.reshape(images.shape[0], -1)).all(dim=1)
    if bool(finite.all()):
        return
    bad = image_ids[~finite]
    raise UserError(f"split {split.name!r}: {split.features.path} has NaN or inf features "
                    f"for {len(bad)} of a batch of {len(images)} images (first: image "
                    f"{int(bad.min())}, 0-based row); regenerate the features (rerun the "
                    "features stage), or remove those images and their captions")


@torch.no_grad()
def encode_split(model, split: Split, tokenizer: CaptionTokenizer, device: torch.device,
                 batch_size: int = 256, workers: int = 0, desc: str = "encode",
                 image_range: tuple[int, int] | None = None,
                 precision: str = "fp32") -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of every image and every caption of ``split``, in order.

    Returns (images (N, E) float32, captions (C, E) float32), in the split's order (its
    ``layout`` says which image owns which caption). Images are encoded once each (not
    once per caption as the reference code does). Image features that are not finite are a
    :class:`UserError` naming the split, the file and the first bad image.
    ``image_range`` ``(start, stop)``: only those images and their captions (a shard;
    ``split.layout.caption_range(start, stop)``).
    ``precision``: the encoders' (``fp32``, ``bf16``, ``fp16``, :mod:`stages.core.precision`);
    the embeddings are returned float32 whatever it is.
    """
    was_training = model.training
    model.eval()
    pin = device.type == "cuda"
    image_set, caption_set = ImageDataset(split), CaptionDataset(split, tokenizer)
    if image_range is not None:
        start, stop = image_range
        image_set = Subset(image_set, range(start, stop))
        caption_set = Subset(caption_set, range(*split.layout.caption_range(start, stop)))
    images = DataLoader(image_set, batch_size=batch_size, collate_fn=collate_images,
                        num_workers=workers, pin_memory=pin)
    captions = DataLoader(caption_set, batch_size=batch_size,
                          collate_fn=partial(collate_captions, pad=tokenizer.pad_id),
                          num_workers=workers, pin_memory=pin)
    img_out, cap_out = [], []
    with Progress(len(images) + len(captions), desc, unit="batch") as bar:
        for batch in images:
            check_finite(batch["images"], batch["image_ids"], split)
            with autocast(device, precision):
                emb = model.encode_images(batch["images"].to(device),
                                          batch["regions"].to(device))
            img_out.append(emb.float().cpu())
            bar.update()
        for batch in captions:
            with autocast(device, precision):
                emb = model.encode_captions(batch["tokens"].to(device), batch["lengths"])
            cap_out.append(emb.float().cpu())
            bar.update()
    model.train(was_training)
    return torch.cat(img_out).numpy(), torch.cat(cap_out).numpy()
