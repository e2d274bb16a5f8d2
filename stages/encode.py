"""Encode a split with a model, unshuffled: unique images (N, E) and captions (5N, E)."""

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data.dataset import (
    CaptionDataset,
    ImageDataset,
    Split,
    collate_captions,
    collate_images,
)
from .data.vocab import Vocab
from .progress import Progress


@torch.no_grad()
def encode_split(model, split: Split, vocab: Vocab, device: torch.device,
                 batch_size: int = 256, workers: int = 0,
                 desc: str = "encode") -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of every image and every caption of ``split``, in order.

    Returns (images (N, E) float32, captions (5N, E) float32). Images are encoded once
    each (not once per caption as the reference code does).
    """
    was_training = model.training
    model.eval()
    pin = device.type == "cuda"
    images = DataLoader(ImageDataset(split), batch_size=batch_size, collate_fn=collate_images,
                        num_workers=workers, pin_memory=pin)
    captions = DataLoader(CaptionDataset(split, vocab), batch_size=batch_size,
                          collate_fn=collate_captions, num_workers=workers, pin_memory=pin)
    img_out, cap_out = [], []
    with Progress(len(images) + len(captions), desc, unit="batch") as bar:
        for batch in images:
            emb = model.encode_images(batch["images"].to(device), batch["regions"].to(device))
            img_out.append(emb.float().cpu())
            bar.update()
        for batch in captions:
            emb = model.encode_captions(batch["tokens"].to(device), batch["lengths"])
            cap_out.append(emb.float().cpu())
            bar.update()
    model.train(was_training)
    return torch.cat(img_out).numpy(), torch.cat(cap_out).numpy()
