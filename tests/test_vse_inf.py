"""VSE-infinity: GPO against a naive loop, padding, global features, region dropping,
training, resume, and the CLI's embed/eval on a vse_inf checkpoint."""

from pathlib import Path

import h5py
import pytest
import torch
import torch.nn.functional as F

from stages.config.sections import load_config, retrain_defaults
from stages.core.errors import UserError
from stages.io.checkpoint import load_checkpoint, weights_hash
from stages.models import build_model
from stages.models.gpo import GPO, positional_encoding
from stages.models.vse_inf import drop_regions
from stages.pipeline.train import train
from tests.resume_helpers import assert_resume_equals_uninterrupted
from tests.run_helpers import aoq_ok, run_records

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "model" / "vse_inf.yaml"
VSE_INF = ["model.name=vse_inf", "loss.warmup_epochs=1"]


def _model(**options):
    torch.manual_seed(0)
    return build_model("vse_inf", {"embed_size": 16, "word_dim": 8, **options}, img_dim=12,
                       vocab_size=30)


def _naive_gpo(gpo: GPO, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Item by item: each dimension of the members sorted, weighted by the GRU's softmax
    over that item's own positions (no packing, no batching)."""
    pooled = []
    for b in range(features.shape[0]):
        members = features[b][mask[b]]  # (n, D)
        n = members.shape[0]
        out, _ = gpo.gru(positional_encoding(n, gpo.pe_dim)[None])  # (1, n, 2h)
        h = out.shape[-1] // 2
        scores = gpo.linear((out[0, :, :h] + out[0, :, h:]) / 2)[:, 0]
        weights = torch.softmax(scores / 0.1, dim=0)
        column = torch.zeros(features.shape[2])
        for d in range(features.shape[2]):
            ranked = sorted(members[:, d].tolist(), reverse=True)
            column[d] = sum(w * v for w, v in zip(weights.tolist(), ranked, strict=True))
        pooled.append(column)
    return torch.stack(pooled)


def test_gpo_equals_a_naive_sort_and_weight_loop_with_variable_set_sizes():
    torch.manual_seed(0)
    gpo = GPO()
    features = torch.randn(6, 7, 5)
    counts = torch.tensor([7, 3, 1, 5, 3, 2])
    mask = torch.arange(7)[None, :] < counts[:, None]
    mask[3] = torch.tensor([True, False, True, True, False, True, True])  # not a prefix
    with torch.no_grad():
        expected = _naive_gpo(gpo, features, mask)
        torch.testing.assert_close(gpo(features, mask), expected, atol=1e-5, rtol=1e-5)
        weights = gpo.weights(counts, 7)
    torch.testing.assert_close(weights.sum(1), torch.ones(6))
    assert bool((weights[torch.arange(7)[None, :] >= counts[:, None]] == 0).all())
    torch.testing.assert_close(gpo(features[2:3], mask[2:3])[0], features[2, 0])  # a set of 1


def test_gpo_refuses_an_empty_set():
    with pytest.raises(ValueError, match="set sizes must be in"):
        GPO()(torch.randn(2, 3, 4), torch.tensor([[True, False, False], [False] * 3]))


def test_padded_regions_and_words_do_not_change_the_embeddings():
    model = _model(region_drop=0.0)
    images = torch.randn(4, 6, 12)
    regions = torch.tensor([6, 4, 1, 3])
    other = images.clone()
    for b, n in enumerate(regions.tolist()):
        other[b, n:] = torch.randn(6 - n, 12) * 100
    other[2, 1:] = float("nan")
    for mode in (model.train, model.eval):  # batch norm: batch statistics, then running ones
        mode()
        torch.manual_seed(1)
        a = model.encode_images(images, regions)
        torch.manual_seed(1)
        b = model.encode_images(other, regions)
        torch.testing.assert_close(a, b)
        # Padding to more regions changes nothing either.
        wider = torch.cat([images, torch.randn(4, 3, 12)], dim=1)
        torch.testing.assert_close(model.encode_images(wider, regions), a)
    model.eval()
    tokens = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]])
    both = model.encode_captions(tokens, torch.tensor([5, 3]))
    alone = model.encode_captions(torch.tensor([[1, 8, 2]]), torch.tensor([3]))
    torch.testing.assert_close(both[1], alone[0])
    junk = tokens.clone()
    junk[1, 3:] = 9
    torch.testing.assert_close(model.encode_captions(junk, torch.tensor([5, 3])), both)
    torch.testing.assert_close(both.norm(dim=1), torch.ones(2))


def test_global_features_are_sets_of_one_region():
    model = _model()
    model.eval()
    features = torch.randn(3, 12)
    ones = torch.ones(3, dtype=torch.long)
    emb = model.encode_images(features, ones)
    torch.testing.assert_close(emb, model.encode_images(features[:, None, :], ones))
    enc = model.image_encoder
    torch.testing.assert_close(emb, F.normalize(enc.fc(features) + enc.mlp(features), dim=-1))
    model.train()  # region dropping never empties a set of one
    torch.testing.assert_close(model.encode_images(features, ones).shape, emb.shape)


def test_region_dropping_rate_seed_and_never_empty():
    torch.manual_seed(0)
    mask = torch.arange(40)[None, :] < torch.tensor([40, 30, 20, 10] * 50)[:, None]
    dropped = drop_regions(mask, 0.2)
    assert not bool((dropped & ~mask).any())  # padding never comes back
    assert 0.17 < 1 - dropped.sum() / mask.sum() < 0.23
    torch.manual_seed(0)
    assert torch.equal(drop_regions(mask, 0.2), dropped)  # torch's RNG decides
    single = torch.zeros(500, 3, dtype=torch.bool)
    single[:, 0] = True
    assert torch.equal(drop_regions(single, 0.9), single)  # an emptied item keeps its regions


def test_region_dropping_only_in_training_mode():
    model = _model(region_drop=0.5)
    images, regions = torch.randn(8, 10, 12), torch.full((8,), 10)
    model.eval()
    assert torch.equal(model.encode_images(images, regions), model.encode_images(images, regions))
    model.train()
    torch.manual_seed(5)
    a = model.encode_images(images, regions)
    torch.manual_seed(5)
    assert torch.equal(model.encode_images(images, regions), a)
    assert not torch.allclose(model.encode_images(images, regions), a)  # other draws
    no_drop = _model(region_drop=0.0)
    no_drop.train()
    assert not torch.allclose(no_drop.encode_images(images, regions), a)


def test_weights_hash_takes_batch_norms_0d_counter():
    model = _model()
    before = weights_hash(model.state_dict())
    model.train()
    model.encode_images(torch.randn(2, 3, 12), torch.tensor([3, 2]))  # counter 0 -> 1
    assert model.state_dict()["image_encoder.mlp.1.num_batches_tracked"].dim() == 0
    assert weights_hash(model.state_dict()) != before


def test_shipped_config_is_the_reference_recipe():
    c = load_config([SHIPPED])
    model = c.model.options()
    assert c.model.name == "vse_inf"
    assert (model["embed_size"], model["word_dim"], model["region_drop"]) == (1024, 300, 0.2)
    assert (c.train.lr, c.train.epochs, c.train.lr_update, c.train.batch_size,
            c.train.grad_clip) == (5e-4, 25, 15, 128, 2.0)
    assert c.loss.name == "vse_max"
    with_warmup = load_config([SHIPPED], ["loss.warmup_epochs=1"])
    assert with_warmup.loss.options()["warmup_epochs"] == 1
    demo = load_config([SHIPPED, SHIPPED.parents[1] / "experiment" / "demo.yaml"])
    assert demo.model.options()["embed_size"] == 256 and demo.model.name == "vse_inf"
    # Every loss takes the file: retrain's aoq on the AOQ reference's schedule, the table's.
    retrain = load_config([SHIPPED], base=retrain_defaults(), retrain=True)
    assert (retrain.loss.name, retrain.train.epochs, retrain.train.lr_update) == ("aoq", 20, 10)
    assert retrain.model.name == "vse_inf"
    assert load_config([SHIPPED], ["loss.name=infonce"]).loss.name == "infonce"


def test_training_lowers_the_loss_and_learns(tiny_config, tmp_path):
    config = load_config(base=tiny_config, overrides=[*VSE_INF, "train.epochs=4",
                                                      "train.lr=5e-4"])
    train(config, tmp_path / "run")
    records = run_records(tmp_path / "run")
    # Epoch 1 sums every violation (warm-up); the max-violation epochs after it fall.
    assert records[3]["train_loss"] < records[1]["train_loss"]
    assert max(r["rsum"] for r in records) > 200  # chance is about 160 on 10 dev images
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["model"]["name"] == "vse_inf" and state["model"]["args"]["region_drop"] == 0.2


def test_resume_with_region_dropping_equals_uninterrupted(tiny_config, tmp_path):
    config = load_config(base=tiny_config, overrides=[*VSE_INF, "model.region_drop=0.5",
                                                      "train.ckpt_every=5"])
    # The 5th save: last.pt at step 5 of epoch 2, mid-epoch.
    whole = assert_resume_equals_uninterrupted(config, tmp_path, save=5,
                                               epoch_step=5)[0]["state_dict"]
    # The dropping matters: without it the same run ends elsewhere.
    plain = load_config(base=config, overrides=["model.region_drop=0"])
    train(plain, tmp_path / "plain")
    other = load_checkpoint(tmp_path / "plain" / "last.pt")["state_dict"]
    assert not all(torch.equal(other[n], whole[n]) for n in whole)


def test_out_of_range_options_are_refused(tiny_config):
    with pytest.raises(UserError, match="model.region_drop must be <= 0.9"):
        load_config(base=tiny_config, overrides=[*VSE_INF, "model.region_drop=1"])
    with pytest.raises(UserError, match="model.embed_size must be >= 2"):
        load_config(base=tiny_config, overrides=[*VSE_INF, "model.embed_size=1"])


def test_train_embed_eval_through_the_cli(tiny_root, tmp_path):
    data = ["--set", f"data.path={tiny_root}", "--set", "data.name=tiny"]
    sets = ["model.embed_size=32", "model.word_dim=16",
            "train.batch_size=16", "train.epochs=1", "data.workers=0"]
    run = tmp_path / "run"

    aoq_ok("train", "--config", SHIPPED, *data, *[a for s in sets for a in ("--set", s)],
           "--run-dir", run, cwd=tmp_path)
    aoq_ok("embed", "--ckpt", run / "checkpoint.pt", *data, cwd=tmp_path)
    with h5py.File(run / "embeddings_train.h5") as f:
        assert f["images"].shape == (40, 32) and f["captions"].shape == (200, 32)
    assert "rsum" in aoq_ok("eval", "--ckpt", run / "checkpoint.pt", *data, cwd=tmp_path).stdout
    assert [r["stage"] for r in run_records(run)] == ["train", "eval"]
