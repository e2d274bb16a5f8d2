"""Shared fixtures: tiny generated datasets (no network, no GPU, nothing from ../shared)."""

import logging
import os

import numpy as np
import pytest
import torch

from stages.config.sections import load_config
from stages.core.log import remove_file_handlers
from stages.data.synthetic import write_synthetic_dataset
from stages.data.vocab import build_vocab_file

# Tests never download: a hub name missing from the cache fails at once (subprocesses too).
os.environ["HF_HUB_OFFLINE"] = "1"
# Tiny models gain nothing from a second thread, and `make test` runs one worker per core:
# one thread each, in this process and in the `aoq`/`make` subprocesses tests start (a thread
# pool per process on shared cores spends its time waiting for its other threads).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

TINY_SPLITS = {"train": 40, "dev": 10, "test": 10}
# A model small enough that a few epochs on the tiny dataset take a second or two.
TINY_OVERRIDES = ["model.embed_size=32", "model.word_dim=16", "train.batch_size=16",
                  "train.epochs=2", "data.workers=0", "train.device=cpu"]


@pytest.fixture(autouse=True)
def _close_run_logs():
    """Stages add a log file handler for their run folder; drop it after each test."""
    yield
    remove_file_handlers()
    logging.getLogger().setLevel(logging.INFO)


@pytest.fixture
def tiny_root(tmp_path):
    """A datasets root holding ``tiny/``: synthetic precomp data (40/10/10 images) + vocab."""
    write_synthetic_dataset(tmp_path / "tiny", TINY_SPLITS, seed=3, feature_dim=32)
    build_vocab_file(tmp_path / "tiny" / "train_caps.txt", tmp_path / "tiny" / "vocab.json",
                     threshold=1)
    return tmp_path


@pytest.fixture
def tiny_config(tiny_root):
    """The resolved config of a tiny training run on ``tiny_root/tiny``."""
    return load_config(overrides=[f"data.path={tiny_root}", "data.name=tiny",
                                  *TINY_OVERRIDES])


def write_precomp(folder, split, features: np.ndarray, captions: list[str]) -> None:
    """Write ``{split}_ims.npy`` and ``{split}_caps.txt`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{split}_ims.npy", features)
    (folder / f"{split}_caps.txt").write_text("".join(c + "\n" for c in captions))
