"""Raw-image towers (vse_cnn) for tools/bench.py: fine-tuning speed and step memory.

* ``cnn_finetune``: images/s of one vse_cnn training step (``Trainer.step``: backbone +
  GRU, VSE++ loss, backward, clip, Adam) fine-tuning the whole backbone at 224 px, against
  torchvision's own classifier of the same backbone doing forward, cross-entropy, backward
  and Adam on the same images; timed alternately, wall and CPU time.
* ``cnn_memory``: peak RSS of one such step at two batch sizes, each in a fresh process
  (``python tools/bench_cnn.py ARCH BATCH``, one thread): the process's peak, the memory
  the step adds over the model and optimiser (after a warm-up step: Adam's moments exist),
  and the activations autograd saves for backward; from the two batches, the memory per
  image (:func:`memory_fit`: the larger slope, of the peak or of the saved activations)
  and the batch that fits a GPU.
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from stages.config.sections import MemoryConfig, TrainConfig
from stages.losses import build_loss
from stages.models import build_model
from stages.training.loop import Trainer
from stages.training.tasks import PairTask

SIZE = 224
GIB = 1 << 30


class _BatchTask(PairTask):
    """PairTask's ``forward`` and ``loss_inputs`` over ready batches: no dataset, so no
    ``collate`` or ``set_epoch`` (``Trainer.step`` uses neither)."""

    def __init__(self):
        self.dataset = None


def _batch(size: int) -> dict:
    torch.manual_seed(0)
    return {"images": torch.randn(size, 3, SIZE, SIZE), "regions": torch.ones(size).long(),
            "tokens": torch.randint(4, 1000, (size, 12)), "lengths": torch.full((size,), 12),
            "image_ids": torch.arange(size), "caption_ids": 5 * torch.arange(size)}


def _trainer(arch: str, tmp: str) -> Trainer:
    torch.manual_seed(0)
    model = build_model("vse_cnn", {"backbone": arch, "finetune": True, "weights": "random"},
                        img_dim=3, vocab_size=1000)
    return Trainer(model, build_loss("vse_max"), _BatchTask(), TrainConfig(), MemoryConfig(),
                   torch.device("cpu"), Path(tmp), validate=None, checkpoint_info={})


def bench_finetune(arch: str, batch_size: int = 8, repeats: int = 3) -> dict:
    import torchvision

    batch = _batch(batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(arch, tmp)
        trainer.model.train()
        torch.manual_seed(0)
        reference = torchvision.models.get_model(arch, weights=None).train()
        optimizer = torch.optim.Adam(reference.parameters(), lr=2e-4)
        labels = torch.randint(0, 1000, (batch_size,))

        def torchvision_step():
            loss = torch.nn.functional.cross_entropy(reference(batch["images"]), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        times = {"ours": ([], []), "torchvision": ([], [])}
        for i in range(repeats + 1):
            for name, fn in (("ours", lambda: trainer.step(batch)),
                             ("torchvision", torchvision_step)):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                if i >= 1:  # warm-up: Adam's states, allocator
                    times[name][0].append(time.perf_counter() - t0)
                    times[name][1].append(time.process_time() - c0)
    (ours, ours_cpu), (ref, ref_cpu) = ((statistics.median(w), statistics.median(c))
                                        for w, c in times.values())
    return {"arch": arch, "batch": batch_size, "image_size": SIZE,
            "threads": torch.get_num_threads(),
            "images_per_s": round(batch_size / ours, 2),
            "torchvision_images_per_s": round(batch_size / ref, 2),
            "ratio_to_torchvision": round(ours / ref, 3),
            "cpu_ratio_to_torchvision": round(ours_cpu / ref_cpu, 3)}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def probe_memory(arch: str, batch_size: int) -> dict:
    """In this process: RSS around one training step after a warm-up step (Adam's states
    exist), and the bytes autograd saves for backward in the forward pass (activations: the
    weights it saves too are left out)."""
    batch = _batch(batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(arch, tmp)
        trainer.model.train()
        trainer.step(batch)
        params = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
        weights = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
        saved: dict[int, int] = {}

        def pack(tensor):  # keeps the tensor itself: no memory of its own
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:  # activations only: weights are fixed
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
        before = _rss_kib("VmRSS")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer.step(batch)
        peak = _rss_kib("VmHWM")
    return {"arch": arch, "batch": batch_size, "params_mib": round(params / 2**20, 1),
            "rss_before_step_mib": round(before / 1024), "peak_rss_mib": round(peak / 1024),
            "step_mib": round((peak - before) / 1024),
            "saved_for_backward_mib": round(sum(saved.values()) / 2**20)}


def bench_memory(plan=(("mobilenet_v3_large", (8, 32)), ("resnet152", (8, 32)),
                       ("vgg19", (8, 32)), ("efficientnet_lite0", (8, 32))),
                 gpu_gib: float = 80.0) -> list[dict]:
    """Per backbone: the step's memory at two batches (fresh processes, one thread), and
    from it (:func:`memory_fit`) the memory per image and the batch that fits ``gpu_gib``."""
    results = []
    for arch, batches in plan:
        probes = []
        for batch in batches:
            probe = subprocess.run([sys.executable, __file__, arch, str(batch)],
                                   capture_output=True, text=True)
            if probe.returncode != 0:
                raise RuntimeError(f"memory probe {arch} batch {batch} failed:\n{probe.stderr}")
            probes.append(json.loads(probe.stdout.splitlines()[-1]))
        results.append(memory_fit(arch, probes, gpu_gib))
    return results


def memory_fit(arch: str, probes: list[dict], gpu_gib: float = 80.0) -> dict:
    """The batch that fits ``gpu_gib`` from two probes (:func:`probe_memory`, the smaller
    batch first): (90% of it - 4 x the parameters: weights, gradients, Adam's two moments)
    / the memory per image.

    The memory per image is the larger of two slopes between the batches: of the process's
    peak RSS, and of the tensors autograd saves for backward (the slope leaves out what
    does not grow with the batch). The peak's slope alone can fall short: at a small batch
    the peak may come from another phase of the step (VGG19's Adam update over its 565 MiB
    of weights), so the two peaks measure different moments; the saved tensors must all be
    held at once for backward.
    """
    small, large = probes[0], probes[-1]
    images = large["batch"] - small["batch"]
    peak = (large["peak_rss_mib"] - small["peak_rss_mib"]) / images
    saved = (large["saved_for_backward_mib"] - small["saved_for_backward_mib"]) / images
    per_image = max(peak, saved)
    if per_image <= 0:
        raise RuntimeError(f"{arch}: no memory per image measured ({probes})")
    fixed = 4 * large["params_mib"]
    fits = int((0.9 * gpu_gib * 1024 - fixed) / per_image)
    return {"arch": arch, "probes": probes,
            "peak_mib_per_image": round(peak, 1),
            "saved_for_backward_mib_per_image": round(saved, 1),
            "mib_per_image": round(per_image, 1),
            "weights_grads_adam_mib": round(fixed),
            f"batch_fitting_{gpu_gib:g}gb": fits,
            f"offline_batch_fitting_{gpu_gib:g}gb": fits // 3}


if __name__ == "__main__":
    torch.set_num_threads(1)  # on a shared CPU, a thread pool waits more than it works
    print(json.dumps(probe_memory(sys.argv[1], int(sys.argv[2]))))
