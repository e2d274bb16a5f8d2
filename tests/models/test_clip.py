"""The clip model on tiny random-weight open_clip configs (a ViT and a ModifiedResNet image
tower, a 2-block text transformer): shapes, tokenizer, preprocessing, freezing, the
temperature shared with InfoNCE, resume, and the whole chain through the CLI."""

import json

import numpy as np
import pytest
import torch

import stages.training.loop as loop_module
from stages.config.sections import load_config
from stages.core.errors import UserError
from stages.data.clip_tokenizer import ClipTokenizer, arch_config, shipped_archs
from stages.data.images import open_images
from stages.data.tokenizers import tokenizer_from_json
from stages.io.checkpoint import load_checkpoint
from stages.losses import build_loss
from stages.models import build_model
from stages.models.clip import CLIPModel, build_open_clip
from stages.pipeline.table import finetune
from stages.pipeline.train import train
from tests.raw_images import write_image_dataset
from tests.test_cli import aoq

open_clip = pytest.importorskip("open_clip")

TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
TINY_VIT = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32,
                                            "patch_size": 8, "head_width": 16},
            "text_cfg": TEXT}
TINY_RN = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1],
                                           "width": 8, "head_width": 64},
           "text_cfg": TEXT}


@pytest.fixture
def arch(tmp_path):
    path = tmp_path / "tiny-vit.json"
    path.write_text(json.dumps(TINY_VIT))
    return str(path)


@pytest.fixture
def pixels(tmp_path):
    return write_image_dataset(tmp_path)


def clip_sets(root, images, arch, *more):
    return [f"data.path={root}", "data.name=pix", f"data.images={images}", "model.name=clip",
            f"model.arch={arch}", "model.weights=random", "train.batch_size=8",
            "train.epochs=1", "data.workers=0", "train.device=cpu", "train.lr=1e-3", *more]


def tiny_model(config=TINY_VIT, **options):
    torch.manual_seed(0)
    return build_model("clip", {"arch": "tiny", "weights": "random", **options}, img_dim=3,
                       clip_config=config)


def test_embeddings_are_open_clips_normalised_on_captions_padded_to_77(arch):
    model = tiny_model().eval()
    tokenizer = ClipTokenizer.for_arch(arch)
    captions = ["a red picture", "a much longer caption about a small blue square!"]
    ids = tokenizer.encode_many(captions)
    tokens = torch.zeros(2, max(map(len, ids)), dtype=torch.long)
    for row, seq in enumerate(ids):
        tokens[row, :len(seq)] = torch.tensor(seq)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        img = model.encode_images(images, torch.ones(2))
        cap = model.encode_captions(tokens, torch.tensor([len(s) for s in ids]))
        reference_tokens = open_clip.tokenizer.SimpleTokenizer(context_length=77)(captions)
        ref_img = model.clip.encode_image(images, normalize=True)
        ref_cap = model.clip.encode_text(reference_tokens, normalize=True)
    assert img.shape == cap.shape == (2, 16)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(img, ref_img)
    torch.testing.assert_close(cap, ref_cap)


def test_tokenizer_truncates_as_open_clip_and_round_trips_through_json(arch):
    tokenizer = ClipTokenizer.for_arch(arch)
    long = "word " * 200
    ids = tokenizer.encode_many(["A horse!", long])
    reference = open_clip.tokenizer.SimpleTokenizer(context_length=77)(["A horse!", long])
    assert len(ids[1]) == 77 and reference[1].tolist() == ids[1]
    assert reference[0][:len(ids[0])].tolist() == ids[0] and not reference[0][len(ids[0]):].any()
    rebuilt = tokenizer_from_json(json.loads(json.dumps(tokenizer.to_json())))
    assert isinstance(rebuilt, ClipTokenizer)
    assert rebuilt.encode_many(["A horse!", long]) == ids
    assert rebuilt.sha256() == tokenizer.sha256() and rebuilt.model_args() == {
        "clip_config": TINY_VIT}


def test_archs_that_would_need_the_network_are_one_line_errors(tmp_path):
    assert arch_config("ViT-B-32")["vision_cfg"]["patch_size"] == 32
    for arch, reason in [("xlm-roberta-base-ViT-B-32", "Hugging Face"),
                         ("ViT-B-16-SigLIP", "SigLIP"), ("coca_ViT-B-32", "Hugging Face|CoCa"),
                         ("ViT-Q-99", "unknown to open_clip .* TinyCLIP-ViT-8M-16-Text-3M"),
                         ("hf-hub:org/x", "schemas"),
                         (str(tmp_path / "none.json"), "no such file")]:
        with pytest.raises(UserError, match=reason) as info:
            arch_config(arch)
        assert "\n" not in str(info.value)


def test_preprocessing_is_clips_at_the_archs_size(arch, pixels):
    images, dataset = pixels
    pre = CLIPModel.image_preprocessing({"arch": arch})
    assert (pre.size, pre.eval_resize, pre.interpolation) == (32, 32, "bicubic")
    assert pre.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert CLIPModel.image_preprocessing({"arch": "gone.json", "clip_config": TINY_VIT}) == pre
    from PIL import Image
    from torchvision import transforms as T

    store = open_images(dataset, "dev", images, pre)
    expected = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC),
                          T.CenterCrop(32), T.ToTensor(),
                          T.Normalize(open_clip.OPENAI_DATASET_MEAN,
                                      open_clip.OPENAI_DATASET_STD)])
    with Image.open(store.image_path(2)) as file:
        np.testing.assert_allclose(store.read_many([2])[0],
                                   expected(file.convert("RGB")).numpy(), atol=1e-6)


def test_tinyclip_archs_resolve_by_name_to_the_sizes_their_names_give():
    """TinyCLIP-<image tower>-<M params>-...-Text-<M params>: the shipped configs build
    open_clip models whose image tower and text transformer have those sizes (the text
    figure of the smallest, 3M, rounds up its 2.4M; one text layer more or less moves the
    others' size by 11% or more)."""
    assert shipped_archs() == [
        "TinyCLIP-ResNet-19M-Text-19M", "TinyCLIP-ResNet-30M-Text-29M",
        "TinyCLIP-ViT-39M-16-Text-19M", "TinyCLIP-ViT-40M-32-Text-19M",
        "TinyCLIP-ViT-61M-32-Text-29M", "TinyCLIP-ViT-8M-16-Text-3M"]
    for name in shipped_archs():
        parts = name.split("-")
        image_m, text_m = float(parts[2].rstrip("M")), float(parts[-1].rstrip("M"))
        clip = build_open_clip(arch_config(name))
        image = sum(p.numel() for p in clip.visual.parameters()) / 1e6
        text = sum(p.numel() for n, p in clip.named_parameters()
                   if n.startswith("transformer.")) / 1e6
        assert image == pytest.approx(image_m, rel=0.05), name
        assert text == pytest.approx(text_m, rel=0.25 if text_m == 3 else 0.05), name


def test_a_tinyclip_name_is_the_arch_of_model_tokenizer_and_checkpoint():
    name = "TinyCLIP-ViT-8M-16-Text-3M"
    tokenizer = ClipTokenizer.for_arch(name)
    model = build_model("clip", {"arch": name, "weights": "random", "image_freeze_blocks": 10,
                                 "text_freeze_blocks": 3}, img_dim=3, **tokenizer.model_args())
    assert model.clip.visual.image_size == (224, 224)
    assert not any(p.requires_grad for n, p in model.clip.named_parameters()
                   if n.startswith("transformer."))
    rebuilt = tokenizer_from_json(json.loads(json.dumps(tokenizer.to_json())))
    assert rebuilt.clip_config == arch_config(name) and rebuilt.arch == name
    with pytest.raises(UserError, match="has 10 blocks"):
        build_model("clip", {"arch": name, "weights": "random", "image_freeze_blocks": 11},
                    img_dim=3, **tokenizer.model_args())


@pytest.mark.parametrize("config,blocks", [(TINY_VIT, 2), (TINY_RN, 4)])
def test_freezing_marks_stem_and_first_blocks_and_keeps_their_batch_norm_fixed(config, blocks):
    model = tiny_model(config, image_freeze_blocks=1, text_freeze_blocks=2).train()
    frozen = {n for n, p in model.clip.named_parameters() if not p.requires_grad}
    assert "visual.conv1.weight" in frozen and "token_embedding.weight" in frozen
    assert "positional_embedding" in frozen
    assert any(n.startswith(("visual.transformer.resblocks.0.", "visual.layer1.")) for n in frozen)
    assert not any(n.startswith(("visual.transformer.resblocks.1.", "visual.layer2."))
                   for n in frozen)
    assert all(n not in frozen for n in ("ln_final.weight", "text_projection", "logit_scale"))
    assert not any(n.startswith("transformer.") for n, p in model.clip.named_parameters()
                   if p.requires_grad)
    if config is TINY_RN:
        assert not model.clip.visual.bn1.training and not model.clip.visual.layer1.training
        assert model.clip.visual.layer2.training
    grouped = [p for g in model.param_groups() for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters() if p.requires_grad}
    with pytest.raises(UserError, match=f"has {blocks} blocks"):
        tiny_model(config, image_freeze_blocks=blocks + 1)


def test_weights_file_loads_and_a_tag_is_a_clear_error(tmp_path):
    source = build_open_clip(TINY_VIT)
    torch.save(source.state_dict(), tmp_path / "tiny.pt")
    model = tiny_model(weights=str(tmp_path / "tiny.pt"))
    model.load_pretrained()
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.clip.state_dict()[name], tensor), name
    with pytest.raises(UserError, match="cannot be downloaded here.*model.weights=PATH"):
        tiny_model(weights="laion2b_s34b_b79k").load_pretrained()
    torch.save({"nothing": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="cannot be loaded into"):
        tiny_model(weights=str(tmp_path / "other.pt")).load_pretrained()


def test_the_temperature_is_the_models_logit_scale_one_parameter():
    model = tiny_model()
    loss = build_loss("infonce", {"learnable_temperature": True})
    model.bind_loss(loss)
    assert list(loss.parameters()) == [] and "logit_scale" not in loss.state_dict()
    optimizer = loop_module.build_optimizer(model, loss, 1e-2)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert sum(p is model.clip.logit_scale for p in params) == 1
    before = model.clip.logit_scale.item()
    img, cap = torch.nn.functional.normalize(torch.randn(2, 4, 16), dim=-1)
    img.requires_grad_(True)
    terms = loss(img, cap, torch.arange(4))
    sum(terms.values()).backward()
    assert model.clip.logit_scale.grad is not None
    optimizer.step()
    assert model.clip.logit_scale.item() != before
    with pytest.raises(UserError, match="loss.temperature=0.05 is not used"):
        tiny_model().bind_loss(build_loss("infonce", {"learnable_temperature": True,
                                                      "temperature": 0.05}))
    fixed = tiny_model()
    fixed.bind_loss(build_loss("vse_max", {}))
    assert not fixed.clip.logit_scale.requires_grad


def test_training_freezes_ties_the_temperature_and_resumes_exactly(arch, pixels, tmp_path,
                                                                    monkeypatch):
    images, _ = pixels
    source = build_open_clip(TINY_VIT)
    torch.save(source.state_dict(), tmp_path / "start.pt")
    config = load_config(overrides=clip_sets(
        tmp_path, images, arch, f"model.weights={tmp_path / 'start.pt'}",
        "model.image_freeze_blocks=1", "model.text_freeze_blocks=1", "model.text_lr_scale=0.5",
        "loss.name=infonce", "loss.learnable_temperature=true", "train.epochs=2",
        "train.ckpt_every=4"))
    train(config, tmp_path / "whole")
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")
    start = source.state_dict()
    for name, tensor in whole["state_dict"].items():
        name = name.removeprefix("clip.")
        fixed = name.startswith(("visual.conv1", "visual.class_embedding", "visual.ln_pre",
                                 "visual.positional_embedding", "visual.transformer.resblocks.0.",
                                 "token_embedding", "positional_embedding",
                                 "transformer.resblocks.0."))
        assert torch.equal(tensor, start[name]) == fixed, name
    assert whole["loss_state"] == {}
    assert whole["vocab"]["format"] == "aoq-open-clip-tokenizer"
    assert whole["model"]["args"]["clip_config"] == TINY_VIT

    real_save = loop_module.save_checkpoint
    saves = []

    def save_then_die(path, state):
        real_save(path, state)
        saves.append(path.name)
        if len(saves) == 6:  # epoch 1: steps 4, 8, 12, best, last; epoch 2: step 4
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "killed")
    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    train(config, tmp_path / "killed", resume=True)
    resumed = load_checkpoint(tmp_path / "killed" / "last.pt")
    for name, tensor in whole["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name


def test_chain_train_embed_offcandi_retrain_eval_through_the_cli(arch, pixels, tmp_path):
    images, _ = pixels
    sets = [a for s in clip_sets(tmp_path, images, arch, "model.image_freeze_blocks=1",
                                 "offcandi.k_i2t=20", "offcandi.k_t2i=5", "offcandi.hardest=10")
            for a in ("--set", s)]
    base, aoq_run = tmp_path / "runs" / "base", tmp_path / "runs" / "aoq"
    steps = [
        ["train", *sets, "--set", "loss.name=infonce", "--set",
         "loss.learnable_temperature=true", "--run-dir", base],
        ["embed", "--ckpt", base / "checkpoint.pt"],
        ["offcandi", "--embeddings", base / "embeddings_train.h5", *sets,
         "--out-dir", tmp_path / "cand"],
        ["retrain", *sets, "--set", f"offcandi.dir={tmp_path / 'cand'}",
         "--set", f"offcandi.base_ckpt={base / 'checkpoint.pt'}", "--set", "loss.name=aoq",
         "--run-dir", aoq_run],
        ["eval", "--ckpt", base / "checkpoint.pt", "--ckpt", aoq_run / "checkpoint.pt",
         "--each"],
    ]
    config_file, moved = tmp_path / "tiny-vit.json", tmp_path / "moved.json"
    for number, step in enumerate(steps):
        # embed, offcandi and eval rebuild the model and tokenizer from the checkpoint alone;
        # retrain, a fresh run from model.weights, reads model.arch again
        if number in (1, 4):
            config_file.rename(moved)
        elif number == 3:
            moved.rename(config_file)
        result = aoq(*step, cwd=tmp_path)
        assert result.returncode == 0, (step, result.stderr[-3000:])
    assert "T = 0.0700 now" in (base / "train.log").read_text()
    assert "base" in result.stdout and "aoq" in result.stdout and "rsum" in result.stdout
    state = load_checkpoint(aoq_run / "checkpoint.pt")
    assert state["model"]["name"] == "clip" and state["config"]["loss"]["name"] == "aoq"
    assert set(state["data_fingerprint"]["candidates"]) == {"i2t", "t2i"}
    assert "logit_scale (T = 0.0700) is unused" in (aoq_run / "train.log").read_text()
    assert finetune(state["model"]) == "yes"
    result = aoq("export", "--ckpt", base / "checkpoint.pt", "--out", tmp_path / "export",
                 cwd=tmp_path)
    assert result.returncode == 2 and "cannot be exported yet" in result.stderr
    assert not (tmp_path / "export").exists()
