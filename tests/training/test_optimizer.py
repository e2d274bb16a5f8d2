"""The optimiser: Adam or AdamW over the model's groups and the loss's parameters."""

import pytest
import torch
from torch import nn

from stages.config.sections import load_config
from stages.core.errors import UserError
from stages.training.loop import build_optimizer


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def param_groups(self):
        return [{"params": [self.w], "lr_scale": 0.5}]


@pytest.mark.parametrize("kind, shrink", [("adam", 1.0), ("adamw", 1 - 0.1 * 0.5 * 0.01)])
def test_adamw_decays_weights_decoupled_from_the_gradient(kind, shrink):
    model = _Model()
    optimizer = build_optimizer(model, nn.Module(), lr=0.1, optimizer=kind,
                                weight_decay=0.01 if kind == "adamw" else 0.0)
    assert type(optimizer).__name__ == {"adam": "Adam", "adamw": "AdamW"}[kind]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    model.w.grad = torch.zeros(3)  # no gradient: only the decoupled decay moves the weights
    optimizer.step()
    assert torch.allclose(model.w.detach(), torch.full((3,), shrink))


def test_the_optimizer_setting_is_checked():
    assert load_config(overrides=["train.optimizer=adamw"]).train.optimizer == "adamw"
    with pytest.raises(UserError, match="optimizer"):
        load_config(overrides=["train.optimizer=sgd"])
    with pytest.raises(UserError, match="weight_decay"):
        load_config(overrides=["train.weight_decay=-1"])
