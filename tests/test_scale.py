"""Mining at scale: the IVF-PQ index (recall against exact search, its settings), FAISS on
GPUs (the choice and the CPU fallback; this machine has faiss-cpu, so the GPU path is
checked with a fake cloner) and embeddings in shards (read as one, refused when not one
set, written by `aoq embed --shard`)."""

import logging
import shutil

import faiss
import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from stages.cli import cli
from stages.config.sections import OffcandiConfig, load_config
from stages.core.errors import UserError
from stages.core.layout import CaptionLayout
from stages.mining.candidate_files import positives_present
from stages.mining.embedding_files import (
    Embeddings,
    open_embeddings,
    parse_shard,
    shard_path,
    shard_range,
)
from stages.mining.hardness import round_stats
from stages.mining.knn import (
    approximate_recall,
    build_index,
    faiss_gpus,
    resolve_pq_m,
    search_blocks,
)
from stages.mining.mine import mine_arrays
from stages.pipeline.embed import embed
from stages.pipeline.offcandi import offcandi
from stages.pipeline.plot import recorded_embeddings
from stages.pipeline.train import train
from tests.test_offcandi import random_embeddings, read, read_positive_scores, write_embeddings

# ---------------------------------------------------------------------------- IVF-PQ


def ivfpq_recall(pq_m: int, nprobe: int, seed: int = 0) -> float:
    """recall@10 of an IVF-PQ index (16 lists) over 2,000 32-d captions, queried by their
    400 images, against exact search."""
    img, cap = random_embeddings(400, dim=32, seed=seed)
    index = build_index(cap, "ivfpq", nlist=16, nprobe=nprobe, pq_m=pq_m)
    return approximate_recall(index, cap, img, 10, sample=400)


def test_ivfpq_recall_against_exact_search():
    # Measured over seeds 0-7: 0.917-0.927 (16 sub-quantizers, every list visited), 0.786-
    # 0.798 (8 sub-quantizers), 0.805-0.829 (16, a quarter of the lists).
    full = ivfpq_recall(pq_m=16, nprobe=16)
    assert full >= 0.88
    assert ivfpq_recall(pq_m=8, nprobe=16) < full - 0.05  # coarser codes, lower recall
    assert ivfpq_recall(pq_m=16, nprobe=4) < full - 0.05  # fewer lists, lower recall


def test_ivfpq_index_is_faiss_ivfpq_with_its_settings(tmp_path):
    img, cap = random_embeddings(400, dim=32)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["cap"] = cap
    info = {}
    with h5py.File(tmp_path / "v.h5", "r") as f:  # read block by block, as from a file
        index = build_index(f["cap"], "ivfpq", nlist=16, nprobe=99, pq_m=8, pq_bits=6,
                            info=info)
    ivf = faiss.extract_index_ivf(index)
    assert isinstance(faiss.downcast_index(index), faiss.IndexIVFPQ)
    assert ivf.metric_type == faiss.METRIC_INNER_PRODUCT and ivf.ntotal == 2000
    assert ivf.code_size == 6  # 8 codes of 6 bits: pq_m * pq_bits / 8 bytes a vector
    assert info["nprobe"] == 16 and info["factory"] == "IVF16,PQ8x6np"
    assert info["train_size"] == 2000 and info["gpus"] == 0
    opq = build_index(cap, "ivfpq", nlist=4, nprobe=4, pq_m=4, pq_bits=4, opq=True)
    assert isinstance(opq, faiss.IndexPreTransform)
    (_, _, ids), = search_blocks(opq, img[:3], 5)
    assert ids.shape == (3, 5) and (ids >= 0).all()


@pytest.mark.parametrize("dim, want", [(256, 32), (1024, 64), (384, 48), (512, 64), (16, 2),
                                       (4, 1), (100, 4)])
def test_automatic_sub_quantizers(dim, want):
    assert resolve_pq_m(dim) == want


def test_ivfpq_settings_are_checked(tmp_path):
    img, cap = random_embeddings(60, dim=32)
    with pytest.raises(UserError, match=r"pq_m=12 does not divide the embedding size 32 "
                                        r"into equal sub-vectors; take one of its divisors "
                                        r"\(1, 2, 4, 8, 16, 32\), or 0 for 4"):
        build_index(cap, "ivfpq", pq_m=12)
    with pytest.raises(UserError, match="pq_m=64 does not divide"):
        build_index(cap, "ivfpq", pq_m=64)
    with pytest.raises(UserError, match=r"pq_bits=20: bits per sub-quantizer code must be in "
                                        r"1..16"):
        build_index(cap, "ivfpq", pq_bits=20)
    with pytest.raises(UserError, match=r"ivfpq: 60 vectors are too few to train 30 inverted "
                                        r"lists and 2\*\*pq_bits = 256 centroids"):
        build_index(img, "ivfpq", pq_m=8)
    few = write_embeddings(tmp_path / "e.h5", *random_embeddings(100, dim=16))
    with pytest.raises(UserError, match=r"ivfpq: 100 vectors are too few to train 40 "):
        offcandi(few, tmp_path / "out", OffcandiConfig(k_i2t=5, k_t2i=5, index="ivfpq"))
    assert not (tmp_path / "out").exists()  # refused before i2t (500 captions) was mined
    with pytest.raises(UserError, match="offcandi.pq_bits must be <= 16, got 17"):
        load_config(overrides=["offcandi.pq_bits=17"])
    with pytest.raises(UserError, match="offcandi.index must be one of"):
        load_config(overrides=["offcandi.index=pq"])
    config = load_config(overrides=["offcandi.index=ivfpq", "offcandi.pq_m=16",
                                    "offcandi.opq=true", "offcandi.gpu=off"])
    assert (config.offcandi.index, config.offcandi.pq_m, config.offcandi.pq_bits,
            config.offcandi.opq, config.offcandi.gpu) == ("ivfpq", 16, 8, True, False)


def test_offcandi_with_ivfpq_records_recall_and_settings(tmp_path):
    img, cap = random_embeddings(300, dim=16)
    emb = write_embeddings(tmp_path / "e.h5", img, cap)
    offcandi(emb, tmp_path / "out", OffcandiConfig(
        k_i2t=20, k_t2i=10, index="ivfpq", nlist=8, nprobe=8, pq_m=8, pq_bits=6,
        recall_sample=100))
    for direction in ("i2t", "t2i"):
        indices, _, attrs = read(tmp_path / "out" / f"{direction}.h5")
        assert not positives_present(direction, indices, CaptionLayout.uniform(300)).any()
        assert attrs["index"] == "ivfpq" and attrs["factory"] == "IVF8,PQ8x6np"
        assert (attrs["pq_m"], attrs["pq_bits"], attrs["nlist"], attrs["nprobe"]) == (8, 6, 8, 8)
        assert attrs["gpus"] == 0 and attrs["recall_at_k"] >= 0.8  # measured: 0.89, 0.95
        assert attrs["index_train_seconds"] >= 0 and attrs["index_add_seconds"] >= 0
    mined = mine_arrays(img, cap, 20, 10, index="ivfpq", nlist=8, nprobe=8, pq_m=8, pq_bits=6)
    np.testing.assert_array_equal(mined["i2t"][0], read(tmp_path / "out" / "i2t.h5")[0])


# ---------------------------------------------------------------------------- GPUs


def test_without_gpus_faiss_searches_on_the_cpu_saying_so_once(caplog, monkeypatch):
    assert faiss.get_num_gpus() == 0  # faiss-cpu here
    with caplog.at_level(logging.INFO, logger="stages.mining.knn"):
        assert faiss_gpus(True) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "offcandi.gpu: FAISS sees no GPU (faiss-cpu installed, or no device); searching on "
        "the CPU"]
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: pytest.fail("asked with gpu off"))
    assert faiss_gpus(False) == 0


class FakeClonerOptions:
    """faiss.GpuMultipleClonerOptions (faiss-gpu only), as the fields we set."""

    shard = False
    useFloat16 = False


@pytest.fixture
def pretend_gpus(monkeypatch):
    """FAISS that says it has 2 GPUs; the cloner records what it was asked for and returns
    the CPU index (so the search still runs). Yields the recorded calls."""
    calls = []

    def cloner(index, co=None, ngpu=-1):
        calls.append({"index": index, "shard": co.shard, "float16": co.useFloat16})
        return index

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", FakeClonerOptions, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", cloner)
    return calls


def test_with_gpus_the_index_is_sharded_over_all_of_them(tmp_path, pretend_gpus):
    img, cap = random_embeddings(300, dim=16)
    emb = write_embeddings(tmp_path / "e.h5", img, cap)
    offcandi(emb, tmp_path / "pq", OffcandiConfig(k_i2t=20, k_t2i=10, index="ivfpq", nlist=8,
                                                  nprobe=8, pq_m=8, pq_bits=6,
                                                  recall_sample=20, gpu=True))
    assert [(c["shard"], c["float16"]) for c in pretend_gpus] == [(True, True)] * 2
    assert [c["index"].ntotal for c in pretend_gpus] == [1500, 300]  # built, then moved
    assert read(tmp_path / "pq" / "t2i.h5")[2]["gpus"] == 2
    pretend_gpus.clear()
    offcandi(emb, tmp_path / "flat", OffcandiConfig(k_i2t=20, k_t2i=10, gpu=True))
    # the exact index goes as IndexFlatIP in float32 (still exact: the same candidates)
    assert [(type(c["index"]), c["float16"]) for c in pretend_gpus] == [
        (faiss.IndexFlatIP, False)] * 2
    cpu = mine_arrays(img, cap, 20, 10, gpu=False)
    np.testing.assert_array_equal(read(tmp_path / "flat" / "i2t.h5")[0], cpu["i2t"][0])
    pretend_gpus.clear()
    offcandi(emb, tmp_path / "hnsw", OffcandiConfig(k_i2t=20, k_t2i=10, index="hnsw",
                                                    recall_sample=20, gpu=True))
    offcandi(emb, tmp_path / "off", OffcandiConfig(k_i2t=20, k_t2i=10))
    assert pretend_gpus == []  # no GPU HNSW in FAISS; gpu off by default
    assert read(tmp_path / "hnsw" / "i2t.h5")[2]["gpus"] == 0


def test_an_index_the_gpus_refuse_is_one_message(tmp_path, monkeypatch, pretend_gpus):
    def refuse(index, co=None, ngpu=-1):
        raise RuntimeError("Error: 'bitsPerCode == 8' failed")

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", refuse)
    img, cap = random_embeddings(300, dim=16)
    with pytest.raises(UserError, match=r"FAISS could not move the ivfpq index to the GPU "
                                        r"\(Error: 'bitsPerCode == 8' failed\); .*"
                                        r"--set offcandi.gpu=false"):
        mine_arrays(img, cap, 5, 5, index="ivfpq", nlist=8, pq_m=8, pq_bits=6, gpu=True)


# ---------------------------------------------------------------------------- shards


def write_shards(path, img, cap, shards, changes=None):
    """The shard files of ``img``/``cap`` beside ``path``, as `aoq embed --shard` writes
    them; ``changes``: {shard index: {attribute: value}}."""
    changes = changes or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(shards):
        start, stop = shard_range(len(img), i, shards)
        file = shard_path(path, i, shards)
        with h5py.File(file, "w") as f:
            f.create_dataset("images", data=img[start:stop])
            f.create_dataset("captions", data=cap[5 * start:5 * stop])
            f.attrs.update({"format": "aoq-embeddings", "checkpoint": "ck.pt", "weights": "w0",
                            "dataset": "tiny", "split": "train", "num_images": len(img),
                            "train_captions_sha256": "x", "shard_index": i,
                            "num_shards": shards, "shard_image_start": start,
                            "shard_image_stop": stop, **changes.get(i, {})})
        out.append(file)
    return out


def mined_files(folder):
    return {d: (*read(folder / f"{d}.h5")[:2], read_positive_scores(folder / f"{d}.h5"))
            for d in ("i2t", "t2i")}


def test_shards_read_as_one_equal_the_unsharded_file(tmp_path, monkeypatch):
    import stages.mining.knn as knn
    monkeypatch.setattr(knn, "ADD_BLOCK_BYTES", 7 * 16 * 4)  # blocks across shard edges
    img, cap = random_embeddings(41)
    whole = write_embeddings(tmp_path / "whole.h5", img, cap)
    files = write_shards(tmp_path / "shards" / "embeddings_train.h5", img, cap, 3)
    assert [f.name for f in files] == [f"embeddings_train.shard-{i}-of-3.h5" for i in range(3)]
    options = OffcandiConfig(k_i2t=12, k_t2i=6, block_size=9)
    offcandi(whole, tmp_path / "whole", options)
    want = mined_files(tmp_path / "whole")
    for given in (files[::-1], str(tmp_path / "shards" / "*.h5"),
                  tmp_path / "shards" / "embeddings_train.h5"):
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        offcandi(given, out, options)
        got = mined_files(out)
        for direction in want:
            for a, b in zip(got[direction], want[direction], strict=True):
                np.testing.assert_array_equal(a, b)
        attrs = read(out / "i2t.h5")[2]
        assert attrs["num_images"] == 41
        assert attrs["embeddings"].endswith("shards/embeddings_train.shard-*-of-3.h5")
    # aoq plot's numbers read the shards the candidate files record as one, too
    stats = [round_stats(recorded_embeddings(folder), folder, "r", batch_size=16, hardest=10,
                         rank_sample=20).summary for folder in (out, tmp_path / "whole")]
    assert stats[0]["embeddings"] != stats[1]["embeddings"]
    assert [stats[0][d] for d in ("i2t", "t2i")] == [stats[1][d] for d in ("i2t", "t2i")]
    with open_embeddings(files) as emb:
        np.testing.assert_array_equal(emb.images, img)
        assert emb.captions.shape == (205, 16) and emb.attrs["num_shards"] == 3
        np.testing.assert_array_equal(emb.captions[60:150], cap[60:150])  # spans 3 shards


def test_a_set_that_is_not_one_embedding_is_refused(tmp_path):
    img, cap = random_embeddings(20)
    base = tmp_path / "a" / "embeddings_train.h5"
    files = write_shards(base, img, cap, 4)

    def refused(given, message):
        with pytest.raises(UserError, match=message):
            offcandi(given, tmp_path / "out", OffcandiConfig(k_i2t=5, k_t2i=3))
        assert not (tmp_path / "out").exists()

    refused([files[0], files[2]], r"shards 1, 3 of 4 missing \(embeddings_train.shard-1-of-4"
                                  r".h5, embeddings_train.shard-3-of-4.h5, beside .*\); embed "
                                  r"them with `aoq embed --shard 1/4` \.\.\.")
    copy = tmp_path / "copy.h5"
    shutil.copy(files[1], copy)
    refused([*files, copy], r"shard 1 of 4 given twice: .*shard-1-of-4.h5 and .*copy.h5")
    refused([*files[:3], *write_shards(tmp_path / "b" / "e.h5", img, cap, 4,
                                       {3: {"weights": "w1"}})[3:]],
            r"e.shard-3-of-4.h5 is not of the same embedding as .*: weights differ "
            r"\(weights 'w1' against 'w0'\)")
    refused([*files, write_embeddings(tmp_path / "whole.h5", img, cap)],
            "whole.h5 is a whole embeddings file, not a shard")
    write_shards(base, img, cap, 2)
    refused(base, "shards of two shardings")
    files[1].rename(files[1].with_name("moved.h5"))
    shutil.copy(files[0], files[1])  # shard 0's content under shard 1's name
    refused(files[:2], "is named shard 1 of 4 but holds shard 0 of 4")
    refused(tmp_path / "none.h5", r"embeddings .*none.h5 not found \(nor shards "
                                  r"none.shard-<i>-of-<n>.h5 beside it\)")
    with pytest.raises(UserError, match="is shard 0 of 4 of the split, not all of it"):
        Embeddings(files[0])


def test_parse_shard():
    assert parse_shard("0/4") == (0, 4) and parse_shard(" 3 / 4 ") == (3, 4)
    for bad in ("4/4", "1", "-1/2", "a/b", "1/0"):
        with pytest.raises(UserError, match="expected i/n with 0 <= i < n"):
            parse_shard(bad)
    assert [shard_range(10, i, 3) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]


def test_embed_shards_equal_the_whole_split_and_resume(tiny_config, tmp_path):
    base = train(load_config(base=tiny_config, overrides=["train.epochs=1"]), tmp_path / "b")
    whole = embed(base, out=tmp_path / "e" / "embeddings_train.h5")
    files = [embed(base, out=whole, shard=(i, 3)) for i in range(3)]
    assert [f.name for f in files] == [f"embeddings_train.shard-{i}-of-3.h5" for i in range(3)]
    with Embeddings(whole) as one, open_embeddings(files) as sharded:
        np.testing.assert_allclose(sharded.images, one.images, atol=1e-6)
        np.testing.assert_allclose(sharded.captions[0:200], one.captions[:], atol=1e-6)
        assert {k: v for k, v in sharded.attrs.items() if k != "num_shards"} == one.attrs
    before = {f: f.stat().st_mtime_ns for f in files}
    files[1].unlink()  # a kill before shard 1 was written: rerunning redoes only it
    assert [embed(base, out=whole, shard=(i, 3)) for i in range(3)] == files
    assert [f.stat().st_mtime_ns == before[f] for f in files] == [True, False, True]
    result = CliRunner().invoke(cli, ["embed", "--ckpt", str(base), "--shard", "3/3"])
    assert isinstance(result.exception, UserError)
    assert "--shard '3/3': expected i/n with 0 <= i < n" in str(result.exception)
    with pytest.raises(UserError, match="41 shards of the 40 images"):
        embed(base, out=whole, shard=(0, 41))
