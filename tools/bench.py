"""Speed figures for README: every figure is a ratio to a baseline timed in the same run.

* train step: one VSE++ step (encode both sides, max-violation loss, backward, clip, Adam)
  at batch 128 on demo data, against a bare GRU + Linear forward/backward of the same
  sizes (the floor any implementation pays);
* eval: recall ranks of 5,000 images x 25,000 captions (d=1024) with the blocked
  implementation, against the reference repos' per-anchor argsort loop timed on a sample
  of anchors and extrapolated.

Usage: python tools/bench.py --out bench/results.json
"""

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from stages.config import LossConfig
from stages.data.dataset import PairDataset, collate_pairs, open_split
from stages.data.synthetic import write_synthetic_dataset
from stages.data.vocab import Vocab
from stages.losses import build_loss
from stages.metrics.retrieval import retrieval_ranks
from stages.models import build_model


def _median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_train_step(embed_size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_dataset(tmp, {"train": 600}, seed=0)
        split = open_split(Path(tmp), "train")
        vocab = Vocab.build(split.captions, threshold=4)
        pairs = PairDataset(split, vocab)
        batch = collate_pairs(pairs.__getitems__(list(range(0, 3000, 3000 // 128))[:128]))
    model = build_model("vsepp", img_dim=256, vocab_size=len(vocab), embed_size=embed_size)
    loss_fn = build_loss(LossConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)

    def step():
        img = model.encode_images(batch["images"], batch["regions"])
        cap = model.encode_captions(batch["tokens"], batch["lengths"])
        loss = loss_fn(img, cap, batch["image_ids"])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()

    gru = torch.nn.GRU(300, embed_size, batch_first=True)
    fc = torch.nn.Linear(256, embed_size)
    words = torch.randn(128, int(batch["lengths"].max()), 300)

    def bare():
        _, hidden = gru(words)
        (hidden[-1].sum() + fc(batch["images"].mean(1)).sum()).backward()

    ours, floor = _median_seconds(step, repeats), _median_seconds(bare, repeats)
    return {"embed_size": embed_size, "batch": 128, "step_ms": round(ours * 1e3, 1),
            "bare_gru_ms": round(floor * 1e3, 1), "ratio_to_bare": round(ours / floor, 2)}


def _reference_ranks(sims: np.ndarray, anchors: int) -> float:
    """Seconds for the reference's i2t + t2i loops over ``anchors`` images (and 5x captions)."""
    t0 = time.perf_counter()
    for i in range(anchors):
        order = np.argsort(sims[i])[::-1]
        min(np.where(order == c)[0][0] for c in range(5 * i, 5 * i + 5))
    cols = sims.T
    for c in range(5 * anchors):
        order = np.argsort(cols[c])[::-1]
        np.where(order == c // 5)[0][0]
    return time.perf_counter() - t0


def bench_eval(num_images: int, dim: int, sample: int) -> dict:
    rng = np.random.default_rng(0)
    img = rng.normal(size=(num_images, dim)).astype(np.float32)
    cap = np.repeat(img, 5, axis=0) + rng.normal(size=(5 * num_images, dim)).astype(np.float32)
    t0 = time.perf_counter()
    retrieval_ranks(img, cap)
    ours = time.perf_counter() - t0
    sims = img @ cap.T  # the reference holds the whole matrix; we time only its loops
    reference = _reference_ranks(sims, sample) * num_images / sample
    return {"images": num_images, "captions": 5 * num_images, "dim": dim,
            "blocked_s": round(ours, 2), "reference_loop_s_extrapolated": round(reference, 1),
            "reference_sample_anchors": sample, "speedup": round(reference / ours, 1)}


@click.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("bench/results.json"), show_default=True)
@click.option("--repeats", default=10, show_default=True)
def main(out: Path, repeats: int) -> None:
    results = {
        "machine": {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "train_step": [bench_train_step(256, repeats), bench_train_step(1024, repeats)],
        "eval_5k": bench_eval(5000, 1024, sample=200),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
