"""aoq export: every registered model in both formats gives its checkpoint's embeddings, the
files run without this package, export.json describes them, bad input is one clear line."""

import json
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from stages.config.sections import load_config
from stages.core.errors import NoSpaceError, UserError
from stages.data.dataset import pad_tokens
from stages.data.synthetic import write_synthetic_dataset
from stages.data.vocab import build_vocab_file
from stages.io.checkpoint import load_checkpoint, weights_hash
from stages.models import MODELS, build_model
from stages.models.restore import model_from_checkpoint
from stages.models.rnn import padded_gru, reverse_within
from stages.pipeline.export import (
    FORMATS,
    CaptionIds,
    check_export,
    export,
    generated_batch,
    image_item_shape,
    load_encoder,
)
from stages.pipeline.train import train
from tests.models.text_tower import tiny_bert_for
from tests.raw_images import write_image_dataset
from tests.run_helpers import aoq

# Small values of options that registered models share; each model takes those it has.
TINY_OPTIONS = {"embed_size": 16, "word_dim": 8}
# What models need besides (under ``root``): a text model folder, raw images.
MODEL_OVERRIDES = {
    "vse_transformer": lambda root: [f"model.text_model={root / 'bert'}", "model.max_length=32"],
    "vse_cnn": lambda root: ["data.name=pix", f"data.images={root / 'images'}",
                             "model.backbone=resnet18", "model.weights=random",
                             "model.image_size=32"],
}
# The check's sample, read from the dataset each model trained on.
SAMPLE = {"vse_cnn": "pix/test: 6 images"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A datasets root holding ``tiny/`` (regions of 16-d features) and its vocabulary, a
    tiny random BERT ``bert/`` for its captions, and raw images (``pix/``, ``images/``)."""
    root = tmp_path_factory.mktemp("export_data")
    write_synthetic_dataset(root / "tiny", {"train": 30, "dev": 6, "test": 8}, seed=5,
                            feature_dim=16)
    build_vocab_file(root / "tiny" / "train_caps.txt", root / "tiny" / "vocab.json", threshold=1)
    tiny_bert_for(root)
    write_image_dataset(root, "pix", {"train": 12, "dev": 6, "test": 6})
    return root


@pytest.fixture(scope="module")
def checkpoints(root, tmp_path_factory):
    """``name -> checkpoint`` of a one-epoch run of a registered model, trained on demand
    through the real train stage."""
    made = {}

    def get(name: str):
        if name not in made:
            options = [f"model.{k}={v}" for k, v in TINY_OPTIONS.items()
                       if k in MODELS.options(name)]
            extra = MODEL_OVERRIDES.get(name, lambda root: [])(root)
            config = load_config(overrides=[
                f"data.path={root}", "data.name=tiny", f"model.name={name}", *options,
                "train.batch_size=10", "train.epochs=1", "data.workers=0",
                "train.device=cpu", *extra])
            made[name] = train(config, tmp_path_factory.mktemp(f"run_{name}"))
        return made[name]
    return get


def variant(checkpoint, path, options: dict, global_features: bool = False):
    """A copy of a vsepp ``checkpoint`` with a model built with other ``options`` (random
    weights), optionally recorded as trained on global (N, D) features."""
    state = load_checkpoint(checkpoint)
    args = state["model"]["args"]
    torch.manual_seed(4)
    model = build_model("vsepp", options, img_dim=args["img_dim"],
                        vocab_size=args["vocab_size"])
    state["model"] = {"name": "vsepp", "args": {**args, **options}}
    state["state_dict"] = model.state_dict()
    if global_features:
        shape = state["data_fingerprint"]["train_features"]["shape"]
        state["data_fingerprint"]["train_features"]["shape"] = [shape[0], shape[-1]]
    torch.save(state, path)
    return path


def mixed_batch(checkpoint, seed=7):
    """Inputs unlike the export's own: 5 images (of varied region counts, for region
    features), 5 captions of lengths 2..11 (and their shapes) for the model of
    ``checkpoint``."""
    state = load_checkpoint(checkpoint)
    _, tokenizer = model_from_checkpoint(state)
    return generated_batch(image_item_shape(state, str(checkpoint)), CaptionIds.of(tokenizer),
                           5, 5, 11, seed=seed)


# --- GRUs over padded batches ---------------------------------------------------------------
def test_reverse_within_reverses_the_valid_positions_only():
    x = torch.arange(12.0).reshape(2, 6, 1)
    out = reverse_within(x, torch.tensor([4, 6]))[..., 0]
    assert out.tolist() == [[3, 2, 1, 0, 4, 5], [11, 10, 9, 8, 7, 6]]


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("layers", [1, 2])
def test_padded_gru_equals_the_packed_gru(bidirectional, layers):
    torch.manual_seed(0)
    rnn = torch.nn.GRU(5, 4, layers, batch_first=True, bidirectional=bidirectional).eval()
    lengths = torch.tensor([7, 1, 4, 7, 2])
    x = torch.randn(5, 7, 5)
    x[torch.arange(7)[None, :] >= lengths[:, None]] = 100.0  # padding must not matter
    out, hidden = rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=7)
    got_out, got_hidden = padded_gru(rnn, x, lengths)
    torch.testing.assert_close(got_out, out)
    torch.testing.assert_close(got_hidden, hidden)


# --- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", [n for n in MODELS.names()
                                  if n != "clip"])  # refused: tests/models/test_clip.py
def test_every_registered_model_exports_and_gives_its_embeddings(checkpoints, tmp_path, name,
                                                                 fmt):
    checkpoint = checkpoints(name)
    out = export(checkpoint, tmp_path / "export", fmt)
    meta = json.loads((out / "export.json").read_text())
    assert max(meta["check"]["max_abs_diff"].values()) <= 1e-4
    assert meta["check"]["inputs"][0].startswith(SAMPLE.get(name, "tiny/test: 8 images"))
    model, _ = model_from_checkpoint(load_checkpoint(checkpoint))
    batch = mixed_batch(checkpoint)
    assert len(set(batch.lengths.tolist())) == 5
    assert batch.regions is None or len(set(batch.regions.tolist())) > 1
    with torch.no_grad():
        images = model.encode_images(batch.images, batch.regions).numpy()
        captions = model.encode_captions(batch.tokens, batch.lengths).numpy()
    suffix = ".pt" if fmt == "torchscript" else ".onnx"
    run_images = load_encoder(out / f"image_encoder{suffix}", fmt)
    run_captions = load_encoder(out / f"caption_encoder{suffix}", fmt)
    np.testing.assert_allclose(run_images(batch.image_inputs()), images, atol=1e-5)
    np.testing.assert_allclose(run_captions(batch.caption_inputs()), captions, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary left


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("options, global_features", [
    ({"embed_size": 6, "word_dim": 5, "bidirectional": True, "num_layers": 2}, False),
    ({"embed_size": 6, "word_dim": 5, "img_norm": False}, True),
])
def test_vsepp_variants_export(checkpoints, tmp_path, fmt, options, global_features):
    """Bidirectional two-layer GRUs (per-sequence reversal), unnormalised images on global
    features."""
    path = variant(checkpoints("vsepp"), tmp_path / "v.pt", options, global_features)
    out = export(path, tmp_path / "export", fmt)
    meta = json.loads((out / "export.json").read_text())
    image = meta["encoders"]["image"]
    if global_features:
        assert [i["name"] for i in image["inputs"]] == ["images"]
        assert image["inputs"][0]["shape"] == ["batch", 16]
        assert image["outputs"][0]["normalisation"] == "none"
        assert "generated" in meta["check"]["inputs"][0]  # the dataset has regions
    model, _ = model_from_checkpoint(load_checkpoint(path))
    batch = mixed_batch(path)
    run = load_encoder(out / meta["encoders"]["caption"]["file"], fmt)
    with torch.no_grad():
        expected = model.encode_captions(batch.tokens, batch.lengths).numpy()
        np.testing.assert_allclose(run(batch.caption_inputs()), expected, atol=1e-5)
        run = load_encoder(out / image["file"], fmt)
        regions = torch.ones(5, dtype=torch.long) if global_features else batch.regions
        expected = model.encode_images(batch.images, regions).numpy()
        np.testing.assert_allclose(run(batch.image_inputs()), expected, atol=1e-5)


STANDALONE = textwrap.dedent("""
    import sys
    import numpy as np
    fmt, folder = sys.argv[1], sys.argv[2]
    inputs = dict(np.load(folder + "/../inputs.npz"))
    image = {k: inputs[k] for k in ("images", "regions")}
    caption = {k: inputs[k] for k in ("tokens", "lengths")}
    if fmt == "onnx":
        import onnxruntime
        def run(name, feed):
            session = onnxruntime.InferenceSession(folder + "/" + name + ".onnx")
            return session.run(None, feed)[0]
    else:
        import torch
        def run(name, feed):
            module = torch.jit.load(folder + "/" + name + ".pt")
            return module(*(torch.from_numpy(v) for v in feed.values())).numpy()
    np.savez(folder + "/../outputs.npz", images=run("image_encoder", image),
             captions=run("caption_encoder", caption))
    assert not [m for m in sys.modules if m.split(".")[0] == "stages"]
""")


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_encoders_run_without_this_package(checkpoints, tmp_path, fmt):
    checkpoint = checkpoints("vsepp")
    out = export(checkpoint, tmp_path / "export", fmt)
    batch = mixed_batch(checkpoint)
    np.savez(tmp_path / "inputs.npz", **{k: v.numpy() for k, v in
                                         {**batch.image_inputs(),
                                          **batch.caption_inputs()}.items()})
    (tmp_path / "run.py").write_text(STANDALONE)
    result = subprocess.run([sys.executable, "-I", str(tmp_path / "run.py"), fmt, str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    outputs = np.load(tmp_path / "outputs.npz")
    model, _ = model_from_checkpoint(load_checkpoint(checkpoint))
    with torch.no_grad():
        np.testing.assert_allclose(outputs["images"], model.encode_images(
            batch.images, batch.regions).numpy(), atol=1e-5)
        np.testing.assert_allclose(outputs["captions"], model.encode_captions(
            batch.tokens, batch.lengths).numpy(), atol=1e-5)


TOWER_STANDALONE = textwrap.dedent("""
    import json
    import sys
    import numpy as np
    import onnxruntime
    folder, image_file = sys.argv[1], sys.argv[2]
    meta = json.load(open(folder + "/export.json"))
    def run(side, feed):
        file = folder + "/" + meta["encoders"][side]["file"]
        return onnxruntime.InferenceSession(file).run(None, feed)[0]
    out = {}
    captions = meta["captions"]
    if captions.get("kind") == "huggingface":
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(folder + "/" + captions["tokenizer"])
        enc = tokenizer(sys.argv[3:], truncation=True, max_length=captions["max_length"],
                        padding=True, return_tensors="np")
        assert int(enc["input_ids"][-1, -1]) == captions["pad_id"]
        out["captions"] = run("caption", {"tokens": enc["input_ids"].astype(np.int64),
                                          "lengths": enc["attention_mask"].sum(1)})
    pre = meta["encoders"]["image"].get("preprocessing")
    if pre:
        import torchvision.transforms as T
        from PIL import Image
        transform = T.Compose([T.Resize(pre["resize"]["shorter_side"]),
                               T.CenterCrop(pre["center_crop"]), T.ToTensor(),
                               T.Normalize(pre["mean"], pre["std"])])
        pixels = transform(Image.open(image_file).convert("RGB"))[None].numpy()
        out["images"] = run("image", {"images": pixels})
    np.savez(folder + "/../outputs.npz", **out)
    assert not [m for m in sys.modules if m.split(".")[0] == "stages"]
""")
TOWER_CAPTIONS = ["a photo of a black horse near a tree", "the dog", "Two cats, on a mat!"]


@pytest.mark.parametrize("name", ["vse_transformer", "vse_cnn"])
def test_tower_exports_are_usable_from_export_json_alone(checkpoints, root, tmp_path, name):
    """The saved Hugging Face tokenizer and the described image preprocessing, applied
    without this package, give the checkpoint's embeddings of real captions and images."""
    from stages.data.images import open_images

    checkpoint = checkpoints(name)
    out = export(checkpoint, tmp_path / "export", "onnx")
    image_file = root / "images" / "test" / "0003.png"
    (tmp_path / "run.py").write_text(TOWER_STANDALONE)
    result = subprocess.run([sys.executable, "-I", str(tmp_path / "run.py"), str(out),
                             str(image_file), *TOWER_CAPTIONS], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    outputs = np.load(tmp_path / "outputs.npz")
    model, tokenizer = model_from_checkpoint(load_checkpoint(checkpoint))
    meta = json.loads((out / "export.json").read_text())
    with torch.no_grad():
        if name == "vse_transformer":
            assert sorted(outputs) == ["captions"]
            assert sorted(p.name for p in out.iterdir()) == [
                "caption_encoder.onnx", "export.json", "image_encoder.onnx", "tokenizer"]
            assert meta["captions"]["max_length"] == 32 and meta["captions"]["pad_id"] == 0
            tokens, lengths = pad_tokens([torch.tensor(t) for t in
                                          tokenizer.encode_many(TOWER_CAPTIONS)])
            assert len(set(lengths.tolist())) == 3
            np.testing.assert_allclose(outputs["captions"], model.encode_captions(
                tokens, lengths).numpy(), atol=1e-5)
        else:
            assert sorted(outputs) == ["images"]
            assert meta["encoders"]["image"]["inputs"][0]["shape"] == ["batch", 3, 32, 32]
            pixels = open_images(root / "pix", "test", root / "images", 32).read_many([3])
            np.testing.assert_allclose(outputs["images"], model.encode_images(
                torch.from_numpy(pixels), torch.ones(1, dtype=torch.long)).numpy(), atol=1e-5)


def test_a_frozen_text_tower_exports_without_its_cache(checkpoints, tmp_path):
    """With the whole encoder frozen its outputs are cached per caption in eager mode; the
    export traces the encoder itself."""
    state = load_checkpoint(checkpoints("vse_transformer"))
    state["model"]["args"]["text_freeze_layers"] = -1
    torch.save(state, tmp_path / "frozen.pt")
    out = export(tmp_path / "frozen.pt", tmp_path / "export", "onnx")
    model, _ = model_from_checkpoint(state)
    assert model.text_encoder.cache is not None
    batch = mixed_batch(tmp_path / "frozen.pt")
    with torch.no_grad():
        np.testing.assert_allclose(load_encoder(out / "caption_encoder.onnx", "onnx")(
            batch.caption_inputs()), model.encode_captions(batch.tokens, batch.lengths).numpy(),
            atol=1e-5)


def test_a_changed_tokenizer_fails_the_check(checkpoints, tmp_path):
    out = export(checkpoints("vse_transformer"), tmp_path / "export", "torchscript")
    assert check_export(out)["caption"] <= 1e-4
    file = out / "tokenizer" / "tokenizer.json"
    saved = json.loads(file.read_text())
    vocab = saved["model"]["vocab"]
    vocab["man"], vocab["dog"] = vocab["dog"], vocab["man"]
    file.write_text(json.dumps(saved))
    with pytest.raises(UserError, match="tokenizer gives other token ids than the tokenizer"):
        check_export(out)


# --- export.json ----------------------------------------------------------------------------
def test_export_json_describes_the_files(checkpoints, tmp_path):
    checkpoint = checkpoints("vsepp")
    state = load_checkpoint(checkpoint)
    out = export(checkpoint, tmp_path / "export", "onnx")
    meta = json.loads((out / "export.json").read_text())
    assert meta["format"] == "aoq-export" and meta["exporter"] == "onnx"
    assert meta["model"] == state["model"]
    assert meta["checkpoint"]["weights"] == weights_hash(state["state_dict"])
    assert meta["checkpoint"]["path"] == str(checkpoint.resolve())
    image, caption = meta["encoders"]["image"], meta["encoders"]["caption"]
    assert [(i["name"], i["shape"], i["dtype"]) for i in image["inputs"]] == [
        ("images", ["batch", "max_regions", 16], "float32"), ("regions", ["batch"], "int64")]
    assert [(i["name"], i["shape"], i["dtype"]) for i in caption["inputs"]] == [
        ("tokens", ["batch", "length"], "int64"), ("lengths", ["batch"], "int64")]
    for side in (image, caption):
        assert side["outputs"] == [{"name": "embeddings", "dtype": "float32",
                                    "shape": ["batch", 16], "normalisation": "l2"}]
        graph = onnx.load(str(out / side["file"])).graph
        for declared, actual in ((side["inputs"], graph.input), (side["outputs"], graph.output)):
            assert [(v.name, [d.dim_param or d.dim_value
                              for d in v.type.tensor_type.shape.dim]) for v in actual] == [
                (v["name"], v["shape"]) for v in declared]
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["idx2word"] == state["vocab"]["idx2word"]
    captions = meta["captions"]
    assert (captions["start_id"], captions["end_id"], captions["unk_id"],
            captions["pad_id"]) == (1, 2, 3, 0)
    example = captions["example"]
    words = [w if w in vocab["idx2word"] else "<unk>" for w in example["tokens"]]
    assert example["ids"] == [1, *(vocab["idx2word"].index(w) for w in words), 2]
    assert example["tokens"][0] == "a"  # lower-cased


# --- errors and the check -------------------------------------------------------------------
def test_bad_requests_are_one_clear_line(checkpoints, tmp_path):
    checkpoint = checkpoints("vsepp")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    cases = [
        ((checkpoint, "tflite"), {}, "unknown export format 'tflite'; known: torchscript, onnx"),
        ((tmp_path / "garbage.pt", "onnx"), {}, "garbage.pt: not a checkpoint"),
        ((tmp_path / "missing.pt", "onnx"), {}, "missing.pt not found"),
        ((checkpoint, "onnx"), {"tolerance": 0.0}, "must be a positive number"),
    ]
    for (path, fmt), kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            export(path, tmp_path / "out", fmt, **kwargs)
    assert not (tmp_path / "out").exists()
    result = aoq("export", "--ckpt", checkpoint, "--format", "tflite", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown export format 'tflite'" in result.stderr and "Traceback" not in result.stderr


def test_an_existing_export_is_replaced_only_with_force(checkpoints, tmp_path, caplog):
    checkpoint = checkpoints("vsepp")
    out = export(checkpoint, tmp_path / "export")
    (out / "old.txt").write_text("old")
    result = aoq("export", "--ckpt", checkpoint, "--out", out, cwd=tmp_path)
    assert result.returncode == 2 and "already exists; pass --force" in result.stderr
    assert (out / "old.txt").exists()
    with caplog.at_level("INFO"):
        export(checkpoint, out, force=True)
    assert "caption encoder (caption_encoder.pt): max abs difference" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == [
        "caption_encoder.pt", "export.json", "image_encoder.pt", "vocab.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("kind", ["notes", "dataset", "foreign-export-json", "file"])
def test_force_never_deletes_what_is_not_an_export(checkpoints, root, tmp_path, kind):
    """--force replaces an earlier export only: a user's folder (`--out mydocs`), a dataset
    (`--out data/demo_copy`), a folder whose export.json is not ours, a file."""
    checkpoint = checkpoints("vsepp")
    out = tmp_path / "mydocs"
    if kind == "dataset":
        shutil.copytree(root / "tiny", out)
    elif kind == "file":
        out.write_text("notes")
    else:
        out.mkdir()
        (out / ("notes.txt" if kind == "notes" else "export.json")).write_text('{"a": 1}')
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_text()
    message = (f"{out} is not an export folder (no export.json of `aoq export` in it): --force "
               "replaces only an earlier export")
    with pytest.raises(UserError, match=re.escape(message)):
        export(checkpoint, out, force=True)
    if kind == "notes":
        result = aoq("export", "--ckpt", checkpoint, "--out", out, "--force", cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert message in result.stderr
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydocs"]


def test_a_folder_swapped_in_during_the_export_is_not_deleted(checkpoints, tmp_path,
                                                              monkeypatch):
    """The check runs again right before the old folder is moved aside."""
    import stages.pipeline.export as export_module

    checkpoint = checkpoints("vsepp")
    out = export(checkpoint, tmp_path / "export")
    real = export_module.check_encoders

    def swap_then_check(folder, *args, **kwargs):
        shutil.rmtree(out)
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(export_module, "check_encoders", swap_then_check)
    with pytest.raises(UserError, match="is not an export folder"):
        export(checkpoint, out, force=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_disk_too_full_for_the_lock_is_one_line_and_leaves_no_folder(checkpoints, tmp_path,
                                                                       monkeypatch):
    import errno

    from stages.io import lock

    checkpoint = checkpoints("vsepp")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(checkpoint, run / "checkpoint.pt")

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock.os, "write", full)
    with pytest.raises(NoSpaceError, match=r"no space left on .*run/export for the lock file"):
        export(run / "checkpoint.pt")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]


def test_a_tampered_onnx_file_fails_the_check(checkpoints, tmp_path):
    checkpoint = checkpoints("vsepp")
    out = export(checkpoint, tmp_path / "export", "onnx")
    assert check_export(out)["caption"] <= 1e-4
    graph = onnx.load(str(out / "caption_encoder.onnx"))
    weights = max(graph.graph.initializer, key=lambda t: len(t.raw_data))
    values = onnx.numpy_helper.to_array(weights) * 1.01
    weights.CopyFrom(onnx.numpy_helper.from_array(values, weights.name))
    onnx.save(graph, str(out / "caption_encoder.onnx"))
    result = aoq("export-check", "--dir", out, cwd=tmp_path)
    assert result.returncode == 2
    assert "the exported caption encoder differs from the checkpoint's" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_swapped_torchscript_file_or_vocabulary_fails_the_check(checkpoints, tmp_path):
    checkpoint = checkpoints("vsepp")
    out = export(checkpoint, tmp_path / "export", "torchscript")
    other = export(variant(checkpoint, tmp_path / "v.pt", TINY_OPTIONS), tmp_path / "other")
    (out / "image_encoder.pt").write_bytes((other / "image_encoder.pt").read_bytes())
    with pytest.raises(UserError, match="exported image encoder differs"):
        check_export(out)
    export(checkpoint, out, "torchscript", force=True)
    check_export(out)
    vocab = json.loads((out / "vocab.json").read_text())
    vocab["idx2word"][4], vocab["idx2word"][5] = vocab["idx2word"][5], vocab["idx2word"][4]
    (out / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(UserError, match="vocab.json differs from the vocabulary"):
        check_export(out)
    with pytest.raises(UserError, match="holds other weights"):
        check_export(out, tmp_path / "v.pt")


def test_an_export_that_does_not_match_writes_nothing(checkpoints, tmp_path, monkeypatch):
    from stages.models.base import EmbeddingModel

    real = EmbeddingModel.export_encoders

    class Off(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, tokens, lengths):
            return self.inner(tokens, lengths) + 1e-3

    def wrong(self, global_features=False):
        image, caption = real(self, global_features)
        return image, Off(caption)

    monkeypatch.setattr(EmbeddingModel, "export_encoders", wrong)
    with pytest.raises(UserError, match="caption encoder differs.*by up to 0.001"):
        export(checkpoints("vsepp"), tmp_path / "export", "onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_branch_on_tensor_values_is_refused_not_baked_in(checkpoints, tmp_path, monkeypatch):
    """Without its guard, masked_mean's shortcut for batches without padding would be
    traced as a constant branch: the export fails instead."""
    import stages.models.vsepp as vsepp

    monkeypatch.setattr(vsepp, "is_exporting", lambda: False)
    with pytest.raises(UserError,
                       match=r"cannot be exported.*TracerWarning.*vsepp.py:\d+ .*traceable"):
        export(checkpoints("vsepp"), tmp_path / "export", "torchscript")
    assert list(tmp_path.iterdir()) == []


def test_without_the_dataset_the_check_uses_generated_inputs(checkpoints, tmp_path):
    out = export(checkpoints("vsepp"), tmp_path / "export", "torchscript",
                 overrides=[f"data.path={tmp_path / 'nowhere'}"])
    meta = json.loads((out / "export.json").read_text())
    assert meta["check"]["inputs"][0].startswith("generated, 16 images and 16 captions")


def test_make_export_writes_the_folder_once_and_again_for_a_new_checkpoint(checkpoints,
                                                                           tmp_path):
    import os
    import shutil
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    ckpt = tmp_path / "runs" / "d" / "r" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    shutil.copyfile(checkpoints("vsepp"), ckpt)
    (tmp_path / "installed").touch()  # the venv's stamp: newer than setup.cfg

    def make(*args):
        return subprocess.run(["make", "--no-print-directory", "export",
                               f"VENV={Path(sys.executable).parents[1]}",
                               f"STAMP={tmp_path / 'installed'}", f"CKPT={ckpt}", *args],
                              cwd=repo, capture_output=True, text=True, timeout=300)

    result = make("FORMAT=onnx")
    assert result.returncode == 0, result.stderr
    target = tmp_path / "runs" / "d" / "r" / "export" / "onnx" / "export.json"
    first = json.loads(target.read_text())["checkpoint"]["weights"]
    assert "Nothing to be done" in make("FORMAT=onnx").stdout
    variant(ckpt, ckpt, TINY_OPTIONS)  # a retrained model
    os.utime(ckpt, (target.stat().st_mtime + 5,) * 2)
    result = make("FORMAT=onnx")
    assert result.returncode == 0, result.stderr
    assert json.loads(target.read_text())["checkpoint"]["weights"] != first
    result = make("FORMAT=tf")
    assert result.returncode != 0 and "use one of torchscript onnx" in result.stderr
