"""Mixed precision (``train.precision``, ``eval.precision``): the forward pass under
autocast, the losses and embeddings in float32, fp16 with loss scaling."""

import json

import pytest
import torch
from torch import nn

from stages.config.sections import load_config
from stages.core.errors import UserError
from stages.core.precision import autocast
from stages.data.dataset import open_split
from stages.data.tokenizers import tokenizer_from_json
from stages.io.checkpoint import load_checkpoint
from stages.models.encode import encode_split
from stages.models.restore import model_from_checkpoint
from stages.pipeline.train import train
from stages.training.repeated_updates import gradients_finite

# A tiny model's mean training loss per epoch against float32's moves by well under this
# fraction (measured on this tiny run: bf16 0.02%; fp16 0.9%, as its first steps are skipped
# while the loss scale falls from 2**16 to one whose gradients do not overflow).
LOSS_TOLERANCE = 0.03


def epoch_losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train_loss"] for line in lines]


@pytest.fixture
def runs(tiny_config, tmp_path):
    """Train the tiny model once per precision asked, from the same seed."""
    made = {}

    def run(precision: str):
        if precision not in made:
            config = load_config(base=tiny_config, overrides=[f"train.precision={precision}"])
            made[precision] = train(config, tmp_path / precision).parent
        return made[precision]
    return run


def test_autocast_runs_matrix_products_in_the_precision_asked():
    a, b = torch.randn(4, 3), torch.randn(3, 2)
    cpu = torch.device("cpu")
    with autocast(cpu, "fp32"):
        assert (a @ b).dtype == torch.float32
    with autocast(cpu, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(cpu, "fp16"):
        assert (a @ b).dtype == torch.float16


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_float32(runs, precision):
    full, mixed = epoch_losses(runs("fp32")), epoch_losses(runs(precision))
    assert len(mixed) == len(full) == 2
    # Not float32's run (the setting acts), but within the tolerance of it.
    assert mixed != full
    for m, f in zip(mixed, full, strict=True):
        assert abs(m - f) <= LOSS_TOLERANCE * abs(f)


def test_fp16_keeps_its_loss_scale_in_the_checkpoint(runs):
    state = load_checkpoint(runs("fp16") / "last.pt")
    assert state["config"]["train"]["precision"] == "fp16"
    assert state["scaler"]["scale"] > 0
    assert "scaler" not in load_checkpoint(runs("fp32") / "last.pt")


def test_encoding_in_bf16_returns_float32_close_to_float32(runs, tiny_root):
    state = load_checkpoint(runs("fp32") / "checkpoint.pt")
    model, tokenizer = model_from_checkpoint(state)
    split = open_split(tiny_root / "tiny", "dev")
    cpu = torch.device("cpu")
    img32, cap32 = encode_split(model, split, tokenizer, cpu)
    img16, cap16 = encode_split(model, split, tokenizer, cpu, precision="bf16")
    assert img16.dtype == cap16.dtype == img32.dtype
    assert not (img16 == img32).all()
    # Unit vectors: each bf16 embedding points where its float32 one does.
    assert (img16 * img32).sum(1).min() > 0.99
    assert (cap16 * cap32).sum(1).min() > 0.99
    assert tokenizer_from_json(state["vocab"]).pad_id == tokenizer.pad_id


def test_an_overflowed_fp16_step_is_found():
    layer = nn.Linear(2, 2)
    optimizer = torch.optim.Adam(layer.parameters())
    layer(torch.ones(1, 2)).sum().backward()
    assert gradients_finite(optimizer)
    layer.weight.grad[0, 0] = float("inf")
    assert not gradients_finite(optimizer)


def test_the_precision_settings_are_checked():
    assert load_config(overrides=["eval.precision=bf16"]).eval.precision == "bf16"
    with pytest.raises(UserError, match="precision"):
        load_config(overrides=["train.precision=fp8"])
