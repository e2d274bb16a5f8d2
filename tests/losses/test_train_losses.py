"""Every added loss trains through the real engine (stages.pipeline.train.train) on the tiny
dataset, with the memory bank on, so the rectangular reference set is exercised end to end."""

import json
import math

import pytest
import torch

from stages.config.sections import load_config
from stages.io.checkpoint import load_checkpoint
from stages.losses import build_loss
from stages.pipeline.train import train

CASES = [("triplet_random", []), ("triplet_semihard", []), ("triplet_topk", ["loss.k=3"]),
         ("contrastive", []), ("infonce", []), ("focal_triplet", []),
         ("focal_triplet_mlp", []), ("focal_infonce", ["loss.learnable_temperature=true"])]


@pytest.mark.parametrize("name, options", CASES)
def test_trains_through_the_engine(tiny_config, tmp_path, name, options):
    config = load_config(base=tiny_config, overrides=[f"loss.name={name}", *options,
                                                      "memory.size=16", "train.epochs=1",
                                                      "train.batch_size=32"])
    train(config, tmp_path / "run")
    records = [json.loads(line)
               for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    assert all(math.isfinite(records[0][k])
               for k in ("loss_i2t", "loss_t2i", "train_loss", "rsum"))
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    fresh = build_loss(name, config.loss.values).state_dict()
    assert last["loss_state"].keys() == fresh.keys()
    for key, value in fresh.items():
        if value.is_floating_point():  # the loss's own parameters were trained
            assert not torch.equal(last["loss_state"][key], value), key
        else:  # the random negatives' draw count, for an exact resume
            assert last["loss_state"][key].item() == last["step"] > 0
