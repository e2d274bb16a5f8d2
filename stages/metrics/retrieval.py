"""Recall@K, median and mean rank for image-text retrieval, any number of captions per image.

Which image owns each caption is the split's :class:`~stages.core.layout.CaptionLayout`
(5 per image for Flickr30K and COCO as released, one for web data, 5 to 7 for COCO keeping
all its captions). Image -> text: an image's rank is the best rank among its own captions.
Text -> image: a caption's rank is that of its own image. Ranks are 0-based counts of
candidates scored strictly higher than the positive; R@K = 100 * mean(rank < K),
medr = floor(median) + 1, meanr = mean + 1 (the reference repos' definitions).

A positive whose similarity is not finite (NaN or inf, from a model or features gone bad)
is never a match: it ranks last, behind every candidate that is not its own (an image
whose own captions are all non-finite; a caption whose score with its own image is). A
non-finite negative beats a positive only when it compares strictly higher (NaN never).

Similarities are computed block by block of images, so evaluating 5K images x 25K captions
never holds the whole matrix; several models' embeddings are scored as an ensemble by
averaging their similarity matrices.
"""

from collections.abc import Sequence

import numpy as np
import torch

from stages.core.layout import CaptionLayout

RECALL_KS = (1, 5, 10)


def _as_list(embs) -> list[torch.Tensor]:
    if isinstance(embs, (torch.Tensor, np.ndarray)):
        embs = [embs]
    return [torch.as_tensor(e, dtype=torch.float32) for e in embs]


def _checked(imgs: list[torch.Tensor], caps: list[torch.Tensor],
             layout: CaptionLayout | None) -> CaptionLayout:
    """``layout`` (None: 5 captions per image, the layout of files that store none), checked
    against the ensemble's image and caption embeddings."""
    if len(imgs) != len(caps):
        raise ValueError(f"{len(imgs)} image embedding sets but {len(caps)} caption sets")
    num_images = imgs[0].shape[0]
    if layout is None:
        layout = CaptionLayout.uniform(num_images)
    for im, cap in zip(imgs, caps, strict=True):
        if im.shape[0] != layout.num_images or cap.shape[0] != layout.num_captions:
            raise ValueError(f"expected {layout.num_captions} captions for "
                             f"{layout.num_images} images ({layout!r}), got {cap.shape[0]} "
                             f"captions for {im.shape[0]} images")
    return layout


def retrieval_ranks(img_embs: torch.Tensor | Sequence[torch.Tensor],
                    cap_embs: torch.Tensor | Sequence[torch.Tensor],
                    layout: CaptionLayout | None = None,
                    block_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of the positives, both directions.

    ``img_embs``: (N, E) or a list of them (one per ensemble member); ``cap_embs``: (C, E)
    likewise, caption c belonging to image ``layout.owner[c]`` (``layout`` None: 5 per
    image, c // 5). The ensemble's similarity is the mean of the members' inner products.
    Returns (i2t ranks (N,), t2i ranks (C,)), int64.
    """
    imgs, caps = _as_list(img_embs), _as_list(cap_embs)
    layout = _checked(imgs, caps, layout)
    num_images, num_caps = layout.num_images, layout.num_captions
    owner, counts = torch.tensor(layout.owner), torch.tensor(layout.counts)  # (C,), (N,)
    # Each caption's score with its own image: (C,)
    t2i_pos = sum((im[owner] * cap).sum(1) for im, cap in zip(imgs, caps, strict=True))
    t2i_pos = t2i_pos / len(imgs)
    t2i_ranks = torch.zeros(num_caps, dtype=torch.long)
    i2t_ranks = torch.empty(num_images, dtype=torch.long)
    for start in range(0, num_images, block_size):
        stop = min(start + block_size, num_images)
        sims = sum(im[start:stop] @ cap.t() for im, cap in zip(imgs, caps, strict=True))
        sims = sims / len(imgs)  # (b, C)
        c0, c1 = layout.caption_range(start, stop)
        rows, cols = owner[c0:c1] - start, torch.arange(c0, c1)  # the block's own pairs
        own = sims[rows, cols]  # (c1 - c0,)
        best_pos = torch.full((stop - start,), -torch.inf).scatter_reduce_(
            0, rows, own.masked_fill(~own.isfinite(), -torch.inf), "amax")  # (b,)
        # Own pairs never count against a query, whatever the rounding of t2i_pos: -inf is
        # strictly higher than nothing.
        sims[rows, cols] = -torch.inf
        i2t_ranks[start:stop] = (sims > best_pos[:, None]).sum(dim=1)
        t2i_ranks += (sims > t2i_pos[None, :]).sum(dim=0)  # images beating the own one
        no_match = ~best_pos.isfinite()
        i2t_ranks[start:stop][no_match] = num_caps - counts[start:stop][no_match]
    t2i_ranks[~t2i_pos.isfinite()] = num_images - 1
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


def fold_ranks(img_embs, cap_embs, layout: CaptionLayout, folds: int = 1,
               block_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of every query, each within its fold: i2t (N,) and t2i (C,), in the
    split's order. Folds are equal consecutive blocks of images, each with its own captions
    (COCO's 5-fold 1K: each fold 1000 images); ``img_embs``/``cap_embs``/``layout`` as
    :func:`retrieval_ranks`."""
    imgs, caps = _as_list(img_embs), _as_list(cap_embs)
    layout = _checked(imgs, caps, layout)
    size = _fold_size(layout.num_images, folds)
    i2t, t2i = [], []
    for i0 in range(0, layout.num_images, size):
        c0, c1 = layout.caption_range(i0, i0 + size)
        a, b = retrieval_ranks([im[i0:i0 + size] for im in imgs], [c[c0:c1] for c in caps],
                               layout.images(i0, i0 + size), block_size)
        i2t.append(a)
        t2i.append(b)
    return np.concatenate(i2t), np.concatenate(t2i)


def _fold_size(num_images: int, folds: int) -> int:
    if folds < 1 or num_images % folds:
        raise ValueError(f"{num_images} images cannot be split into {folds} equal folds")
    return num_images // folds


def evaluate_ranks(i2t: np.ndarray, t2i: np.ndarray, layout: CaptionLayout,
                   folds: int = 1) -> dict[str, float]:
    """Metrics of :func:`fold_ranks`' ranks (i2t (N,), t2i (C,) of a split of ``layout``),
    as the mean over the folds; rsum recomputed from the averaged recalls (some reference
    code sums per-fold rsums wrongly)."""
    if len(i2t) != layout.num_images or len(t2i) != layout.num_captions:
        raise ValueError(f"{len(i2t)} i2t and {len(t2i)} t2i ranks for {layout!r}")
    size = _fold_size(layout.num_images, folds)
    per_fold = []
    for i0 in range(0, layout.num_images, size):
        c0, c1 = layout.caption_range(i0, i0 + size)
        per_fold.append(recall_metrics(i2t[i0:i0 + size], t2i[c0:c1]))
    mean = {k: float(np.mean([m[k] for m in per_fold])) for k in per_fold[0]}
    mean["rsum"] = rsum(mean)
    return mean


def evaluate_embeddings(img_embs, cap_embs, layout: CaptionLayout | None = None,
                        folds: int = 1, block_size: int = 1024) -> dict[str, float]:
    """Metrics of a split, whole (``folds=1``) or as the mean over equal folds.

    ``img_embs`` (N, E) and ``cap_embs`` (C, E), caption c belonging to image
    ``layout.owner[c]`` (``layout`` None: 5 per image, c // 5), torch tensors or numpy
    arrays, or lists of them (an ensemble; see :func:`retrieval_ranks`). Returns ``r1``,
    ``r5``, ``r10`` (percent), ``medr``, ``meanr``, each suffixed ``_i2t`` and ``_t2i``,
    and ``rsum``.

    For COCO's 5-fold 1K protocol each fold is 1000 images and their captions; all metrics
    are averaged over folds and rsum is recomputed from the averaged recalls.
    """
    imgs, caps = _as_list(img_embs), _as_list(cap_embs)
    layout = _checked(imgs, caps, layout)
    return evaluate_ranks(*fold_ranks(imgs, caps, layout, folds, block_size), layout, folds)
