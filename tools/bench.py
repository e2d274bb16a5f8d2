"""Speed figures for docs/speed.md: every figure is compared with a baseline timed in the same run.

* vse_inf step: a VSE-infinity step at batch 128 on 36 x 2048 regions against the same
  model's bare forward + backward, and its AOQ step (3 x the rows) against 3 x that step;
* train step: one VSE++ step (encode both sides, max-violation loss, backward, clip, Adam)
  at batch 128 on demo data, against a bare GRU + Linear forward/backward of the same
  sizes (the floor any implementation pays);
* eval: recall ranks of 5,000 images x 25,000 captions (d=1024) with the blocked
  implementation, against the reference repos' per-anchor argsort loop timed on a sample
  of anchors and extrapolated;
* offcandi at Flickr30K scale (29,000 images x 145,000 captions, d=1024, K=300/60, clustered
  L2-normalised embeddings): the whole stage (in a subprocess, for its peak RSS) against a
  bare ``faiss.IndexFlatIP`` search of the same queries, against AOQ's per-anchor
  multiply-sum-topk loop on a sample of anchors (extrapolated), and the IVF option's time
  and recall@K against exact search at two nprobe values;
* features, BUTD TSV -> HDF5: a generated TSV of 36 x 2048 rows at two sizes, converted in a
  subprocess (throughput in MB/s of decoded features, peak RSS: it must not grow with the
  rows), against a bare read + base64-decode loop over the same file;
* features, CNN: ResNet-152 (random weights) images/s on the CPU at batch 32, against
  torchvision's own forward of the whole classifier;
* raw-image towers (tools/bench_cnn.py): vse_cnn fine-tuning steps against torchvision's
  own training step of the same backbone (``cnn_finetune``), and the step's memory
  (``cnn_memory``);
* vsrn_step: a VSRN train step (``Trainer.step``: caption loss included, clip, Adam) at
  batch 128 on 36 x 2048 regions, against the same model's bare forward + backward on the
  same batch (no optimiser), and the AOQ step (anchors plus two groups of offline
  negatives, the aoq loss) against 3x the base step.
* text tower (vse_transformer on a MiniLM-shaped BERT: 6 layers, hidden 384, random
  weights): an epoch with the whole encoder frozen, cached (the first epoch fills the
  cache, the next ones hit it) against the same epoch uncached; and the text encoder's
  captions/s in our training step and in our inference against the bare ``transformers``
  forward (+ backward) of the same model on the same token batch.
* mining_scale (only when named: ``--only mining_scale``): the offcandi stage with the
  IVF-PQ index on generated clustered embeddings, 1M images x 5M captions at d=256 by
  default (``--scale-images``, ``--scale-dim``), generated block by block into a temporary
  HDF5 file under ``--scratch``: index training, adding and search time and recall@K both
  ways, the stage's peak RSS, and exact search extrapolated from the recall check;
* text cache: the frozen text tower's output file at COCO's size (566,435 captions x 384
  floats): written, read in a fresh process (time, peak RSS) against ``np.load`` of the same
  values as a bare ``.npy``, and 1,000 rows added (the whole file rewritten).

Usage: python tools/bench.py --out bench/results.json
"""

import base64
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import faiss
import h5py
import numpy as np
import torch

from stages.config.sections import load_config
from stages.data.dataset import collate_pairs, open_split
from stages.data.synthetic import write_synthetic_dataset
from stages.data.tokenizers import PretrainedTokenizer
from stages.data.vocab import Vocab
from stages.losses import build_loss
from stages.metrics.retrieval import retrieval_ranks
from stages.mining.knn import set_threads
from stages.mining.sampler import OfflineNegativeSampler, collate_offline
from stages.models import build_model
from stages.training.batches import epoch_batches
from stages.training.loop import Trainer
from stages.training.tasks import OfflineTask, PairTask

sys.path.insert(0, str(Path(__file__).parent))
import bench_cnn as bench_cnn_towers  # noqa: E402  (tools/bench_cnn.py: vse_cnn sections)


def _median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _legacy_vse_step(model, optimizer, batch) -> None:
    """The train step as it was before the training engine (frozen here as the baseline):
    both encoders, the square max-violation hinge inline, backward, clip, Adam."""
    img = model.encode_images(batch["images"], batch["regions"])
    cap = model.encode_captions(batch["tokens"], batch["lengths"])
    sims = img @ cap.t()
    diagonal = sims.diag()
    eye = torch.eye(sims.shape[0], dtype=torch.bool)
    cost_c = (0.2 + sims - diagonal[:, None]).clamp(min=0).masked_fill(eye, 0)
    cost_i = (0.2 + sims - diagonal[None, :]).clamp(min=0).masked_fill(eye, 0)
    loss = cost_c.max(dim=1).values.sum() + cost_i.max(dim=0).values.sum()
    if not torch.isfinite(loss):
        raise RuntimeError("non-finite loss")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    optimizer.step()
    loss.item()


def bench_train_step(embed_size: int, repeats: int) -> dict:
    """The training engine's step (Trainer.step: task, model output, named loss terms,
    memory-bank hook) against the pre-engine step, timed alternately on one batch."""
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_dataset(tmp, {"train": 600}, seed=0)
        split = open_split(Path(tmp), "train")
        vocab = Vocab.build(split.captions, threshold=4)
        task = PairTask(split, vocab)
        batch = collate_pairs(task.dataset.__getitems__(list(range(0, 3000, 3000 // 128))[:128]))
        config = load_config(overrides=[f"model.embed_size={embed_size}"])
        models = []
        for _ in range(2):
            torch.manual_seed(0)
            models.append(build_model("vsepp", config.model.values, img_dim=256,
                                      vocab_size=len(vocab)))
        trainer = Trainer(models[0], build_loss("vse_max"), task, config.train, config.memory,
                          torch.device("cpu"), Path(tmp), validate=None, checkpoint_info={})
        legacy_optimizer = torch.optim.Adam(models[1].parameters(), lr=2e-4)
        # Wall and CPU time of each, alternating; CPU time (this process's) is the steadier
        # measure on a shared machine.
        times = {"engine": ([], []), "legacy": ([], [])}
        for i in range(repeats + 2):
            for name, fn in (("engine", lambda: trainer.step(batch)),
                             ("legacy", lambda: _legacy_vse_step(models[1], legacy_optimizer,
                                                                 batch))):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                if i >= 2:  # warm-up
                    times[name][0].append(time.perf_counter() - t0)
                    times[name][1].append(time.process_time() - c0)

    gru = torch.nn.GRU(300, embed_size, batch_first=True)
    fc = torch.nn.Linear(256, embed_size)
    words = torch.randn(128, int(batch["lengths"].max()), 300)

    def bare():
        _, hidden = gru(words)
        (hidden[-1].sum() + fc(batch["images"].mean(1)).sum()).backward()

    (ours, ours_cpu), (legacy, legacy_cpu) = (
        (statistics.median(wall), statistics.median(cpu)) for wall, cpu in times.values())
    floor = _median_seconds(bare, repeats)
    return {"embed_size": embed_size, "batch": 128, "repeats": repeats,
            "step_ms": round(ours * 1e3, 1),
            "pre_engine_step_ms": round(legacy * 1e3, 1),
            "ratio_to_pre_engine": round(ours / legacy, 3),
            "step_cpu_ms": round(ours_cpu * 1e3, 1),
            "pre_engine_step_cpu_ms": round(legacy_cpu * 1e3, 1),
            "cpu_ratio_to_pre_engine": round(ours_cpu / legacy_cpu, 3),
            "bare_gru_ms": round(floor * 1e3, 1), "ratio_to_bare": round(ours / floor, 2)}


def _region_dataset(folder: Path, num_images: int, regions: int, dim: int) -> Path:
    """A precomp split ``train`` of random (N, regions, dim) features with the synthetic
    generator's captions (only the shapes matter for timing)."""
    write_synthetic_dataset(folder / "captions", {"train": num_images}, seed=0)
    (folder / "regions").mkdir()
    (folder / "regions" / "train_caps.txt").write_bytes(
        (folder / "captions" / "train_caps.txt").read_bytes())
    rng = np.random.default_rng(0)
    np.save(folder / "regions" / "train_ims.npy",
            rng.standard_normal((num_images, regions, dim), dtype=np.float32))
    return folder / "regions"


def bench_vse_inf_step(repeats: int, num_images: int = 200) -> dict:
    """VSE-infinity (embed 1024, 300-d words, 20% region dropping) at batch 128 on 36 x 2048
    regions: the engine's step (Trainer.step: forward, vse_max, backward, clip, Adam)
    against the same model's bare forward + backward on the same batch (the floor), and the
    AOQ step (anchors + two groups of offline negatives, 3 x 128 rows, the aoq loss) against
    3 x the base step. The three are timed alternately on fixed batches (no data loading)."""
    with tempfile.TemporaryDirectory() as tmp:
        split = open_split(_region_dataset(Path(tmp), num_images, 36, 2048), "train")
        vocab = Vocab.build(split.captions, threshold=4)
        pairs = PairTask(split, vocab)
        captions = list(range(0, 5 * num_images, 5))[:128]  # 128 distinct images
        rng = np.random.default_rng(0)
        sampler = OfflineNegativeSampler(rng.integers(0, 5 * num_images, (num_images, 300)),
                                         rng.integers(0, num_images, (5 * num_images, 60)),
                                         300, seed=0)
        offline = OfflineTask(split, vocab, sampler)
        batches = {"base": collate_pairs(pairs.dataset.__getitems__(captions)),
                   "aoq": collate_offline(offline.dataset.__getitems__(captions))}
    config = load_config(overrides=["model.name=vse_inf"])
    trainers = {}
    for name, task, loss in (("base", pairs, "vse_max"), ("aoq", offline, "aoq")):
        torch.manual_seed(0)
        model = build_model("vse_inf", config.model.values, img_dim=2048,
                            vocab_size=len(vocab))
        trainers[name] = Trainer(model, build_loss(loss), task, config.train, config.memory,
                                 torch.device("cpu"), Path("."), validate=None,
                                 checkpoint_info={})
        model.train()
    floor_model = trainers["base"].model

    def floor():
        output = floor_model(batches["base"])
        (output.img_emb.sum() + output.cap_emb.sum()).backward()
        floor_model.zero_grad(set_to_none=True)

    runs = {"floor": floor, "base": lambda: trainers["base"].step(batches["base"]),
            "aoq": lambda: trainers["aoq"].step(batches["aoq"])}
    times = {name: ([], []) for name in runs}
    for i in range(repeats + 1):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if i >= 1:  # warm-up
                times[name][0].append(time.perf_counter() - t0)
                times[name][1].append(time.process_time() - c0)
    wall = {name: statistics.median(w) for name, (w, _) in times.items()}
    cpu = {name: statistics.median(c) for name, (_, c) in times.items()}
    return {"batch": 128, "regions": "36 x 2048", "embed_size": 1024, "repeats": repeats,
            **{f"{name}_ms": round(wall[name] * 1e3, 1) for name in runs},
            **{f"{name}_cpu_ms": round(cpu[name] * 1e3, 1) for name in runs},
            "base_ratio_to_floor": round(wall["base"] / wall["floor"], 3),
            "base_cpu_ratio_to_floor": round(cpu["base"] / cpu["floor"], 3),
            "aoq_ratio_to_3x_base": round(wall["aoq"] / (3 * wall["base"]), 3),
            "aoq_cpu_ratio_to_3x_base": round(cpu["aoq"] / (3 * cpu["base"]), 3)}


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


def clustered_embeddings(num_images: int, dim: int, seed: int = 0,
                         clusters: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image (N, d) and caption (5N, d) embeddings around shared clusters."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)
    img = centers[rng.integers(clusters, size=num_images)]
    img += 0.8 * rng.standard_normal(img.shape, dtype=np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    cap = np.repeat(img, 5, axis=0)
    cap += 0.05 * rng.standard_normal(cap.shape, dtype=np.float32)
    cap /= np.linalg.norm(cap, axis=1, keepdims=True)
    return img, cap


# Peak RSS is read from VmHWM, the high-water mark of this process's own memory: ru_maxrss
# would also count the parent's pages, inherited through fork and kept across exec.
STAGE_SCRIPT = """
import sys, time
from stages.config.sections import OffcandiConfig
from stages.pipeline.offcandi import offcandi
t0 = time.perf_counter()
offcandi(sys.argv[1], sys.argv[2], OffcandiConfig(index=sys.argv[3], nprobe=int(sys.argv[4])))
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(time.perf_counter() - t0, hwm.split()[1])
"""


def _run_stage(embeddings: Path, out_dir: Path, index: str,
               nprobe: int = 32) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of the offcandi stage in a fresh process."""
    result = subprocess.run([sys.executable, "-c", STAGE_SCRIPT, str(embeddings), str(out_dir),
                             index, str(nprobe)], capture_output=True, text=True, check=True)
    seconds, rss_kib = result.stdout.split()
    return float(seconds), int(rss_kib) / 1024


def _reference_mining(img: np.ndarray, cap: np.ndarray, anchors: int, k_i2t: int,
                      k_t2i: int) -> float:
    """Seconds for AOQ's mining scripts (tools/get{i2t,t2i}offcandi.py), extrapolated from
    ``anchors`` anchors per direction: per anchor, an elementwise product with every
    item summed (``(q * items).sum(1)``), its positives masked, ``torch.topk``; on the CPU
    in float32 (the scripts use a GPU in float16)."""
    images, captions = torch.from_numpy(img), torch.from_numpy(cap)
    t0 = time.perf_counter()
    for i in range(anchors):
        sims = (images[i:i + 1] * captions).sum(1)
        sims[5 * i:5 * i + 5] = -9999
        torch.topk(sims, k_i2t)
    i2t = (time.perf_counter() - t0) / anchors
    t0 = time.perf_counter()
    for c in range(anchors):
        sims = (images * captions[c:c + 1]).sum(1)
        sims[c // 5] = -9999
        torch.topk(sims, k_t2i)
    t2i = (time.perf_counter() - t0) / anchors
    return i2t * len(img) + t2i * len(cap)


def bench_offcandi(num_images: int, dim: int, sample: int) -> dict:
    img, cap = clustered_embeddings(num_images, dim)
    threads = set_threads()
    with tempfile.TemporaryDirectory() as tmp:
        embeddings = Path(tmp) / "embeddings_train.h5"
        with h5py.File(embeddings, "w") as f:
            f.create_dataset("images", data=img)
            f.create_dataset("captions", data=cap)
            f.attrs.update({"format": "aoq-embeddings", "checkpoint": "bench", "weights": "b",
                            "dataset": "bench", "split": "train", "num_images": num_images,
                            "train_captions_sha256": ""})
        stage_s, stage_rss = _run_stage(embeddings, Path(tmp) / "flat", "flat")
        t0 = time.perf_counter()  # the floor: index build + search, nothing else
        for items, queries, k in ((cap, img, 305), (img, cap, 61)):
            index = faiss.IndexFlatIP(dim)
            index.add(items)
            index.search(queries, k)
        bare_s = time.perf_counter() - t0
        ivf = []
        for nprobe in IVF_NPROBES:
            out = Path(tmp) / f"ivf{nprobe}"
            ivf_s, ivf_rss = _run_stage(embeddings, out, "ivf", nprobe)
            recall = {}
            for direction in ("i2t", "t2i"):
                with h5py.File(out / f"{direction}.h5", "r") as f:
                    recall[direction] = round(float(f.attrs["recall_at_k"]), 4)
            ivf.append({"nprobe": nprobe, "stage_s": round(ivf_s, 1),
                        "ratio_to_exact_stage": round(ivf_s / stage_s, 3),
                        "peak_rss_mib": round(ivf_rss), "recall_at_k": recall})
    reference_s = _reference_mining(img, cap, sample, 300, 60)
    embeddings_mib = (img.nbytes + cap.nbytes) / 2**20
    return {"images": num_images, "captions": 5 * num_images, "dim": dim, "k_i2t": 300,
            "k_t2i": 60, "threads": threads, "stage_s": round(stage_s, 1),
            "bare_faiss_s": round(bare_s, 1), "ratio_to_bare": round(stage_s / bare_s, 3),
            "reference_loop_s_extrapolated": round(reference_s),
            "reference_sample_anchors": sample,
            "speedup_vs_reference": round(reference_s / stage_s, 1),
            "stage_peak_rss_mib": round(stage_rss), "embeddings_mib": round(embeddings_mib),
            "ivf": ivf}


IVF_NPROBES = (32, 128)


def write_clustered_embeddings(path: Path, num_images: int, dim: int, seed: int = 0,
                               clusters: int = 500, block: int = 65536) -> None:
    """An embeddings file of :func:`clustered_embeddings`' distribution (the same centres,
    spread and caption noise), generated and written ``block`` images (and their captions)
    at a time, so memory stays at one block whatever the size."""
    centers = np.random.default_rng(seed).standard_normal((clusters, dim), dtype=np.float32)
    with h5py.File(path, "w") as f:
        images = f.create_dataset("images", (num_images, dim), dtype=np.float32)
        captions = f.create_dataset("captions", (5 * num_images, dim), dtype=np.float32)
        for b, start in enumerate(range(0, num_images, block)):
            rng = np.random.default_rng([seed, b])
            stop = min(num_images, start + block)
            img = centers[rng.integers(clusters, size=stop - start)]
            img += 0.8 * rng.standard_normal(img.shape, dtype=np.float32)
            img /= np.linalg.norm(img, axis=1, keepdims=True)
            cap = np.repeat(img, 5, axis=0)
            cap += 0.05 * rng.standard_normal(cap.shape, dtype=np.float32)
            cap /= np.linalg.norm(cap, axis=1, keepdims=True)
            images[start:stop] = img
            captions[5 * start:5 * stop] = cap
        f.attrs.update({"format": "aoq-embeddings", "checkpoint": "bench", "weights": "b",
                        "dataset": "bench", "split": "train", "num_images": num_images,
                        "train_captions_sha256": ""})


# The offcandi stage with OffcandiConfig(**argv[3]) in a fresh process: seconds, VmHWM KiB.
SCALE_STAGE_SCRIPT = """
import json, sys, time
from stages.config.sections import OffcandiConfig
from stages.pipeline.offcandi import offcandi
t0 = time.perf_counter()
offcandi(sys.argv[1], sys.argv[2], OffcandiConfig(**json.loads(sys.argv[3])))
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(time.perf_counter() - t0, hwm.split()[1])
"""


def ivfpq_index_bytes(n: int, dim: int, nlist: int, pq_m: int, pq_bits: int,
                      opq: bool = False) -> int:
    """An IVF-PQ index's memory on paper: codes n * pq_m * pq_bits / 8 (pq_m bytes at 8
    bits), ids 8n, coarse centroids 4 * nlist * d, PQ centroids 4 * 2**pq_bits * d (OPQ:
    its d x d matrix)."""
    return (n * ((pq_m * pq_bits + 7) // 8) + 8 * n + 4 * nlist * dim + 4 * 2 ** pq_bits * dim
            + (4 * dim * dim if opq else 0))


def bench_mining_scale(num_images: int, dim: int, scratch: Path | None = None,
                       options: dict | None = None) -> dict:
    """The offcandi stage with the IVF-PQ index on generated clustered embeddings (N images,
    5N captions, d), K = 300/60: index training, adding and search time per direction and
    recall@K against exact search on 1,000 queries (the stage's own figures, from the
    candidate files), the stage's peak RSS (a fresh process), and the embeddings' size.
    The baseline, exact search, is extrapolated from the recall check's exact top K of its
    1,000 queries (one pass over the items each): an upper bound, as the full search would
    batch 4,096 queries per pass. The files go to a temporary folder under ``scratch``
    (removed after), refused when its disk has not room for them."""
    options = {"index": "ivfpq", **(options or {})}
    embeddings_bytes = 6 * num_images * dim * 4
    candidate_bytes = num_images * (300 * 8 + 4) + 5 * num_images * (60 * 8 + 4)
    need = embeddings_bytes + candidate_bytes + (1 << 30)
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(scratch or tempfile.gettempdir()).free
    if free < need:
        raise click.ClickException(f"mining_scale needs about {need / 1e9:.1f} GB in "
                                   f"{scratch or tempfile.gettempdir()}, {free / 1e9:.1f} GB "
                                   "free: pass --scratch on a larger disk, or fewer "
                                   "--scale-images")
    threads = set_threads()
    with tempfile.TemporaryDirectory(dir=scratch, prefix="mining-scale-") as tmp:
        embeddings = Path(tmp) / "embeddings_train.h5"
        t0 = time.perf_counter()
        write_clustered_embeddings(embeddings, num_images, dim)
        generate_s = time.perf_counter() - t0
        result = subprocess.run([sys.executable, "-c", SCALE_STAGE_SCRIPT, str(embeddings),
                                 str(Path(tmp) / "out"), json.dumps(options)],
                                capture_output=True, text=True)
        if result.returncode:
            raise click.ClickException(f"the offcandi stage failed:\n{result.stderr[-3000:]}")
        stage_s, rss_kib = result.stdout.split()
        directions = {}
        for direction, items, queries in (("i2t", 5 * num_images, num_images),
                                          ("t2i", num_images, 5 * num_images)):
            with h5py.File(Path(tmp) / "out" / f"{direction}.h5", "r") as f:
                a = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
            sample = min(options.get("recall_sample", 1000), queries)
            directions[direction] = {
                "items": items, "queries": queries, "k": a["k"], "factory": a["factory"],
                **{key: a[key] for key in ("nlist", "nprobe", "pq_m", "pq_bits", "train_size")},
                "train_s": a["index_train_seconds"], "add_s": a["index_add_seconds"],
                "search_and_write_s": a["search_seconds"],
                "recall_check_s": a["recall_seconds"],
                "recall_at_k": round(a["recall_at_k"], 4), "recall_sample": sample,
                "index_mib_on_paper": round(ivfpq_index_bytes(
                    items, dim, a["nlist"], a["pq_m"], a["pq_bits"], bool(a["opq"])) / 2**20),
                "exact_search_s_extrapolated": round(a["recall_seconds"] * queries / sample)}
    return {"images": num_images, "captions": 5 * num_images, "dim": dim, "threads": threads,
            "options": options, "embeddings_gb": round(embeddings_bytes / 1e9, 2),
            "generate_s": round(generate_s, 1), "stage_s": round(float(stage_s), 1),
            "stage_peak_rss_mib": round(int(rss_kib) / 1024),
            "images_mib": round(num_images * dim * 4 / 2**20), **directions}

TSV_SCRIPT = """
import sys, time
from stages.features.butd_tsv import tsv_to_hdf5
t0 = time.perf_counter()
tsv_to_hdf5([sys.argv[1]], sys.argv[2], ["train"])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(time.perf_counter() - t0, hwm.split()[1])
"""


def _write_bench_tsv(path: Path, rows: int, boxes: int = 36, dim: int = 2048) -> None:
    """``rows`` BUTD rows (8 distinct random payloads, cycled: decoding costs the same)."""
    rng = np.random.default_rng(0)
    payloads = [(base64.b64encode(rng.random((boxes, 4), dtype=np.float32).tobytes()),
                 base64.b64encode(rng.standard_normal((boxes, dim), dtype=np.float32)
                                  .tobytes())) for _ in range(8)]
    with open(path, "wb") as f:
        for i in range(rows):
            b, feats = payloads[i % len(payloads)]
            f.write(b"%d\t640\t480\t%d\t%s\t%s\n" % (i, boxes, b, feats))


def _bare_decode_seconds(path: Path) -> float:
    """The floor: read each line, split it, base64-decode both arrays, nothing stored."""
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        for line in f:
            fields = line.rstrip(b"\n").split(b"\t")
            np.frombuffer(base64.b64decode(fields[4]), dtype=np.float32)
            np.frombuffer(base64.b64decode(fields[5]), dtype=np.float32)
    return time.perf_counter() - t0


def bench_tsv(sizes: tuple[int, ...]) -> list[dict]:
    results = []
    for rows in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            tsv, folder = Path(tmp) / "feats.tsv", Path(tmp) / "ds"
            _write_bench_tsv(tsv, rows)
            folder.mkdir()
            ids = np.random.default_rng(1).permutation(rows)  # rows land in random order
            (folder / "train_ids.txt").write_text("".join(f"{i}\n" for i in ids))
            bare_s = _bare_decode_seconds(tsv)
            result = subprocess.run([sys.executable, "-c", TSV_SCRIPT, str(tsv), str(folder)],
                                    capture_output=True, text=True, check=True)
            seconds, hwm_kib = map(float, result.stdout.split())
            decoded_mb = rows * 36 * 2048 * 4 / 1e6
            results.append({"rows": rows, "tsv_mb": round(tsv.stat().st_size / 1e6),
                            "stage_s": round(seconds, 1), "bare_decode_s": round(bare_s, 1),
                            "ratio_to_bare": round(seconds / bare_s, 2),
                            "decoded_mb_per_s": round(decoded_mb / seconds),
                            "peak_rss_mib": round(hwm_kib / 1024)})
    return results


def bench_cnn(batch: int = 32, repeats: int = 2) -> dict:
    import torchvision

    from stages.models.cnn import FeatureExtractor

    torch.manual_seed(0)
    ours = FeatureExtractor("resnet152", "random")
    full = torchvision.models.resnet152(weights=None).eval()
    x = torch.randn(batch, 3, 224, 224)
    ours_s = _median_seconds(lambda: ours(x), repeats, warmup=1)
    with torch.no_grad():
        full_s = _median_seconds(lambda: full(x), repeats, warmup=1)
    return {"arch": "resnet152", "batch": batch, "threads": torch.get_num_threads(),
            "images_per_s": round(batch / ours_s, 2),
            "torchvision_forward_images_per_s": round(batch / full_s, 2),
            "ratio_to_torchvision": round(ours_s / full_s, 3)}


def bench_vsrn_step(repeats: int, warmup: int = 1) -> dict:
    """VSRN's train step at batch 128 on 36 x 2048 regions (random features, synthetic
    captions) against its bare forward + backward, and the AOQ step against 3x it; each
    timed ``repeats`` times after ``warmup`` untimed calls."""
    batch_size, images = 128, 200
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_dataset(tmp, {"train": images}, seed=0)
        rng = np.random.default_rng(0)
        np.save(Path(tmp) / "train_ims.npy",
                rng.standard_normal((images, 36, 2048), dtype=np.float32))
        split = open_split(Path(tmp), "train")
        vocab = Vocab.build(split.captions, threshold=4)
        config = load_config(["configs/model/vsrn.yaml"])
        torch.manual_seed(0)
        model = build_model("vsrn", config.model.values, img_dim=2048, vocab_size=len(vocab))
        rows = list(range(0, 5 * images, 5 * images // batch_size))[:batch_size]
        pairs = PairTask(split, vocab)
        batch = collate_pairs(pairs.dataset.__getitems__(rows))
        sampler = OfflineNegativeSampler(rng.integers(0, 5 * images, (images, 300)),
                                         rng.integers(0, images, (5 * images, 60)), 300, 0)
        offline = OfflineTask(split, vocab, sampler)
        offline_batch = collate_offline(offline.dataset.__getitems__(rows))
        base = Trainer(model, build_loss("vse_max"), pairs, config.train, config.memory,
                       torch.device("cpu"), Path(tmp), validate=None, checkpoint_info={})
        aoq = Trainer(model, build_loss("aoq"), offline, config.train, config.memory,
                      torch.device("cpu"), Path(tmp), validate=None, checkpoint_info={})
        loss_fn = build_loss("vse_max")

        def bare():
            output = model(batch)
            terms = loss_fn(output.img_emb, output.cap_emb, batch["image_ids"])
            sum([*terms.values(), *output.aux_losses.values()]).backward()

        def timed(fn) -> tuple[float, float]:
            """Median wall and CPU (this process's) seconds after the warm-up calls."""
            for _ in range(warmup):
                fn()
            wall, cpu = [], []
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            return statistics.median(wall), statistics.median(cpu)

        model.train()
        floor, floor_cpu = timed(bare)
        ours, ours_cpu = timed(lambda: base.step(batch))
        ours_aoq, aoq_cpu = timed(lambda: aoq.step(offline_batch))
    return {"batch": batch_size, "regions": 36, "img_dim": 2048, "embed_size": 2048,
            "step_s": round(ours, 2), "bare_forward_backward_s": round(floor, 2),
            "ratio_to_bare": round(ours / floor, 3), "aoq_step_s": round(ours_aoq, 2),
            "aoq_ratio_to_3x_step": round(ours_aoq / (3 * ours), 3),
            "step_cpu_s": round(ours_cpu, 2), "bare_cpu_s": round(floor_cpu, 2),
            "cpu_ratio_to_bare": round(ours_cpu / floor_cpu, 3),
            "aoq_step_cpu_s": round(aoq_cpu, 2),
            "aoq_cpu_ratio_to_3x_step": round(aoq_cpu / (3 * ours_cpu), 3)}


def _write_minilm_shaped_bert(folder: Path, captions: list[str]) -> None:
    """A random-weight BERT of all-MiniLM-L6-v2's shape, with a WordPiece vocabulary of the
    captions' words, saved as a Hugging Face folder."""
    import re

    from transformers import AutoTokenizer, BertConfig, BertModel

    words = sorted({w for c in captions for w in re.findall(r"\w+|[^\w\s]", c.lower())})
    (folder / "vocab.txt").write_text("\n".join(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words) + 5, hidden_size=384, num_hidden_layers=6,
                         num_attention_heads=12, intermediate_size=1536)).save_pretrained(folder)


def _alternate(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each function, timed alternately after 2 warm-ups."""
    times = {name: ([], []) for name in fns}
    for i in range(repeats + 2):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if i >= 2:
                times[name][0].append(time.perf_counter() - t0)
                times[name][1].append(time.process_time() - c0)
    return {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in times.items()}


def bench_text_tower(repeats: int, images: int = 300, batch: int = 128) -> dict:
    """vse_transformer epochs frozen with and without the encoder cache; the text encoder's
    captions/s in our step and inference against the bare transformers forward."""
    from transformers import BertModel

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_dataset(tmp / "data", {"train": images}, seed=0)
        split = open_split(tmp / "data", "train")
        (tmp / "bert").mkdir()
        _write_minilm_shaped_bert(tmp / "bert", split.captions)
        tokenizer = PretrainedTokenizer.from_pretrained(str(tmp / "bert"), 64)
        task = PairTask(split, tokenizer)

        def trainer_for(freeze: int) -> Trainer:
            config = load_config(overrides=[
                "model.name=vse_transformer", f"model.text_model={tmp / 'bert'}",
                f"model.text_freeze_layers={freeze}", "model.embed_size=1024",
                f"train.batch_size={batch}"])
            torch.manual_seed(0)
            model = build_model("vse_transformer", config.model.values, img_dim=256,
                                **tokenizer.model_args())
            model.load_pretrained()
            model.train()
            return Trainer(model, build_loss("vse_max"), task, config.train, config.memory,
                           torch.device("cpu"), tmp, validate=None, checkpoint_info={})

        def epoch(trainer: Trainer, number: int) -> float:
            t0 = time.perf_counter()
            for ids in epoch_batches(len(task.dataset), batch, 0, number):
                trainer.step(task.collate(task.dataset.__getitems__(ids)))
            return time.perf_counter() - t0

        cached, uncached = trainer_for(-1), trainer_for(-1)
        uncached.model.text_encoder.cache = None
        uncached_s = epoch(uncached, 0)
        cold_s = epoch(cached, 0)
        warm_s = statistics.median(epoch(cached, e) for e in range(1, 3))

        # The encoder trained (nothing frozen): our step and inference against bare HF.
        trainer = trainer_for(0)
        ids = list(range(0, len(task.dataset), len(task.dataset) // batch))[:batch]
        pairs = task.collate(task.dataset.__getitems__(ids))
        tokens, lengths = pairs["tokens"], pairs["lengths"]
        mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
        bare = BertModel.from_pretrained(tmp / "bert", add_pooling_layer=False).train()
        bare_opt = torch.optim.Adam(bare.parameters(), lr=2e-5)

        def bare_step():
            bare_opt.zero_grad(set_to_none=True)
            bare(input_ids=tokens, attention_mask=mask).last_hidden_state.mean(1).sum().backward()
            bare_opt.step()

        steps = _alternate({"ours": lambda: trainer.step(pairs), "bare": bare_step}, repeats)
        model = trainer.model.eval()
        bare.eval()

        @torch.no_grad()
        def ours_forward():
            model.encode_captions(tokens, lengths)

        @torch.no_grad()
        def bare_forward():
            bare(input_ids=tokens, attention_mask=mask)

        infer = _alternate({"ours": ours_forward, "bare": bare_forward}, repeats)
    per_s = {k: {name: round(batch / wall, 1) for name, (wall, _) in v.items()}
             for k, v in (("step", steps), ("inference", infer))}
    return {
        "model": "BERT 6 layers, hidden 384 (MiniLM-L6's shape), random weights",
        "captions": len(task.dataset), "batch": batch, "mean_tokens": round(
            float(np.mean([len(task.dataset.tokens[c]) for c in range(len(task.dataset))])), 1),
        "threads": torch.get_num_threads(),
        "frozen_epoch_uncached_s": round(uncached_s, 2),
        "frozen_epoch_cached_first_s": round(cold_s, 2),
        "frozen_epoch_cached_s": round(warm_s, 2),
        "cached_to_uncached_epoch": round(warm_s / uncached_s, 3),
        "train_step_captions_per_s": per_s["step"]["ours"],
        "bare_fwd_bwd_adam_captions_per_s": per_s["step"]["bare"],
        "train_step_ratio_to_bare": round(steps["ours"][0] / steps["bare"][0], 3),
        "train_step_cpu_ratio_to_bare": round(steps["ours"][1] / steps["bare"][1], 3),
        "inference_captions_per_s": per_s["inference"]["ours"],
        "bare_forward_captions_per_s": per_s["inference"]["bare"],
        "inference_ratio_to_bare": round(infer["ours"][0] / infer["bare"][0], 3),
    }


# Reading a cache file in a fresh process (peak RSS): the stage's attach, and the floor
# (np.load of the same values as a bare .npy).
# ru_maxrss would be the bench's own peak: Linux keeps it across exec; VmHWM is the new
# process's.
_PEAK_RSS = """
def peak_rss_mib():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024
"""
_CACHE_READ = _PEAK_RSS + """
import sys, time
import torch
from stages.models.encoder_cache import CacheFile, EncoderCache
folder, key, width = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
cache = EncoderCache()
cache.attach(CacheFile(folder, key, {}, width, torch.float32), torch.device("cpu"))
print(len(cache), time.perf_counter() - t0,
      peak_rss_mib())
"""
_NPY_READ = _PEAK_RSS + """
import sys, time
import numpy as np
t0 = time.perf_counter()
values = np.load(sys.argv[1])
print(len(values), time.perf_counter() - t0,
      peak_rss_mib())
"""


def _read_in_subprocess(code: str, *args) -> tuple[int, float, float]:
    """(rows, seconds, peak RSS MiB) of ``code`` run in a fresh python."""
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[0]), float(out[1]), float(out[2])


def bench_text_cache(rows: int = 566_435, width: int = 384, added: int = 1000) -> dict:
    """The frozen text tower's cache file at COCO's size (566,435 training captions, mean
    14 tokens) x MiniLM's 384 floats: writing it, reading it in a fresh process (the first
    forward of a stage) against np.load of the same values, and adding rows to it."""
    from stages.models.encoder_cache import CacheFile

    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 21, rows)
    ids = rng.integers(1000, 30000, int(lengths.sum()), dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    ids[starts] = 101  # every caption starts with [CLS], as BERT's
    keys = [k.tobytes() for k in np.split(ids, starts[1:])]
    values = torch.from_numpy(rng.standard_normal((rows + added, width), dtype=np.float32))
    key = "0" * 64
    with tempfile.TemporaryDirectory() as tmp:
        file = CacheFile(tmp, key, {}, width, torch.float32)
        t0 = time.perf_counter()
        file.merge(keys, values[:rows])
        write_s = time.perf_counter() - t0
        np.save(Path(tmp) / "values.npy", values[:rows].numpy())
        read = _read_in_subprocess(_CACHE_READ, tmp, key, width)
        floor = _read_in_subprocess(_NPY_READ, Path(tmp) / "values.npy")
        more = [np.array([102, r, 102], dtype=np.int64).tobytes() for r in range(added)]
        t0 = time.perf_counter()
        file.merge(keys + more, values)  # a process that held every row and computed more
        add_s = time.perf_counter() - t0
        size = file.path.stat().st_size
    return {"rows": rows, "width": width, "mean_tokens": round(float(lengths.mean()), 1),
            "file_mb": round(size / 1e6, 1),
            "values_mb": round(rows * width * 4 / 1e6, 1),
            "write_s": round(write_s, 3), "read_rows": read[0], "read_s": round(read[1], 3),
            "read_peak_rss_mib": round(read[2]), "npy_load_s": round(floor[1], 3),
            "npy_load_peak_rss_mib": round(floor[2]),
            "read_ratio_to_npy_load": round(read[1] / floor[1], 2),
            f"add_{added}_rows_s": round(add_s, 3)}


@click.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("bench/results.json"), show_default=True)
@click.option("--repeats", default=10, show_default=True)
@click.option("--offcandi-images", default=29000, show_default=True,
              help="Images in the offcandi benchmark (29000: Flickr30K's training set).")
@click.option("--tsv-rows", default="1000,4000", show_default=True,
              help="Sizes (rows) of the generated BUTD TSV files.")
@click.option("--only", default="", help="Comma-separated sections to run (default: all "
              "but mining_scale): train_step, vse_inf_step, vsrn_step, eval_5k, offcandi, "
              "features_tsv, features_cnn, text_tower, text_cache, cnn_finetune, cnn_memory, "
              "mining_scale.")
@click.option("--scale-images", default=1_000_000, show_default=True,
              help="mining_scale: images (x 5 captions) of the generated embeddings.")
@click.option("--scale-dim", default=256, show_default=True,
              help="mining_scale: their dimension.")
@click.option("--scratch", type=click.Path(file_okay=False, path_type=Path),
              help="mining_scale: where its temporary folder goes (the embeddings, 24 bytes "
                   "x images x dim, and candidates, 2.9 KB an image; default: the system's "
                   "temporary folder).")
def main(out: Path, repeats: int, offcandi_images: int, tsv_rows: str, only: str,
         scale_images: int, scale_dim: int, scratch: Path | None) -> None:
    sections = {
        "train_step": lambda: [bench_train_step(256, repeats), bench_train_step(1024, repeats)],
        "vse_inf_step": lambda: bench_vse_inf_step(min(repeats, 5)),
        "eval_5k": lambda: bench_eval(5000, 1024, sample=200),
        "offcandi": lambda: bench_offcandi(offcandi_images, 1024, sample=100),
        "features_tsv": lambda: bench_tsv(tuple(int(r) for r in tsv_rows.split(","))),
        "features_cnn": bench_cnn,
        "vsrn_step": lambda: bench_vsrn_step(min(repeats, 3)),
        "text_tower": lambda: bench_text_tower(repeats),
        "text_cache": bench_text_cache,
        "cnn_finetune": lambda: [bench_cnn_towers.bench_finetune(arch)
                                 for arch in ("mobilenet_v3_large", "resnet152")],
        "cnn_memory": bench_cnn_towers.bench_memory,
        "mining_scale": lambda: bench_mining_scale(scale_images, scale_dim, scratch),
    }
    # mining_scale (tens of minutes, ~11 GB of disk at its default size) runs when named
    chosen = ([s for s in only.split(",") if s]
              or [s for s in sections if s != "mining_scale"])
    unknown = sorted(set(chosen) - set(sections))
    if unknown:
        raise click.BadParameter(f"unknown sections {unknown}; known: {', '.join(sections)}",
                                 param_hint="--only")
    results = {"machine": {"cpu_threads": torch.get_num_threads(),
                           "python": platform.python_version(), "torch": torch.__version__,
                           "faiss": faiss.__version__}}
    results.update({name: sections[name]() for name in chosen})
    results["bench_peak_rss_mib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
