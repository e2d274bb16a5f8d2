"""A catalogue of bad inputs, one row per (file the tool reads, way it can be bad): each must
give a UserError naming the file, never a traceback. Each row writes a good neighbourhood
(a tiny dataset folder), spoils one file, and calls the reader the stages use.

Two more classes: files the tool promotes to the name later stages read (checkpoint.pt from
best.pt) are verified first, so a bad one is an error and nothing is promoted; and what the
tool would replace or delete (an export folder, a settings stamp, the demo dataset) must be
its own, so anything else is an error and stays exactly as it was."""

import copy
import json
import re

import h5py
import numpy as np
import pytest
import torch

from stages.config.sections import load_config
from stages.core.errors import UserError
from stages.data.dataset import open_split
from stages.data.splits import read_ids_file
from stages.data.synthetic import write_synthetic_dataset
from stages.data.vocab import Vocab
from stages.features.annotations import coco_splits, karpathy_splits
from stages.features.butd_tsv import tsv_to_hdf5
from stages.features.cnn import read_image_list
from stages.io.checkpoint import load_checkpoint
from stages.mining.candidate_files import load_candidates
from stages.models.cnn import FeatureExtractor
from stages.models.restore import model_from_checkpoint
from stages.pipeline.export import export
from stages.pipeline.import_candidates import import_published
from stages.pipeline.offcandi import offcandi
from stages.pipeline.stamps import update_stamp
from stages.pipeline.train import promote_best
from tests.features.test_butd_tsv import DIM, make_images, write_tsv

N, D = 2, 4
CAPS = "".join(f"caption {i}\n" for i in range(5 * N))


def folder(tmp_path):
    """A dataset folder with good captions and ids for split train (2 images)."""
    ds = tmp_path / "ds"
    ds.mkdir(exist_ok=True)
    (ds / "train_caps.txt").write_text(CAPS)
    (ds / "train_ids.txt").write_text("1\n2\n")
    return ds


def read_split(ds):
    """What training does with a split: open it, read a batch of images."""
    split = open_split(ds, "train")
    split.features.read_many(list(range(split.num_images)))
    split.features.regions_many(list(range(split.num_images)))
    return split


# --- captions, ids, image lists --------------------------------------------------------------
def caps(content: bytes):
    def run(tmp_path):
        ds = folder(tmp_path)
        np.save(ds / "train_ims.npy", np.zeros((N, D), np.float32))
        (ds / "train_caps.txt").write_bytes(content)
        return lambda: read_split(ds), "train_caps.txt"
    return run


def ids(content: bytes):
    def run(tmp_path):
        path = folder(tmp_path) / "train_ids.txt"
        path.write_bytes(content)
        return lambda: read_ids_file(path), "train_ids.txt"
    return run


def image_list(content: bytes):
    def run(tmp_path):
        ds = folder(tmp_path)
        (ds / "train_images.txt").write_bytes(content)
        return lambda: read_image_list(ds, "train"), "train_images.txt"
    return run


def ids_runs_of_other_images(tmp_path):
    """An ids file of one id per caption whose runs (3 images) are not the features' rows."""
    ds = folder(tmp_path)
    np.save(ds / "train_ims.npy", np.arange(N * D, dtype=np.float32).reshape(N, D))
    (ds / "train_ids.txt").write_text("".join(f"{i}\n" for i in [1] * 4 + [2] * 3 + [3] * 3))
    return lambda: read_split(ds), "train_ids.txt"


# --- features ------------------------------------------------------------------------------
def npy_array(array):
    def run(tmp_path):
        ds = folder(tmp_path)
        np.save(ds / "train_ims.npy", array, allow_pickle=True)
        return lambda: read_split(ds), "train_ims.npy"
    return run


def npy_bytes(content: bytes):
    def run(tmp_path):
        ds = folder(tmp_path)
        (ds / "train_ims.npy").write_bytes(content)
        return lambda: read_split(ds), "train_ims.npy"
    return run


def npz_as_npy(tmp_path):
    ds = folder(tmp_path)
    with open(ds / "train_ims.npy", "wb") as f:
        np.savez(f, features=np.zeros((N, D), np.float32))
    return lambda: read_split(ds), "train_ims.npy"


def h5(build):
    def run(tmp_path):
        ds = folder(tmp_path)
        with h5py.File(ds / "train.h5", "w") as f:
            build(f)
        return lambda: read_split(ds), "train.h5"
    return run


def h5_bytes(content: bytes):
    def run(tmp_path):
        ds = folder(tmp_path)
        (ds / "train.h5").write_bytes(content)
        return lambda: read_split(ds), "train.h5"
    return run


def h5_truncated(tmp_path):
    ds = folder(tmp_path)
    with h5py.File(ds / "train.h5", "w") as f:
        f.create_dataset("features", data=np.ones((N, 64, 64), np.float32), chunks=(1, 64, 64))
    data = (ds / "train.h5").read_bytes()
    (ds / "train.h5").write_bytes(data[: len(data) // 2])
    return lambda: read_split(ds), "train.h5"


def good_features(f):
    f.create_dataset("features", data=np.zeros((N, 3, D), np.float32))


# --- vocabulary ----------------------------------------------------------------------------
def vocab(content):
    def run(tmp_path):
        path = tmp_path / "vocab.json"
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        return lambda: Vocab.load(path), "vocab.json"
    return run


GOOD_WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a"]


# --- embeddings and candidates --------------------------------------------------------------
EMB_ATTRS = {"format": "aoq-embeddings", "checkpoint": "ck.pt", "weights": "w", "dataset": "d",
             "split": "train", "num_images": 12, "train_captions_sha256": "x"}


def embeddings(build):
    def run(tmp_path):
        path = tmp_path / "embeddings_train.h5"
        rng = np.random.default_rng(0)
        with h5py.File(path, "w") as f:
            build(f, rng.normal(size=(12, 8)).astype(np.float32),
                  rng.normal(size=(60, 8)).astype(np.float32))
        options = load_config(overrides=["offcandi.k_i2t=4", "offcandi.k_t2i=2"]).offcandi
        return lambda: offcandi(path, tmp_path / "out", options), "embeddings_train.h5"
    return run


def emb_datasets(f, img, cap, attrs=None, drop=()):
    for name, data in (("images", img), ("captions", cap)):
        if name not in drop:
            f.create_dataset(name, data=data)
    f.attrs.update({k: v for k, v in (attrs or EMB_ATTRS).items() if k not in drop})


CAND_ATTRS = {"format": "aoq-offcandi", "version": 2, "direction": "i2t", "dataset": "d",
              "split": "train", "num_images": 4, "weights": "w", "k": 3}


def candidates(build):
    def run(tmp_path):
        path = tmp_path / "i2t.h5"
        with h5py.File(path, "w") as f:
            build(f)
        return (lambda: load_candidates(tmp_path, "i2t", "d", "train", 4, 3,
                                        with_scores=False)), "i2t.h5"
    return run


GOOD_I2T = (np.arange(4)[:, None] * 5 + np.array([5, 6, 7])) % 20


def cand_datasets(f, indices=GOOD_I2T, attrs=CAND_ATTRS):
    if indices is not None:
        f.create_dataset("indices", data=indices)
    f.attrs.update(attrs)


def published(array_or_bytes):
    def run(tmp_path):
        ds = folder(tmp_path)
        np.save(ds / "train_ims.npy", np.zeros((N, D), np.float32))
        i2t, t2i = tmp_path / "i2t_x.npy", tmp_path / "t2i_x.npy"
        if isinstance(array_or_bytes, bytes):
            i2t.write_bytes(array_or_bytes)
        else:
            np.save(i2t, array_or_bytes, allow_pickle=True)
        np.save(t2i, (np.arange(5 * N)[:, None] // 5 + 1) % N)
        config = load_config(overrides=[f"data.path={tmp_path}", "data.name=ds"])
        return lambda: import_published(i2t, t2i, config, tmp_path / "out"), "i2t_x.npy"
    return run


# --- checkpoints ---------------------------------------------------------------------------
def checkpoint_state():
    from stages.models import build_model

    args = {"img_dim": D, "vocab_size": 5, "embed_size": 8, "word_dim": 4}
    model = build_model("vsepp", {"embed_size": 8, "word_dim": 4}, img_dim=D, vocab_size=5)
    return {"format": "aoq-checkpoint", "version": 1, "model": {"name": "vsepp", "args": args},
            "state_dict": model.state_dict(), "epoch": 1, "config": {},
            "vocab": Vocab(GOOD_WORDS).to_json(),
            "data_fingerprint": {"dataset": "d", "train_captions_sha256": "x"}}


def checkpoint(spoil):
    def run(tmp_path):
        path = tmp_path / "runs" / "d" / "base" / "checkpoint.pt"
        path.parent.mkdir(parents=True)
        state = checkpoint_state()
        content = spoil(state)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(state, path)

        def load():
            model_from_checkpoint(load_checkpoint(path), str(path))
        return load, "checkpoint.pt"
    return run


def truncated_checkpoint(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


# --- config, TSV, annotation JSON, CNN weights -------------------------------------------------
def config_file(content: bytes):
    def run(tmp_path):
        path = tmp_path / "c.yaml"
        path.write_bytes(content)
        return lambda: load_config([path]), "c.yaml"
    return run


def tsv(content: bytes):
    def run(tmp_path):
        ds = folder(tmp_path)
        path = tmp_path / "f.tsv"
        path.write_bytes(content)
        return (lambda: tsv_to_hdf5([path], ds, ["train"], max_regions=4, feature_dim=D)), \
            "f.tsv"
    return run


def features_made_otherwise(tmp_path):
    """train.h5 converted from a TSV with 4 regions, asked again with 6."""
    ds = folder(tmp_path)
    path = write_tsv(tmp_path / "f.tsv", make_images([1, 2], [2, 2]))
    tsv_to_hdf5([path], ds, ["train"], max_regions=4, feature_dim=DIM)
    return (lambda: tsv_to_hdf5([path], ds, ["train"], max_regions=6, feature_dim=DIM)), \
        "train.h5"


def karpathy(content):
    def run(tmp_path):
        path = tmp_path / "dataset_x.json"
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        return lambda: karpathy_splits(path), "dataset_x.json"
    return run


def coco(content):
    def run(tmp_path):
        path = tmp_path / "captions_train2017.json"
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        return lambda: coco_splits([path]), "captions_train2017.json"
    return run


def cnn_weights(content):
    def run(tmp_path):
        path = tmp_path / "w.pth"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        return lambda: FeatureExtractor("resnet18", str(path)), "w.pth"
    return run


def sentence(raw="a b"):
    return {"raw": raw}


KARPATHY_IMAGE = {"split": "train", "filename": "1.jpg", "sentences": [sentence()] * 5}

CASES = {
    # captions
    "caps/empty": (caps(b""), "0 captions"),
    "caps/not-utf8": (caps(b"caf\xe9\n" * 10), "not UTF-8"),
    "caps/empty-line": (caps(b"a\n\nb\n"), "empty caption line"),
    "caps/too-few": (caps(b"a\n" * 7), "7 captions but"),
    # ids and image lists
    "ids/empty": (ids(b""), "no image ids"),
    "ids/not-utf8": (ids(b"1\n\xff\n"), "not UTF-8"),
    "ids/not-integer": (ids(b"1\n2.5\n"), "not an integer"),
    "ids/repeated": (ids(b"1\n1\n2\n"), "listed more than once"),
    "images-list/not-utf8": (image_list(b"a.jpg\n\xff.jpg\n"), "not UTF-8"),
    "images-list/empty": (image_list(b""), "lists no images"),
    "layout/ids-runs-of-other-images": (ids_runs_of_other_images,
                                        r"train_ims.npy has 2 images but .* lists 3 \(one id "
                                        "per caption"),
    # .npy features
    "npy/empty-file": (npy_bytes(b""), "cannot be read as .npy"),
    "npy/text": (npy_bytes(b"hello\n"), "cannot be read as .npy"),
    "npy/truncated": (npy_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': "
                                b"False, 'shape': (2, 4), }" + b" " * 50 + b"\n" + b"\0" * 8),
                      "cannot be read as .npy"),
    "npy/rank-1": (npy_array(np.zeros(10, np.float32)), "features have shape"),
    "npy/no-images": (npy_array(np.zeros((0, D), np.float32)), "hold no images"),
    "npy/strings": (npy_array(np.array([["a"] * D] * N)), "not numbers"),
    "npy/objects": (npy_array(np.array([[None] * D] * N, dtype=object)),
                    r"an array of Python objects \(dtype object, shape \(2, 4\)\), not numbers; "
                    "save the features as float32"),
    "npy/list-of-arrays": (npy_array(np.array([np.zeros(3), np.zeros(4)], dtype=object)),
                           "an array of Python objects"),
    "npy/complex": (npy_array(np.zeros((N, D), np.complex64)), "not numbers"),
    "npy/npz-archive": (npz_as_npy, "an .npz archive"),
    # .h5 features
    "h5/empty-file": (h5_bytes(b""), "cannot be read as HDF5"),
    "h5/not-hdf5": (h5_truncated, "cannot be read"),
    "h5/no-features": (h5(lambda f: f.create_dataset("x", data=np.zeros(3))), "no 'features'"),
    "h5/features-is-group": (h5(lambda f: f.create_group("features")), "not an array"),
    "h5/wrong-rank": (h5(lambda f: f.create_dataset("features", data=np.zeros(10))),
                      "features have shape"),
    "h5/strings": (h5(lambda f: f.create_dataset("features", data=np.array([[b"a"] * D] * N))),
                   "not numbers"),
    "h5/wrong-format": (h5(lambda f: (good_features(f), f.attrs.update(format="other"))),
                        "format='other'"),
    "h5/num-regions-length": (h5(lambda f: (good_features(f), f.create_dataset(
        "num_regions", data=np.array([3], np.int32)))), "num_regions"),
    "h5/num-regions-range": (h5(lambda f: (good_features(f), f.create_dataset(
        "num_regions", data=np.array([3, 9], np.int32)))), "num_regions"),
    # vocabulary
    "vocab/empty": (vocab(b""), "not a JSON vocabulary"),
    "vocab/not-utf8": (vocab(b"\xff\xfe"), "not a JSON vocabulary"),
    "vocab/a-list": (vocab(["<pad>"]), "not a vocabulary file"),
    "vocab/no-idx2word": (vocab({"format": "aoq-vocab", "version": 1}), "idx2word"),
    "vocab/wrong-specials": (vocab({"format": "aoq-vocab", "idx2word": ["a", "b", "c", "d"]}),
                             "<pad>"),
    "vocab/words-not-strings": (vocab({"format": "aoq-vocab", "idx2word": [*GOOD_WORDS, 5]}),
                                "strings"),
    "vocab/repeated-word": (vocab({"format": "aoq-vocab", "idx2word": [*GOOD_WORDS, "a"]}),
                            "more than once"),
    "vocab/scan-bad-index": (vocab({"word2idx": {"<pad>": "0"}}), "word2idx"),
    "vocab/wrong-format": (vocab({"format": "other", "idx2word": GOOD_WORDS}),
                           "not a vocabulary file"),
    # embeddings
    "embeddings/empty-file": (embeddings(lambda f, i, c: None), "not an embeddings file"),
    "embeddings/wrong-format": (embeddings(lambda f, i, c: emb_datasets(
        f, i, c, {**EMB_ATTRS, "format": "x"})), "not an embeddings file"),
    "embeddings/no-images": (embeddings(lambda f, i, c: emb_datasets(f, i, c, drop=["images"])),
                             "no 'images'"),
    "embeddings/no-attribute": (embeddings(lambda f, i, c: emb_datasets(f, i, c,
                                                                        drop=["weights"])),
                                "lacks attribute"),
    "embeddings/images-rank-1": (embeddings(lambda f, i, c: emb_datasets(f, i[:, 0], c)),
                                 "images of shape"),
    "embeddings/caption-count": (embeddings(lambda f, i, c: emb_datasets(f, i, c[:50])),
                                 "do not match its caption layout"),
    "embeddings/nan": (embeddings(lambda f, i, c: emb_datasets(f, np.full_like(i, np.nan), c)),
                       "NaN"),
    # candidate files
    "candidates/no-indices": (candidates(lambda f: cand_datasets(f, indices=None)),
                              "no 'indices'"),
    "candidates/float-indices": (candidates(lambda f: cand_datasets(
        f, indices=GOOD_I2T.astype(np.float32) + 0.5)), "not integer"),
    "candidates/wrong-format": (candidates(lambda f: cand_datasets(
        f, attrs={**CAND_ATTRS, "format": "x"})), "not a candidate file"),
    "candidates/other-dataset": (candidates(lambda f: cand_datasets(
        f, attrs={**CAND_ATTRS, "dataset": "e"})), "built for dataset='e'"),
    "candidates/no-attribute": (candidates(lambda f: cand_datasets(
        f, attrs={k: v for k, v in CAND_ATTRS.items() if k != "split"})), "split=None"),
    "candidates/rank-1": (candidates(lambda f: cand_datasets(f, indices=np.arange(4))),
                          "indices of shape"),
    "candidates/empty-file": (candidates(lambda f: None), "not a candidate file"),
    # published candidate arrays
    "published/truncated": (published(b"\x93NUMPY"), "cannot be read as a .npy"),
    "published/floats": (published(np.zeros((N, 3))), "not integer"),
    "published/objects": (published(np.array([[None]] * N, dtype=object)),
                          r"an array of Python objects .*; is it AOQ's i2t_<data>.npy\?"),
    "published/wrong-shape": (published(np.zeros((N + 1, 3), np.int32)), "shape"),
    # checkpoints
    "checkpoint/empty": (checkpoint(lambda s: b""), "truncated or corrupt.*delete it and rerun"),
    "checkpoint/truncated": (checkpoint(truncated_checkpoint),
                             "truncated or corrupt.*delete it and rerun `make train DATA=d"),
    "checkpoint/text": (checkpoint(lambda s: b"hello"), "not a checkpoint of this project"),
    "checkpoint/no-format": (checkpoint(lambda s: s.pop("format")), "not a checkpoint"),
    "checkpoint/newer": (checkpoint(lambda s: s.update(version=99)), "newer"),
    "checkpoint/no-vocab": (checkpoint(lambda s: s.pop("vocab")), "lacks vocab"),
    "checkpoint/no-model-args": (checkpoint(lambda s: s["model"].pop("args")), "lacks model"),
    "checkpoint/unknown-model-arg": (checkpoint(lambda s: s["model"]["args"].update(x=1)),
                                     "cannot be built"),
    "checkpoint/unknown-model": (checkpoint(lambda s: s["model"].update(name="nope")),
                                 "unknown model 'nope'"),
    "checkpoint/bad-vocab": (checkpoint(lambda s: s.update(vocab={"format": "aoq-vocab"})),
                             "idx2word"),
    "checkpoint/wrong-shapes": (checkpoint(lambda s: s["model"]["args"].update(embed_size=16)),
                                "weights do not fit"),
    # config YAML
    "config/not-yaml": (config_file(b"a: [\n"), "not valid YAML"),
    "config/a-list": (config_file(b"- 1\n"), "expected a mapping"),
    "config/unknown-section": (config_file(b"nope: {a: 1}\n"), "unknown section"),
    "config/wrong-type": (config_file(b"train: {lr: abc}\n"), "train.lr must be a finite float"),
    "config/not-utf8": (config_file(b"train: {lr: \xff}\n"), "not UTF-8"),
    # BUTD TSV
    "tsv/fields": (tsv(b"1\t2\t3\n"), "tab-separated fields"),
    "tsv/base64": (tsv(b"1\t10\t10\t1\t!!\t!!\n"), "not valid base64"),
    "tsv/num-boxes": (tsv(b"1\t10\t10\t2\tAAAAAAAAAAAAAAAAAAAAAA==\tAAAAAAAAAAAAAAAAAAAAAA==\n"),
                      "num_boxes=2"),
    "tsv/id": (tsv(b"x\t10\t10\t1\ta\tb\n"), "not an integer"),
    "tsv/empty": (tsv(b""), "in none of"),
    "tsv/features-made-otherwise": (features_made_otherwise,
                                    r"made with other settings \(item_shape: \[4, 8\] -> "
                                    r"\[6, 8\]\).*DATA=<new name>"),
    # annotation JSON
    "karpathy/empty": (karpathy(b""), "not a Karpathy split file"),
    "karpathy/not-utf8": (karpathy(b"\xff"), "not a Karpathy split file"),
    "karpathy/images-not-list": (karpathy({"images": {"a": 1}}), "not a Karpathy split file"),
    "karpathy/entry-not-object": (karpathy({"images": [1]}), "not a Karpathy split file"),
    "karpathy/missing-sentences": (karpathy({"images": [{"split": "train",
                                                         "filename": "1.jpg"}]}), "lacks"),
    "karpathy/bad-cocoid": (karpathy({"images": [{**KARPATHY_IMAGE, "cocoid": "x"}]}),
                            "image id"),
    "karpathy/raw-not-text": (karpathy({"images": [{**KARPATHY_IMAGE,
                                                    "sentences": [{"raw": 1}] * 5}]}),
                              "not text"),
    "coco/empty": (coco(b""), "not a COCO annotation file"),
    "coco/a-list": (coco([1, 2]), "not a COCO annotation file"),
    "coco/no-images": (coco({"annotations": []}), "not a COCO annotation file"),
    "coco/not-utf8": (coco(b"\xff"), "not a COCO annotation file"),
    # CNN weights
    "cnn-weights/truncated": (cnn_weights(b"PK\x03\x04abc"), "cannot be read"),
    "cnn-weights/other-network": (cnn_weights({"fc.weight": torch.zeros(2, 2)}), "do not fit"),
}


# --- files the tool promotes: verified before they take the name later stages read ----------
def best_pt(spoil):
    """A finished run's best.pt, spoiled, promoted to checkpoint.pt as training ends."""
    def run(tmp_path):
        run_dir = tmp_path / "runs" / "d" / "base"
        run_dir.mkdir(parents=True)
        state = checkpoint_state()
        info = copy.deepcopy({k: state[k] for k in ("model", "data_fingerprint")})
        content = spoil(state)
        if isinstance(content, bytes):
            (run_dir / "best.pt").write_bytes(content)
        elif content is not MISSING:
            torch.save(state, run_dir / "best.pt")
        return lambda: promote_best(run_dir, info), "best.pt", run_dir / "checkpoint.pt"
    return run


MISSING = object()

PROMOTED = {
    "best-pt/truncated": (best_pt(truncated_checkpoint), "cannot be read as a whole checkpoint"),
    "best-pt/missing": (best_pt(lambda s: MISSING), "is missing"),
    "best-pt/text": (best_pt(lambda s: b"hello"), "cannot be read as a whole checkpoint"),
    "best-pt/other-run": (best_pt(lambda s: s["model"]["args"].update(embed_size=16)),
                          "holds another run's model or data"),
}


@pytest.mark.parametrize("case", list(PROMOTED))
def test_a_bad_file_is_never_promoted(tmp_path, case):
    build, pattern = PROMOTED[case]
    call, name, promoted = build(tmp_path)
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert re.search(pattern, message) and name in message, message
    assert "\n" not in message and not promoted.exists()


# --- what the tool would replace or delete: only its own files, else refused and kept -------
def snapshot(path):
    """What a path holds: a file's bytes, a folder's (relative path -> bytes), or None."""
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
                for p in sorted(path.rglob("*"))}
    return path.read_bytes() if path.exists() else None


def export_force(make_out):
    """`aoq export --force --out X` onto something that is not an earlier export."""
    def run(tmp_path):
        checkpoint = tmp_path / "checkpoint.pt"
        state = checkpoint_state()  # exportable: without the check, X would be replaced
        state["data_fingerprint"]["train_features"] = {"shape": [N, D]}
        torch.save(state, checkpoint)
        out = make_out(tmp_path)
        return lambda: export(checkpoint, out, force=True), out.name, out
    return run


def notes(tmp_path):
    out = tmp_path / "mydocs"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return out


def foreign_export_json(tmp_path):
    out = notes(tmp_path)
    (out / "export.json").write_text('{"format": "something-else"}')
    return out


def stamp_over(content: bytes):
    """`aoq settings --out f.txt` onto a file that is not a settings stamp."""
    def run(tmp_path):
        path = tmp_path / "f.txt"
        path.write_bytes(content)
        return (lambda: update_stamp(path, "stage: train\n", tmp_path / "out", None), "f.txt",
                path)
    return run


def demo_data_over(tmp_path):
    """`aoq demo-data --out X` onto a folder holding files demo-data did not write."""
    out = notes(tmp_path)
    return lambda: write_synthetic_dataset(out, {"train": 2}), "mydocs", out


KEPT = {
    "export-force/notes": (export_force(notes), "not an export folder"),
    "export-force/dataset": (export_force(folder), "not an export folder"),
    "export-force/foreign-export-json": (export_force(foreign_export_json),
                                         "not an export folder"),
    "settings/notes": (stamp_over(b"my notes\n"), "not a settings stamp"),
    "settings/yaml-list": (stamp_over(b"- 1\n"), "not a settings stamp"),
    "demo-data/notes": (demo_data_over, "holds files demo-data did not write"),
}


@pytest.mark.parametrize("case", list(KEPT))
def test_what_is_not_the_tools_own_is_never_replaced(tmp_path, case):
    build, pattern = KEPT[case]
    call, name, target = build(tmp_path)
    before = snapshot(target)
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert re.search(pattern, message) and name in message, message
    assert "\n" not in message
    assert snapshot(target) == before


# stages/config/sections.py belongs to the lead (load_config must catch UnicodeDecodeError and give
# the YAML error's first line only); these turn into passes when it does.
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_user_error(tmp_path, case):
    build, pattern = CASES[case]
    call, name = build(tmp_path)
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert re.search(pattern, message), message
    assert name in message, message
    assert "\n" not in message and "Traceback" not in message
