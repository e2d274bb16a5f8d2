"""vse_cnn: backbone cuts, freezing, learning-rate groups, weights, checkpoint round trip."""

import pytest
import torch
import torchvision

from stages.config.sections import MemoryConfig, TrainConfig
from stages.core.errors import UserError
from stages.data.dataset import open_split
from stages.data.images import open_images
from stages.data.vocab import Vocab
from stages.losses import build_loss
from stages.models import MODELS, build_model
from stages.models import backbones as backbones_module
from stages.models.backbones import Backbone
from stages.models.cnn import FeatureExtractor
from stages.models.restore import model_from_checkpoint
from stages.training.loop import Trainer, build_optimizer
from stages.training.tasks import PairTask
from tests.raw_images import write_image_dataset

SMALL = {"backbone": "resnet18", "weights": "random", "image_size": 32, "embed_size": 16,
         "word_dim": 8}


def cnn(vocab_size=30, **options):
    torch.manual_seed(0)
    return build_model("vse_cnn", {**SMALL, **options}, img_dim=3, vocab_size=vocab_size)


@pytest.fixture
def pixel_task(tmp_path):
    images, dataset = write_image_dataset(tmp_path)
    vocab = Vocab.load(dataset / "vocab.json")
    split = open_split(dataset, "train", open_images(dataset, "train", images, 32,
                                                     augment=True))
    return PairTask(split, vocab), vocab


def one_step(model, task, tmp_path, lr=1e-2):
    trainer = Trainer(model, build_loss("vse_max", {}), task, TrainConfig(lr=lr),
                      MemoryConfig(), torch.device("cpu"), tmp_path / "run",
                      validate=lambda m: {}, checkpoint_info={})
    model.train()
    trainer.step(task.collate([task.dataset[c] for c in range(0, 80, 5)]))
    return trainer


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_large", "vgg19"])
def test_backbone_gives_the_features_stage_features(arch, tmp_path):
    torch.manual_seed(1)
    path = tmp_path / f"{arch}.pth"
    torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), path)
    backbone = Backbone(arch)
    backbone.load_weights(str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x), FeatureExtractor(arch, str(path))(x))
    assert backbone(x).shape == (2, backbone.feature_dim)


def test_frozen_backbone_stays_as_it_was(pixel_task, tmp_path):
    task, vocab = pixel_task
    model = cnn(len(vocab))
    before = snapshot(model)
    one_step(model, task, tmp_path)
    assert model.training and not any(m.training for m in model.backbone.modules())
    for name, param in model.backbone.named_parameters():
        assert param.grad is None, name
    after = snapshot(model)
    for name in before:
        same = torch.equal(before[name], after[name])
        if name.startswith("backbone."):  # weights and batch-norm statistics
            assert same, name
        elif "num_batches" not in name:
            assert not same, name  # the projection and the text side trained


def test_partly_frozen_backbone_trains_its_later_stages(pixel_task, tmp_path):
    task, vocab = pixel_task
    model = cnn(len(vocab), finetune=True, freeze_stages=2)  # stem and layer1 frozen
    before = snapshot(model)
    one_step(model, task, tmp_path)
    after = snapshot(model)
    frozen = ("backbone.stages.0.", "backbone.stages.1.")
    for name in before:
        if name.startswith(frozen):
            assert torch.equal(before[name], after[name]), name
        elif name.endswith(("weight", "running_mean", "running_var")):
            assert not torch.equal(before[name], after[name]), name
    stages = model.backbone.stages
    assert not any(m.training for s in stages[:2] for m in s.modules())
    assert all(m.training for s in stages[2:] for m in s.modules())
    assert all(p.grad is None for p in stages[:2].parameters())


def test_learning_rate_groups(tmp_path):
    model = cnn(finetune=True, freeze_stages=1, backbone_lr_scale=0.1)
    groups = model.param_groups()
    assert [g["lr_scale"] for g in groups] == [1.0, 0.1]
    backbone = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert {id(p) for p in groups[1]["params"]} == backbone
    assert not backbone & {id(p) for p in groups[0]["params"]}
    everything = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == everything
    optimizer = build_optimizer(model, build_loss("vse_max", {}), 2e-4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([2e-4, 2e-5])
    frozen = cnn()
    assert len(frozen.param_groups()) == 1
    assert not {id(p) for p in frozen.backbone.parameters()} & {
        id(p) for p in frozen.param_groups()[0]["params"]}


@pytest.mark.parametrize("options, message", [
    ({"freeze_stages": 2}, "needs model.finetune=true"),
    ({"backbone_lr_scale": 0.5}, "needs model.finetune=true"),
    ({"finetune": True, "freeze_stages": 5}, "freezes all of resnet18's 5 stages"),
    ({"weights": ""}, "model.weights is empty"),
])
def test_options_that_would_be_ignored_are_errors(options, message):
    with pytest.raises(UserError, match=message):
        cnn(**options)


def test_reads_pixels_only():
    assert MODELS.class_of("vse_cnn").image_input == "pixels"
    assert MODELS.class_of("vsepp").image_input == "features"
    with pytest.raises(UserError, match="reads raw images"):
        build_model("vse_cnn", SMALL, img_dim=2048, vocab_size=10)


def test_weights_file_rules_are_the_features_stage_ones(tmp_path):
    model = cnn(weights=str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="weights file .*missing.pth not found"):
        model.load_pretrained()
    other = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_large(weights=None).state_dict(), other)
    with pytest.raises(UserError, match="do not fit torchvision's resnet18"):
        cnn(weights=str(other)).load_pretrained()
    good = tmp_path / "resnet18.pth"
    torch.manual_seed(7)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), good)
    model = cnn(weights=str(good))
    model.load_pretrained()
    torch.testing.assert_close(model.backbone.stages[4][0].conv1.weight,
                               reference.layer4[0].conv1.weight)


def test_rebuilt_from_a_checkpoint_without_loading_weights_again(monkeypatch):
    model = cnn(finetune=True, weights="imagenet")
    with torch.no_grad():
        model.backbone.stages[0][0].weight.mul_(3)  # "trained"
    state = {"model": {"name": "vse_cnn",
                       "args": {"img_dim": 3, "vocab_size": 30, **SMALL, "finetune": True,
                                "weights": "imagenet"}},
             "state_dict": model.state_dict(), "vocab": Vocab.build(["a b"], 1).to_json()}

    def no_download(*args, **kwargs):
        raise AssertionError("weights loaded again")

    monkeypatch.setattr(backbones_module, "torchvision_model", no_download)
    rebuilt, _ = model_from_checkpoint(state)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    ones = torch.ones(2, dtype=torch.long)
    torch.testing.assert_close(rebuilt.encode_images(x, ones), model.encode_images(x, ones))
