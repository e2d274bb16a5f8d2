"""VSRN: region reasoning against naive loops, padding, the caption loss, training, resume,
and the later stages through the CLI, on tiny generated data."""

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.config.sections import RETRAIN_DEFAULTS, load_config, retrain_defaults
from stages.core.errors import UserError
from stages.io.checkpoint import load_checkpoint, weights_hash
from stages.models import build_model
from stages.models.caption_decoder import CaptionDecoder
from stages.models.rs_gcn import RsGCN, valid_mask
from stages.pipeline.train import train
from tests.conftest import write_precomp
from tests.resume_helpers import assert_resume_equals_uninterrupted
from tests.run_helpers import aoq_ok, imported_candidates, run_records

TINY_VSRN = {"embed_size": 12, "word_dim": 6, "caption_hidden": 10, "caption_word_dim": 5}
VSRN_OVERRIDES = ["model.name=vsrn", "model.caption_hidden=16", "model.caption_word_dim=8"]


def _captions(lengths, vocab_size, seed=0):
    """(B, L) token ids ``<start> w... <end>`` padded with 0, and the lengths (B,)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    tokens = torch.zeros(len(lengths), int(lengths.max()), dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        tokens[b, :n] = torch.randint(4, vocab_size, (n,), generator=gen)
        tokens[b, 0], tokens[b, n - 1] = 1, 2
    return tokens, lengths


def _batch(regions, lengths, dim=10, num=6, vocab_size=25, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens, lengths = _captions(lengths, vocab_size, seed)
    return {"images": torch.randn(len(regions), num, dim, generator=gen),
            "regions": torch.tensor(regions), "tokens": tokens, "lengths": lengths}


def _randomise_norms(module):
    """Batch norms start as zero (each Rs-GCN layer is the identity): give them weights."""
    gen = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=gen)


# --- Rs-GCN ------------------------------------------------------------------------------
def _naive_rs_gcn(layer, v, regions):
    """Rs-GCN on each image's valid regions, pair by pair; batch statistics over all valid
    regions of the batch (biased variance, as batch norm normalises)."""
    pre = []
    for b in range(v.shape[0]):
        n = int(regions[b])
        nodes = v[b, :n]
        rows = []
        for i in range(n):
            r = torch.stack([layer.theta(nodes[i]) @ layer.phi(nodes[j]) for j in range(n)])
            a = r.softmax(0) if layer.affinity == "softmax" else r / n
            rows.append(layer.w(sum(a[j] * layer.g(nodes[j]) for j in range(n))))
        pre.append(torch.stack(rows))
    flat = torch.cat(pre)
    mean, var = flat.mean(0), flat.var(0, unbiased=False)
    bn = layer.bn
    out = []
    for b, y in enumerate(pre):
        normed = (y - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
        out.append(v[b, : len(y)] + normed)
    return out


@pytest.mark.parametrize("affinity", ["dot", "softmax"])
def test_rs_gcn_equals_a_naive_loop_over_valid_regions(affinity):
    torch.manual_seed(0)
    layer = RsGCN(7, affinity)
    _randomise_norms(layer)
    layer = layer.double()
    v = torch.randn(3, 5, 7, dtype=torch.float64)
    for regions in ([5, 2, 4], [5, 5, 5]):
        regions = torch.tensor(regions)
        out = layer(v, valid_mask(regions, 5))
        for b, expected in enumerate(_naive_rs_gcn(layer, v, regions)):
            torch.testing.assert_close(out[b, : int(regions[b])], expected)
    # The reference divides by the region count: every region valid, (theta phi^T / N) g.
    if affinity == "dot":
        bare = layer.w((layer.theta(v) @ layer.phi(v).transpose(1, 2) / 5) @ layer.g(v))
        torch.testing.assert_close(layer(v) - v, layer.bn(bare.reshape(15, 7)).reshape(v.shape))


def test_rs_gcn_starts_as_the_identity():
    layer = RsGCN(4)
    v = torch.randn(2, 3, 4)
    torch.testing.assert_close(layer(v), v)


# --- padding, shapes ---------------------------------------------------------------------
@pytest.mark.parametrize("norm_axis", ["regions", "features"])
def test_padded_regions_change_no_embedding_and_no_loss(norm_axis):
    torch.manual_seed(0)
    model = build_model("vsrn", {**TINY_VSRN, "img_bn": True, "norm_axis": norm_axis},
                        img_dim=10, vocab_size=25)
    _randomise_norms(model)
    batch = _batch([6, 2, 4, 1], [5, 3, 7, 4])
    garbage = dict(batch, images=batch["images"].clone())
    for b, n in enumerate(batch["regions"].tolist()):
        garbage["images"][b, n:] = 1e3 * torch.randn(6 - n, 10)

    model.train()  # batch statistics, dropout: the same seed for both
    outs = []
    for x in (batch, garbage):
        torch.manual_seed(5)
        outs.append(model(x))
    assert outs[0].img_emb.shape == (4, 12) and outs[0].cap_emb.shape == (4, 12)
    torch.testing.assert_close(outs[0].img_emb, outs[1].img_emb)
    torch.testing.assert_close(outs[0].aux_losses["caption"], outs[1].aux_losses["caption"])

    model.eval()  # running statistics: each image alone, cut to its valid regions
    padded = model.encode_images(garbage["images"], garbage["regions"])
    torch.testing.assert_close(padded.norm(dim=1), torch.ones(4))
    for b, n in enumerate(batch["regions"].tolist()):
        alone = model.encode_images(batch["images"][b:b + 1, :n], torch.tensor([n]))
        torch.testing.assert_close(padded[b], alone[0])


def test_any_sub_batch_trains_even_a_single_image():
    """The offline task encodes anchors and each group of negatives in its own call; an
    epoch's last batch may hold one image, which has no batch statistics."""
    model = build_model("vsrn", {**TINY_VSRN, "img_bn": True}, img_dim=10, vocab_size=25)
    model.train()
    batch = _batch([3], [4])
    running = model.image_encoder.bn.running_mean.clone()
    out = model(batch)
    assert out.img_emb.shape == (1, 12) and torch.isfinite(out.aux_losses["caption"])
    torch.testing.assert_close(model.image_encoder.bn.running_mean, running)


def test_global_features_are_an_error_naming_the_fix(tiny_root, tiny_config, tmp_path):
    model = build_model("vsrn", TINY_VSRN, img_dim=10, vocab_size=25)
    with pytest.raises(UserError, match="region features.*model.name=vsepp"):
        model.encode_images(torch.randn(2, 10), torch.ones(2, dtype=torch.long))
    folder = tiny_root / "flat"
    caps = (tiny_root / "tiny" / "train_caps.txt").read_text().splitlines()
    for split, n in (("train", 40), ("dev", 10)):
        write_precomp(folder, split, np.random.rand(n, 32).astype("float32"), caps[:5 * n])
    config = load_config(base=tiny_config, overrides=[
        "data.name=flat", f"data.vocab={tiny_root / 'tiny' / 'vocab.json'}", *VSRN_OVERRIDES])
    with pytest.raises(UserError, match=r"global \(N, D\) features.*aoq features tsv"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_caption_weight_zero_runs_no_decoder():
    model = build_model("vsrn", {**TINY_VSRN, "caption_weight": 0.0}, img_dim=10,
                        vocab_size=25)
    assert model(_batch([6, 3], [4, 5])).aux_losses == {}
    model = build_model("vsrn", {**TINY_VSRN, "caption_weight": 0.5}, img_dim=10,
                        vocab_size=25).eval()
    batch = _batch([6, 3], [4, 5])
    out = model(batch)
    mask = valid_mask(batch["regions"], 6)
    reasoned = model.image_encoder.reason(batch["images"], mask)
    plain = model.decoder(reasoned, mask, batch["regions"], batch["tokens"], batch["lengths"])
    torch.testing.assert_close(out.aux_losses["caption"], 0.5 * plain)


# --- the caption loss --------------------------------------------------------------------
def _reference_labels(tokens, length, max_len):
    """The reference's data loader: gts (max_len + 1) and its mask, for one caption."""
    cap = tokens[:length].tolist()
    if len(cap) > max_len - 1:
        cap = cap[:max_len]
        cap[-1] = 2
    gts = torch.zeros(max_len + 1, dtype=torch.long)
    gts[: len(cap)] = torch.tensor(cap)
    mask = torch.zeros(max_len + 1)
    mask[: int((gts == 0).nonzero()[0]) + 1] = 1
    return gts, mask


def _naive_caption_loss(dec, features, regions, tokens, lengths, max_len):
    """The reference's S2VT attention model, one image at a time, all max_len - 1 steps,
    with the concatenated attention input; its criterion (sum of NLL over the mask / B)."""
    total = 0.0
    for b in range(features.shape[0]):
        n = int(regions[b])
        enc, h = dec.encoder(dec.proj(features[b:b + 1, :n]))
        enc, h = enc[0], h[0, 0]
        gts, mask = _reference_labels(tokens[b], int(lengths[b]), max_len)
        for i in range(max_len - 1):
            joined = torch.cat([enc, h.expand(n, -1)], dim=1)
            alpha = dec.attn_score(torch.tanh(dec.attn(joined))).squeeze(1).softmax(0)
            context = alpha @ enc
            x = torch.cat([dec.embed(gts[i]), context])
            h = dec.cell(x[None], h[None])[0]
            logprobs = F.log_softmax(dec.out(h), dim=0)
            total = total - logprobs[gts[i + 1]] * mask[i + 1]
    return total / features.shape[0]


def test_caption_loss_equals_the_reference_criterion_in_a_naive_loop():
    torch.manual_seed(0)
    max_len = 6
    dec = CaptionDecoder(vocab_size=15, feature_dim=8, hidden=7, word_dim=5, dropout=0.0,
                         max_len=max_len).double()
    # lengths: short, one under the cap, exactly the cap, over it (cut to max_len - 1 + <end>)
    tokens, lengths = _captions([3, 5, 6, 9], 15)
    features = torch.randn(4, 5, 8, dtype=torch.float64)
    regions = torch.tensor([5, 2, 3, 5])
    loss = dec(features, valid_mask(regions, 5), regions, tokens, lengths)
    expected = _naive_caption_loss(dec, features, regions, tokens, lengths, max_len)
    torch.testing.assert_close(loss, expected)


def test_caption_loss_trains_the_decoder_alone():
    torch.manual_seed(0)
    dec = CaptionDecoder(vocab_size=12, feature_dim=6, hidden=16, word_dim=8, dropout=0.0)
    tokens, lengths = _captions([5, 4, 6, 5], 12)
    features = torch.randn(4, 3, 6)
    regions = torch.full((4,), 3)
    opt = torch.optim.Adam(dec.parameters(), lr=0.02)
    first = None
    for _ in range(60):
        loss = dec(features, None, regions, tokens, lengths)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


# --- training, resume, configs -----------------------------------------------------------
@pytest.fixture
def vsrn_config(tiny_config):
    return load_config(base=tiny_config, overrides=VSRN_OVERRIDES)


def test_training_lowers_both_losses_and_learns(vsrn_config, tmp_path):
    config = load_config(base=vsrn_config, overrides=["train.epochs=4", "train.lr=1e-3"])
    train(config, tmp_path / "run")
    records = run_records(tmp_path / "run")
    captions = [r["loss_caption"] for r in records]
    assert captions == sorted(captions, reverse=True) and captions[-1] < 0.95 * captions[0]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["train_loss"] == pytest.approx(records[-1]["loss_caption"]
                                                      + records[-1]["loss_i2t"]
                                                      + records[-1]["loss_t2i"])
    # chance on 10 dev images is about 160
    assert max(r["rsum"] for r in records) > 200
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["model"]["name"] == "vsrn" and state["model"]["args"]["max_len"] == 60
    assert any(k.startswith("decoder.") for k in state["state_dict"])


def test_resume_equals_uninterrupted(vsrn_config, tmp_path):
    """With the batch norm on the final state and dropout in the decoder, whose running
    statistics and random draws a resume must carry."""
    config = load_config(base=vsrn_config, overrides=["model.img_bn=true",
                                                      "train.ckpt_every=5"])
    # The 5th save: last.pt at step 5 of epoch 2.
    whole, _ = assert_resume_equals_uninterrupted(config, tmp_path, save=5, epoch_step=5)
    assert "image_encoder.bn.running_var" in whole["state_dict"]


def test_retrains_with_aoq_and_offline_negatives(vsrn_config, tmp_path):
    candidates = imported_candidates(vsrn_config, tmp_path)
    config = load_config([RETRAIN_DEFAULTS], base=vsrn_config, overrides=[
        "train.epochs=2", "model.img_bn=true", f"offcandi.dir={candidates}",
        "offcandi.hardest=20"])
    train(config, tmp_path / "aoq")
    records = run_records(tmp_path / "aoq")
    assert len(records) == 2 and all(r["loss_caption"] > 0 for r in records)
    assert {"loss_caption", "train_loss"} < set(records[0])
    state = load_checkpoint(tmp_path / "aoq" / "checkpoint.pt")
    assert state["model"]["name"] == "vsrn" and state["config"]["loss"]["name"] == "aoq"


def test_shipped_configs_resolve_and_leave_the_retrain_schedule():
    model = ["configs/model/vsrn.yaml"]
    config = load_config(model)
    assert config.model.options()["embed_size"] == 2048 and config.train.lr_update == 15
    assert (config.train.lr, config.train.batch_size, config.train.grad_clip) == (2e-4, 128, 2)
    assert config.loss.name == "vse_max" and config.loss.options()["margin"] == 0.2
    retrain = load_config(model, base=retrain_defaults(), retrain=True)
    assert (retrain.train.lr_update, retrain.train.epochs) == (10, 20)
    f30k = load_config([*model, "configs/model/vsrn_f30k_precomp.yaml"]).model.options()
    assert (f30k["img_bn"], f30k["region_norm"], f30k["max_len"]) == (True, False, 60)
    demo = load_config([*model, "configs/model/vsrn_demo.yaml",
                        "configs/experiment/demo.yaml"])
    assert demo.model.name == "vsrn" and demo.model.options()["embed_size"] == 256


def test_weights_hash_covers_the_batch_norm_counters():
    """num_batches_tracked is a 0-d tensor: hashed like any other weight."""
    state = build_model("vsrn", {**TINY_VSRN, "img_bn": True}, img_dim=10,
                        vocab_size=25).state_dict()
    counter = "image_encoder.bn.num_batches_tracked"
    assert state[counter].dim() == 0
    before = weights_hash(state)
    state[counter] = state[counter] + 1
    assert weights_hash(state) != before


# --- the later stages through the CLI ------------------------------------------------------
def test_train_embed_eval_through_the_cli(tmp_path):
    data = ["--set", f"data.path={tmp_path / 'data'}", "--set", "data.name=tiny"]
    tiny = [f"--set={o}" for o in ["model.embed_size=16", "model.word_dim=8", "train.epochs=1",
                                   "train.batch_size=16", "data.workers=0", *VSRN_OVERRIDES]]
    ckpt = tmp_path / "run" / "checkpoint.pt"
    steps = [
        ["demo-data", "--out", tmp_path / "data" / "tiny", "--train-images", 30,
         "--dev-images", 6, "--test-images", 8, "--feature-dim", 16],
        ["vocab", *data, "--threshold", 1],
        ["train", *data, *tiny, "--run-dir", tmp_path / "run"],
        ["embed", "--ckpt", ckpt, *data],
        ["eval", "--ckpt", ckpt, "--ckpt", ckpt, *data],
    ]
    for step in steps:
        result = aoq_ok(*step, cwd=tmp_path)
    assert "rsum" in result.stdout
    with h5py.File(tmp_path / "run" / "embeddings_train.h5") as f:
        images, captions = f["images"][:], f["captions"][:]
    assert images.shape == (30, 16) and captions.shape == (150, 16)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, rtol=1e-5)
    record = run_records(tmp_path / "run")[-1]
    assert record["stage"] == "eval" and len(record["checkpoints"]) == 2


# --- checkpoints from before the reference's normalisation and double step -------------------
def _old_spec(model) -> dict:
    """A checkpoint's model entry as the code before norm_axis and caption_double_step
    wrote it (those arguments absent)."""
    from stages.models import MODELS

    args = {name: option.default for name, option in MODELS.options("vsrn").items()}
    args.update(TINY_VSRN, img_dim=10, vocab_size=25)
    for new in ("norm_axis", "caption_double_step"):
        del args[new]
    return {"name": "vsrn", "args": args}


def test_a_checkpoint_from_before_norm_axis_is_read_as_it_was_trained():
    """Its model normalised each region over its features and updated the caption branch
    once a step: rebuilt so, not with today's defaults."""
    from stages.data.vocab import SPECIALS, Vocab
    from stages.models.restore import model_from_checkpoint

    torch.manual_seed(0)
    trained = build_model("vsrn", {**TINY_VSRN, "norm_axis": "features",
                                   "caption_double_step": False}, img_dim=10,
                          vocab_size=25).eval()
    vocab = Vocab([*SPECIALS, *(f"w{i}" for i in range(21))])
    state = {"model": _old_spec(trained), "state_dict": trained.state_dict(),
             "vocab": vocab.to_json()}
    model, _ = model_from_checkpoint(state)
    assert model.image_encoder.norm_axis == "features" and not model.caption_double_step
    batch = _batch([6, 3], [4, 5])
    torch.testing.assert_close(model.encode_images(batch["images"], batch["regions"]),
                               trained.encode_images(batch["images"], batch["regions"]))


def test_a_run_from_before_norm_axis_does_not_resume_with_the_new_defaults(vsrn_config,
                                                                             tmp_path):
    """Its stored config lacks the options: compared as what they meant then, the run
    differs from one asking for the reference's behaviour, and is refused."""
    from stages.io.checkpoint import save_checkpoint
    from stages.pipeline.train import _prepare_run_dir

    config = vsrn_config.to_dict()
    for new in ("norm_axis", "caption_double_step"):
        del config["model"][new]
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "last.pt", {"model": {"name": "vsrn", "args": {}}, "state_dict": {},
                                      "epoch": 1, "config": config, "vocab": {},
                                      "data_fingerprint": {}})
    with pytest.raises(UserError, match=r"model.caption_double_step: False -> True; "
                                        r"model.norm_axis: 'features' -> 'regions'"):
        _prepare_run_dir(run, vsrn_config, resume=True)
    old = load_config(base=vsrn_config, overrides=["model.norm_axis=features",
                                                   "model.caption_double_step=false"])
    assert _prepare_run_dir(run, old, resume=True)["epoch"] == 1  # the same settings resume


def test_a_best_pt_from_before_norm_axis_is_the_same_model_as_its_legacy_values(tmp_path):
    """A run resumed with the legacy values ends by promoting a best.pt written before the
    options existed, and such a checkpoint initialises a run asking for those values."""
    from stages.io.checkpoint import load_checkpoint, save_checkpoint
    from stages.models.restore import same_model
    from stages.pipeline.train import _init_source, promote_best

    old = {"name": "vsrn", "args": {"embed_size": 8}}
    legacy = {"name": "vsrn", "args": {"embed_size": 8, "norm_axis": "features",
                                       "caption_double_step": False}}
    today = {"name": "vsrn", "args": {"embed_size": 8, "norm_axis": "regions",
                                      "caption_double_step": False}}
    assert same_model(old, legacy) and not same_model(old, today)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "best.pt", {"model": old, "state_dict": {}, "epoch": 1,
                                      "config": {}, "vocab": {}, "data_fingerprint": {"a": 1}})
    promote_best(run, {"model": legacy, "data_fingerprint": {"a": 1}})
    assert load_checkpoint(run / "checkpoint.pt")["model"] == old
    assert _init_source(legacy, str(run / "checkpoint.pt"))["model"] == old
    with pytest.raises(UserError, match="differs from this run's"):
        _init_source(today, str(run / "checkpoint.pt"))
    (run / "checkpoint.pt").unlink()
    with pytest.raises(UserError, match="holds another run's model or data"):
        promote_best(run, {"model": today, "data_fingerprint": {"a": 1}})
