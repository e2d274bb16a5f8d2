"""The open_clip miner (`aoq embed-clip`): a tiny random open_clip model saved to a weights
file embeds a raw-image split exactly as open_clip's own model, transform and tokenizer do;
its candidates record it, retraining checks it, a changed weights file embeds again, and
`make offcandi MINER=clip:<arch>:<weights>` runs the chain."""

import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from stages.cli import cli
from stages.config.sections import OffcandiConfig, load_config
from stages.core.errors import UserError
from stages.data.captions import read_captions
from stages.data.images import UnreadableImage
from stages.mining.embedding_files import Embeddings
from stages.models.clip import build_open_clip
from stages.pipeline.embed_clip import clip_miner_weights, embed_clip, parse_clip_miner
from stages.pipeline.miners import miner_weights
from stages.pipeline.offcandi import offcandi
from stages.pipeline.train import train
from tests.models.test_clip import TINY_VIT
from tests.raw_images import TINY_CNN, write_image_dataset
from tests.test_pipeline import make, workdir  # noqa: F401

open_clip = pytest.importorskip("open_clip")

ARCH_NAME = "aoq-miner-tiny-vit"  # the config's file name, open_clip's name once registered


def save_weights(path, seed: int) -> str:
    """A random open_clip model of :data:`TINY_VIT` saved to ``path`` (.pt or
    .safetensors), as open_clip checkpoint files hold it; returns the path."""
    torch.manual_seed(seed)
    state = build_open_clip(TINY_VIT).state_dict()
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return str(path)


@pytest.fixture
def mined(tmp_path):
    """(tmp_path, image root, arch JSON, weights file, settings, embeddings) after `aoq
    embed-clip` through the CLI on a raw-image dataset ``pix`` (24 training images)."""
    images, _ = write_image_dataset(tmp_path)
    arch = tmp_path / f"{ARCH_NAME}.json"
    arch.write_text(json.dumps(TINY_VIT))
    weights = save_weights(tmp_path / "tiny.safetensors", seed=0)
    settings = [f"data.path={tmp_path}", "data.name=pix", f"data.images={images}",
                "data.workers=0", "train.device=cpu"]
    out = tmp_path / "miner" / "embeddings_train.h5"
    cli.main(["embed-clip", "--arch", str(arch), "--weights", weights, "--out", str(out),
              *[a for s in settings for a in ("--set", s)]], standalone_mode=False)
    return tmp_path, images, str(arch), weights, settings, out


def test_embeddings_are_open_clips_on_its_own_transform_and_tokenizer(mined):
    root, images, arch, weights, _, out = mined
    open_clip.add_model_config(arch)  # open_clip's own factory, by name, from the file
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH_NAME, pretrained=weights)
    tokenizer = open_clip.get_tokenizer(ARCH_NAME)
    files = (root / "pix" / "train_images.txt").read_text().split()
    captions = read_captions(root / "pix" / "train_caps.txt")
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(images / f)) for f in files])
        want_images = model.eval().encode_image(pixels, normalize=True).numpy()
        want_captions = model.encode_text(tokenizer(captions), normalize=True).numpy()
    with Embeddings(out) as emb:
        got_images, got_captions = emb.images, np.asarray(emb.captions)
        attrs = emb.attrs
    assert got_images.dtype == got_captions.dtype == np.float32
    assert got_images.shape == (24, 16) and got_captions.shape == (120, 16)
    np.testing.assert_allclose(got_images, want_images, atol=1e-5)
    np.testing.assert_allclose(got_captions, want_captions, atol=1e-5)
    assert attrs["checkpoint"] == f"clip:{arch}:{weights}" and attrs["miner"] == "clip"
    assert attrs["weights"] == miner_weights(f"clip:{arch}:{weights}")
    assert (attrs["dataset"], attrs["split"], attrs["num_images"]) == ("pix", "train", 24)


def test_candidates_record_the_miner_and_retraining_checks_it(mined):
    root, images, arch, weights, settings, out = mined
    offcandi(out, root / "cand", OffcandiConfig(k_i2t=12, k_t2i=4))
    spec = f"clip:{arch}:{weights}"
    for direction in ("i2t", "t2i"):
        with h5py.File(root / "cand" / f"{direction}.h5", "r") as f:
            assert f.attrs["checkpoint"] == spec and f.attrs["weights"] == miner_weights(spec)
    retrain = [*settings, *TINY_CNN, "train.offline_negatives=true", "loss.name=aoq",
               "offcandi.hardest=10", f"offcandi.dir={root / 'cand'}"]
    assert train(load_config(overrides=[*retrain, f"offcandi.base_ckpt={spec}"]),
                 root / "run").is_file()
    other = save_weights(root / "other.pt", seed=1)
    for miner in (f"clip:{arch}:{other}", str(root / "run" / "checkpoint.pt")):
        with pytest.raises(UserError, match="mined with model weights"):
            train(load_config(overrides=[*retrain, f"offcandi.base_ckpt={miner}"]),
                  root / "refused")
    # The same file read as another architecture (QuickGELU) embeds otherwise: another miner.
    quick = root / "quick.json"
    quick.write_text(json.dumps({**TINY_VIT, "quick_gelu": True}))
    assert clip_miner_weights(str(quick), weights) != clip_miner_weights(arch, weights)


def test_a_changed_weights_file_embeds_again_and_stale_candidates_are_refused(mined):
    root, images, arch, weights, settings, out = mined
    config = load_config(overrides=settings)
    before = out.stat().st_mtime_ns
    with Embeddings(out) as emb:
        first = emb.images
    embed_clip(arch, weights, config, "train", out)
    assert out.stat().st_mtime_ns == before  # same model, captions and images: left as it is
    offcandi(out, root / "cand", OffcandiConfig(k_i2t=12, k_t2i=4))
    save_weights(weights, seed=1)  # new weights under the same name
    embed_clip(arch, weights, config, "train", out)
    with Embeddings(out) as emb:
        assert emb.attrs["weights"] == miner_weights(f"clip:{arch}:{weights}")
        assert not np.allclose(emb.images, first)
    retrain = [*settings, *TINY_CNN, "train.offline_negatives=true", "loss.name=aoq",
               "offcandi.hardest=10", f"offcandi.dir={root / 'cand'}",
               f"offcandi.base_ckpt=clip:{arch}:{weights}"]
    with pytest.raises(UserError, match="mined with model weights"):
        train(load_config(overrides=retrain), root / "run")


def test_bad_images_weights_and_names_are_one_line_errors(mined):
    root, images, arch, weights, settings, out = mined
    config = load_config(overrides=settings)
    for spec in ("clip:ViT-B-32", "clip::x.pt", "clip:ViT-B-32:"):
        with pytest.raises(UserError, match="clip:<arch>:<weights file>"):
            parse_clip_miner(spec)
    with pytest.raises(UserError, match="no such file"):
        embed_clip(arch, str(root / "none.pt"), config, "train", root / "x.h5")
    (images / "train" / "0005.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UnreadableImage, match="0005.jpg") as info:
        embed_clip(arch, weights, config, "train", root / "x.h5")
    assert "\n" not in str(info.value) and not (root / "x.h5").exists()


def test_make_offcandi_mines_with_the_clip_miner(tmp_path, workdir):  # noqa: F811
    """make runs embed-clip on every call; it rewrites nothing when nothing changed, so the
    candidates are not mined again."""
    images, _ = write_image_dataset(tmp_path)
    arch = tmp_path / "tiny-vit.json"
    arch.write_text(json.dumps(TINY_VIT))
    weights = save_weights(tmp_path / "tiny.pt", seed=0)
    args = ["DATA=pix", f"MINER=clip:{arch}:{weights}", f"IMAGES={images}"]
    out = make(workdir, "offcandi", *args)
    assert f"embed-clip --arch {arch} --weights {weights}" in out
    candidates = workdir / "offcandi" / "pix" / "miner-clip-tiny-vit-tiny"
    with h5py.File(candidates / "t2i.h5", "r") as f:
        assert f.attrs["checkpoint"] == f"clip:{arch}:{weights}"
    mined_at = (candidates / "t2i.h5").stat().st_mtime_ns
    again = make(workdir, "offcandi", *args)
    assert "embed-clip" in again and "offcandi --embeddings" not in again
    assert (candidates / "t2i.h5").stat().st_mtime_ns == mined_at
