"""Recall@K, median and mean rank for image-text retrieval with 5 captions per image.

Image -> text: an image's rank is the best rank among its 5 captions. Text -> image: a
caption's rank is that of its own image. Ranks are 0-based counts of candidates scored
strictly higher than the positive; R@K = 100 * mean(rank < K), medr = floor(median) + 1,
meanr = mean + 1 (the reference repos' definitions).

Similarities are computed block by block of images, so evaluating 5K images x 25K captions
never holds the whole matrix; several models' embeddings are scored as an ensemble by
averaging their similarity matrices.
"""

from collections.abc import Sequence

import numpy as np
import torch

CAPTIONS_PER_IMAGE = 5
RECALL_KS = (1, 5, 10)


def _as_list(embs) -> list[torch.Tensor]:
    if isinstance(embs, (torch.Tensor, np.ndarray)):
        embs = [embs]
    return [torch.as_tensor(e, dtype=torch.float32) for e in embs]


def retrieval_ranks(img_embs: torch.Tensor | Sequence[torch.Tensor],
                    cap_embs: torch.Tensor | Sequence[torch.Tensor],
                    block_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of the positives, both directions.

    ``img_embs``: (N, E) or a list of them (one per ensemble member); ``cap_embs``: (5N, E)
    likewise, caption c belonging to image c // 5. The ensemble's similarity is the mean of
    the members' inner products. Returns (i2t ranks (N,), t2i ranks (5N,)), int64.
    """
    imgs, caps = _as_list(img_embs), _as_list(cap_embs)
    if len(imgs) != len(caps):
        raise ValueError(f"{len(imgs)} image embedding sets but {len(caps)} caption sets")
    num_images = imgs[0].shape[0]
    num_caps = caps[0].shape[0]
    if num_caps != CAPTIONS_PER_IMAGE * num_images:
        raise ValueError(f"expected {CAPTIONS_PER_IMAGE * num_images} captions for "
                         f"{num_images} images, got {num_caps}")
    owner = torch.arange(num_caps) // CAPTIONS_PER_IMAGE
    # Each caption's score with its own image: (5N,)
    t2i_pos = sum((im[owner] * cap).sum(1) for im, cap in zip(imgs, caps, strict=True))
    t2i_pos = t2i_pos / len(imgs)
    t2i_ranks = torch.zeros(num_caps, dtype=torch.long)
    i2t_ranks = torch.empty(num_images, dtype=torch.long)
    for start in range(0, num_images, block_size):
        stop = min(start + block_size, num_images)
        sims = sum(im[start:stop] @ cap.t() for im, cap in zip(imgs, caps, strict=True))
        sims = sims / len(imgs)  # (b, 5N)
        rows, own_images = torch.arange(stop - start), torch.arange(start, stop)
        by_image = sims.view(stop - start, num_images, CAPTIONS_PER_IMAGE)
        best_pos = by_image[rows, own_images].max(dim=1).values  # (b,)
        i2t_ranks[start:stop] = (sims > best_pos[:, None]).sum(dim=1)
        beaten = sims > t2i_pos[None, :]  # (b, 5N): image beats the caption's own image
        # A caption's own image never counts against it, whatever the rounding of t2i_pos.
        beaten.view(stop - start, num_images, CAPTIONS_PER_IMAGE)[rows, own_images] = False
        t2i_ranks += beaten.sum(dim=0)
    return i2t_ranks.numpy(), t2i_ranks.numpy()


def rank_metrics(ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10 (percent), medr, meanr of 0-based ranks."""
    ranks = np.asarray(ranks)
    out = {f"r{k}": float(100.0 * np.mean(ranks < k)) for k in RECALL_KS}
    out["medr"] = float(np.floor(np.median(ranks)) + 1)
    out["meanr"] = float(ranks.mean() + 1)
    return out


def recall_metrics(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray) -> dict[str, float]:
    """Both directions' metrics, keys suffixed ``_i2t`` / ``_t2i``, plus rsum."""
    out = {f"{k}_i2t": v for k, v in rank_metrics(i2t_ranks).items()}
    out.update({f"{k}_t2i": v for k, v in rank_metrics(t2i_ranks).items()})
    out["rsum"] = rsum(out)
    return out


def rsum(metrics: dict[str, float]) -> float:
    """Sum of R@1/5/10 in both directions."""
    return sum(metrics[f"r{k}_{d}"] for k in RECALL_KS for d in ("i2t", "t2i"))


def fold_ranks(img_embs, cap_embs, folds: int = 1, block_size: int = 1024
               ) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of every query, each within its fold: i2t (N,) and t2i (5N,), in the
    split's order. Folds are equal consecutive blocks of images and their captions (COCO's
    5-fold 1K: each fold 1000 images); ``img_embs``/``cap_embs`` as :func:`retrieval_ranks`."""
    imgs, caps = _as_list(img_embs), _as_list(cap_embs)
    num_images = imgs[0].shape[0]
    if folds < 1 or num_images % folds:
        raise ValueError(f"{num_images} images cannot be split into {folds} equal folds")
    size = num_images // folds
    i2t, t2i = [], []
    for f in range(folds):
        i0, c0 = f * size, f * size * CAPTIONS_PER_IMAGE
        a, b = retrieval_ranks([im[i0:i0 + size] for im in imgs],
                               [c[c0:c0 + size * CAPTIONS_PER_IMAGE] for c in caps],
                               block_size)
        i2t.append(a)
        t2i.append(b)
    return np.concatenate(i2t), np.concatenate(t2i)


def evaluate_ranks(i2t: np.ndarray, t2i: np.ndarray, folds: int = 1) -> dict[str, float]:
    """Metrics of :func:`fold_ranks`' ranks, as the mean over the folds; rsum recomputed
    from the averaged recalls (some reference code sums per-fold rsums wrongly)."""
    size, cap_size = len(i2t) // folds, len(t2i) // folds
    per_fold = [recall_metrics(i2t[f * size:(f + 1) * size],
                               t2i[f * cap_size:(f + 1) * cap_size]) for f in range(folds)]
    mean = {k: float(np.mean([m[k] for m in per_fold])) for k in per_fold[0]}
    mean["rsum"] = rsum(mean)
    return mean


def evaluate_embeddings(img_embs, cap_embs, folds: int = 1,
                        block_size: int = 1024) -> dict[str, float]:
    """Metrics of a split, whole (``folds=1``) or as the mean over equal folds.

    ``img_embs`` (N, E) and ``cap_embs`` (5N, E), caption c belonging to image c // 5, torch
    tensors or numpy arrays, or lists of them (an ensemble; see :func:`retrieval_ranks`).
    Returns ``r1``, ``r5``, ``r10`` (percent), ``medr``, ``meanr``, each suffixed ``_i2t``
    and ``_t2i``, and ``rsum``.

    For COCO's 5-fold 1K protocol each fold is 1000 images and their 5000 captions; all
    metrics are averaged over folds and rsum is recomputed from the averaged recalls.
    """
    return evaluate_ranks(*fold_ranks(img_embs, cap_embs, folds, block_size), folds)
