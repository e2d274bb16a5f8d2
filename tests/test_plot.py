"""`aoq plot`: valid PNGs and diagnostics.json for one or several rounds."""

import json

import numpy as np
import pytest
from PIL import Image

from stages.config.sections import OffcandiConfig, load_config
from stages.core.errors import UserError
from stages.metrics.retrieval import rank_metrics
from stages.pipeline.offcandi import offcandi
from stages.pipeline.plot import plot
from tests.run_helpers import aoq
from tests.test_hardness import brute_ranks, noisy_embeddings
from tests.test_offcandi import write_embeddings

FIGURES = ("similarities.png", "positive_rank.png", "rounds.png")


@pytest.fixture
def rounds(tmp_path):
    """Two rounds of (embeddings, candidates) of 30 images, as `make retrain ROUNDS=2`."""
    pairs = []
    for r, (run, folder) in enumerate((("base", "cand"), ("aoq", "cand/round2"))):
        img, cap = noisy_embeddings(30, noise=1.5 - r, seed=r)
        (tmp_path / run).mkdir()
        emb = write_embeddings(tmp_path / run / "embeddings_train.h5", img, cap,
                               weights=f"w{r}")
        offcandi(emb, tmp_path / folder, OffcandiConfig(k_i2t=20, k_t2i=6))
        pairs.append((emb, tmp_path / folder, img, cap))
    return pairs


def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 500 and im.size[1] > 300


def test_two_rounds(rounds, tmp_path):
    config = load_config(overrides=["train.batch_size=16", "offcandi.hardest=10"])
    out = tmp_path / "compare"
    written = plot([c for _, c, _, _ in rounds], [e for e, _, _, _ in rounds], config, out,
                   rank_sample=12, online_batches=3, seed=2)
    assert sorted(p.name for p in written) == sorted([*FIGURES, "diagnostics.json"])
    assert sorted(p.name for p in out.iterdir()) == sorted([*FIGURES, "diagnostics.json"])
    for name in FIGURES:
        assert_png(out / name)
    summary = json.loads((out / "diagnostics.json").read_text())["rounds"]
    assert [s["label"] for s in summary] == ["round 1 (base)", "round 2 (aoq)"]
    sample = np.sort(np.random.default_rng(2).choice(30, size=12, replace=False))
    for s, (_, _, img, cap) in zip(summary, rounds, strict=True):
        want_i2t, want_t2i = brute_ranks(img, cap, sample)
        assert s["i2t"]["r5"] == rank_metrics(want_i2t)["r5"]
        assert s["t2i"]["medr"] == rank_metrics(want_t2i)["medr"]
        assert s["online_anchors"] == 48 and s["i2t"]["sampled_range"] == 10
        assert s["t2i"]["sampled_range"] == 2 and not s["i2t"]["rescored"]
    assert summary[1]["t2i"]["r1"] > summary[0]["t2i"]["r1"]  # round 2 is less noisy


def test_cli_uses_the_recorded_embeddings(rounds, tmp_path):
    emb, folder, _, _ = rounds[0]
    out = tmp_path / "figs"
    result = aoq("plot", "--candidates", folder, "--out-dir", out, "--rank-sample", 5,
                 "--online-batches", 2, "--set", "train.batch_size=8",
                 "--set", "offcandi.hardest=10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in FIGURES:
        assert_png(out / name)
    summary = json.loads((out / "diagnostics.json").read_text())["rounds"]
    assert summary[0]["embeddings"] == str(emb)


def test_bad_requests(rounds, tmp_path):
    config = load_config()
    emb, folder, _, _ = rounds[0]
    with pytest.raises(UserError, match="1 --embeddings for 2 --candidates"):
        plot([folder, rounds[1][1]], [emb], config, tmp_path / "x")
    with pytest.raises(UserError, match="i2t.h5 not found"):
        plot([tmp_path / "nothing"], [], config, tmp_path / "x")
    with pytest.raises(UserError, match="built for num_images=30"):
        other = write_embeddings(tmp_path / "other.h5", *noisy_embeddings(31))
        plot([folder], [other], config, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing half-written
