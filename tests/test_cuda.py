"""The CUDA paths, run where a GPU exists and skipped, with the reason, elsewhere (this
project's CPU-only CI among them): training on a GPU in bf16 and fp16 close to float32,
and FAISS on GPUs mining exactly the candidates it mines on the CPU."""

import faiss
import numpy as np
import pytest
import torch

from stages.config.sections import load_config
from stages.mining.mine import mine_arrays
from stages.pipeline.train import train
from tests.training.test_precision import LOSS_TOLERANCE, epoch_losses

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the GPU training path runs where one is")
needs_faiss_gpu = pytest.mark.skipif(
    not (hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0),
    reason="FAISS sees no GPU (faiss-cpu installed, or no device)")


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_training_in_mixed_precision_stays_close_to_float32(tiny_config, tmp_path,
                                                                 precision):
    losses = {}
    for name in ("fp32", precision):
        config = load_config(base=tiny_config,
                             overrides=[f"train.precision={name}", "train.device=cuda"])
        losses[name] = epoch_losses(train(config, tmp_path / name).parent)
    assert losses[precision] != losses["fp32"]
    for mixed, full in zip(losses[precision], losses["fp32"], strict=True):
        assert abs(mixed - full) <= LOSS_TOLERANCE * abs(full)


@needs_faiss_gpu
def test_faiss_on_gpus_mines_what_the_cpu_mines():
    """The flat index stays float32 on the GPUs: the same exact search, so the same
    candidates (up to ties) and scores."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(300, 32)).astype(np.float32)
    captions = (np.repeat(images, 5, axis=0)
                + 0.5 * rng.normal(size=(1500, 32))).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    captions /= np.linalg.norm(captions, axis=1, keepdims=True)
    cpu = mine_arrays(images, captions, 20, 6)
    gpu = mine_arrays(images, captions, 20, 6, gpu=True)
    for direction in ("i2t", "t2i"):
        np.testing.assert_allclose(gpu[direction][1], cpu[direction][1], atol=1e-4)
        same = (gpu[direction][0] == cpu[direction][0]).mean()
        assert same > 0.99, (direction, same)
