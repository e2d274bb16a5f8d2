"""The frozen text tower's outputs on disk (stages/models/encoder_cache.py): read by a second
model or process with no encoder call, bit-identical to computing them, keyed by the
weights, never a value from a damaged or foreign file, safe with writers at once; through
the train, eval and embed stages."""

import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.config.sections import load_config
from stages.data.dataset import open_split
from stages.data.tokenizers import PretrainedTokenizer
from stages.models.encode import encode_split
from stages.models.encoder_cache import CacheFile
from stages.models.transformer_text import TransformerTextEncoder
from stages.pipeline.embed import embed
from stages.pipeline.evaluate import evaluate
from stages.pipeline.stamps import settings_text
from stages.pipeline.train import train
from tests.models.text_tower import (
    batch_of,
    build,
    count_encoder_calls,
    text_tower_config,
    tiny_bert_for,
)

CPU = torch.device("cpu")
FROZEN = {"text_freeze_layers": -1}


@pytest.fixture
def bert(tiny_root):
    return tiny_bert_for(tiny_root)


@pytest.fixture
def split(tiny_root):
    return open_split(tiny_root / "tiny", "train")


def frozen(bert, folder, like=None, tokenizer=None, **options):
    """A whole-frozen vse_transformer keeping its outputs under ``folder``; ``like``: a
    model whose weights it takes (the projections too, so embeddings compare)."""
    model, tokenizer = build(bert, tokenizer, **{**FROZEN, **options})
    if like is not None:
        model.load_state_dict(like.state_dict())
    model.use_cache_folder(folder)
    return model, tokenizer


def cache_files(folder):
    return sorted(p.name for p in folder.glob("text-*.h5"))


def test_a_second_model_reads_the_file_and_never_calls_the_encoder(bert, split, tmp_path):
    folder = tmp_path / "cache"
    first, tokenizer = frozen(bert, folder)
    first_calls = count_encoder_calls(first)
    computed = encode_split(first, split, tokenizer, CPU, batch_size=7)
    assert len(first_calls) == -(-len(split.captions) // 7) and cache_files(folder) == []
    first.save_cache()  # the stages save at an epoch's or a stage's end
    [name] = cache_files(folder)

    second, _ = frozen(bert, folder, like=first, tokenizer=tokenizer)
    calls = count_encoder_calls(second)
    again = encode_split(second, split, tokenizer, CPU, batch_size=7)
    assert calls == [] and len(second.text_encoder.cache) == len(set(split.captions))
    for got, stored in zip(again, computed, strict=True):  # the first's values, bit for bit
        assert np.array_equal(got, stored)
    held, read = first.text_encoder.cache, second.text_encoder.cache
    assert all(torch.equal(held.values[row], read.values[read.rows[k]])
               for k, row in held.rows.items())
    # and those of an encoder without a cache, to float rounding: the cache encodes only a
    # batch's new captions, padded to their own longest
    uncached, _ = build(bert, tokenizer, **FROZEN)
    uncached.load_state_dict(first.state_dict())
    uncached.text_encoder.cache = None
    for got, fresh in zip(again, encode_split(uncached, split, tokenizer, CPU, batch_size=7),
                          strict=True):
        np.testing.assert_allclose(got, fresh, atol=1e-6, rtol=1e-5)

    assert second.text_encoder.save_cache() == 0  # nothing new: the file is not rewritten
    assert cache_files(folder) == [name]


def test_new_weights_or_settings_name_another_file(tiny_root, bert, split, tmp_path):
    folder = tmp_path / "cache"
    first, tokenizer = frozen(bert, folder)
    encode_split(first, split, tokenizer, CPU)
    first.save_cache()
    [name] = cache_files(folder)
    others = {
        "other weights": frozen(tiny_bert_for(tiny_root, "other", seed=1), folder)[0],
        "cls pooling": frozen(bert, folder, text_pooling="cls")[0],
        "float64": frozen(bert, folder)[0].to(torch.float64),
    }
    tokens, lengths = batch_of(tokenizer, split.captions[:20])
    seen = {name}
    for what, model in others.items():
        calls = count_encoder_calls(model)
        with torch.no_grad():
            model.encode_captions(tokens, lengths)
        assert len(calls) == 1, what  # nothing reused
        model.save_cache()
        new = set(cache_files(folder)) - seen
        assert len(new) == 1, what
        seen |= new
    # loading other weights into a model keys its cache afresh: the other encoder's file
    model = others["other weights"]
    model.load_state_dict(first.state_dict())
    calls = count_encoder_calls(model)
    encode_split(model, split, tokenizer, CPU)
    assert calls == [] and len(cache_files(folder)) == 4


def flip_a_value_byte(path):
    """Change one byte in the middle of the first chunk of ``values``."""
    import h5py

    with h5py.File(path, "r") as f:
        info = f["values"].id.get_chunk_info(0)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def foreign(path, tiny_root, split, tokenizer):
    """Put another encoder's file under this one's name."""
    other, _ = frozen(tiny_bert_for(tiny_root, "other", seed=1), path.parent / "other")
    encode_split(other, split, tokenizer, CPU)
    other.save_cache()
    [made] = (path.parent / "other").glob("text-*.h5")
    shutil.copyfile(made, path)


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "not hdf5"])
def test_a_damaged_or_foreign_file_never_gives_a_value(tiny_root, bert, split, tmp_path,
                                                       caplog, damage):
    folder = tmp_path / "cache"
    first, tokenizer = frozen(bert, folder)
    computed = encode_split(first, split, tokenizer, CPU, batch_size=7)
    first.save_cache()
    [path] = folder.glob("text-*.h5")
    if damage == "flip":
        flip_a_value_byte(path)
    elif damage == "truncate":
        truncate(path)
    elif damage == "foreign":
        foreign(path, tiny_root, split, tokenizer)
    else:
        path.write_bytes(b"not an HDF5 file\n" * 100)

    second, _ = frozen(bert, folder, like=first, tokenizer=tokenizer)
    calls = count_encoder_calls(second)
    with caplog.at_level(logging.WARNING):
        again = encode_split(second, split, tokenizer, CPU, batch_size=7)
    assert f"text cache {path} ignored" in caplog.text
    assert len(calls) == -(-len(split.captions) // 7)  # every caption encoded again
    for got, want in zip(again, computed, strict=True):
        assert np.array_equal(got, want)
    caplog.clear()
    second.save_cache()  # replaces the bad file with a sound one
    third, _ = frozen(bert, folder, like=first, tokenizer=tokenizer)
    calls = count_encoder_calls(third)
    with caplog.at_level(logging.WARNING):
        read = encode_split(third, split, tokenizer, CPU, batch_size=7)
    assert np.array_equal(read[1], computed[1])
    assert calls == [] and "ignored" not in caplog.text


def test_rows_held_before_the_folder_is_given_join_the_file(bert, split, tmp_path):
    folder = tmp_path / "cache"
    captions = list(dict.fromkeys(split.captions))[:60]  # distinct
    first, tokenizer = frozen(bert, folder)
    with torch.no_grad():
        first.encode_captions(*batch_of(tokenizer, captions[:40]))
    first.save_cache()
    second, _ = frozen(bert, None, like=first, tokenizer=tokenizer)  # in memory only
    calls = count_encoder_calls(second)
    with torch.no_grad():
        second.encode_captions(*batch_of(tokenizer, captions[20:60]))
        second.use_cache_folder(folder)
        second.encode_captions(*batch_of(tokenizer, captions[:20]))  # read from the file
    assert len(calls) == 1 and len(second.text_encoder.cache) == 60
    assert second.text_encoder.save_cache() == 20  # its own 40-60
    assert len(second.text_encoder.cache.file.read()[0]) == 60


def test_a_partly_frozen_encoder_never_uses_the_cache(bert, split, tmp_path):
    folder = tmp_path / "cache"
    for layers in (0, 1):
        model, tokenizer = frozen(bert, folder, text_freeze_layers=layers)
        calls = count_encoder_calls(model)
        assert model.text_encoder.cache is None
        encode_split(model, split, tokenizer, CPU)
        model.save_cache()
        encode_split(model, split, tokenizer, CPU)
        assert len(calls) == 2 and not folder.exists()


def key(*ids):
    return np.array(ids, dtype=np.int64).tobytes()


def value(k, width=4):
    """A row determined by its key, so any mix-up of rows shows."""
    ids = np.frombuffer(k, dtype=np.int64)
    return [float(ids.sum() + 1000 * len(ids) + j) for j in range(width)]


def rows(keys):
    return keys, torch.tensor([value(k) for k in keys])


def check_file(file, expected):
    """``file`` reads as exactly the rows of ``expected`` keys, each with its own value."""
    keys, values = file.read()
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))
    assert np.array_equal(values, np.array([value(k) for k in keys], dtype=np.float32))


def test_interleaved_saves_keep_every_row(tmp_path):
    """Two processes' caches on one file: each read it before the other saved."""
    file = CacheFile(tmp_path, "ab" * 32, {"test": 1}, 4, torch.float32)
    file.merge(*rows([key(1, 2), key(3)]))
    a_keys = [key(1, 2), key(3), key(5, 6, 7)]  # A read the file, then computed one row
    b_keys = [key(1, 2), key(3), key(8), key(5, 6, 7)]  # B too, and one more
    assert file.merge(*rows(b_keys)) == 2
    assert file.merge(*rows(a_keys)) == 0  # B saved A's row meanwhile
    assert file.merge(*rows([key(9)])) == 1  # a cache that never read the file
    check_file(file, [key(1, 2), key(3), key(8), key(5, 6, 7), key(9)])
    other = CacheFile(tmp_path, "cd" * 32, {"test": 1}, 4, torch.float32)
    assert other.path != file.path and other.read() is None


def test_nothing_to_save_writes_nothing(tmp_path):
    file = CacheFile(tmp_path, "ab" * 32, {"test": 1}, 4, torch.float32)
    file.damaged = True  # a read found the file damaged, and the process computed nothing
    assert file.merge([], torch.zeros(0, 4)) == 0 and list(tmp_path.iterdir()) == []


WRITER = """
import pathlib, sys, time
import numpy as np
import torch
from stages.models.encoder_cache import CacheFile
folder, who = pathlib.Path(sys.argv[1]), int(sys.argv[2])
file = CacheFile(folder / "cache", "ab" * 32, {"test": 1}, 4, torch.float32)
(folder / f"ready-{who}").touch()
while not (folder / "go").exists():  # both start writing at once
    time.sleep(0.01)
for i in range(25):
    keys = [np.array(k, dtype=np.int64).tobytes() for k in
            [*([who, i, j] for j in range(3)), [99, i]]]
    values = [[float(sum(k) + 1000 * len(k) + j) for j in range(4)] for k in
              (np.frombuffer(k, dtype=np.int64) for k in keys)]
    file.merge(keys, torch.tensor(values))
"""


def test_writers_in_two_processes_keep_a_sound_file_with_every_row(tmp_path):
    file = CacheFile(tmp_path / "cache", "ab" * 32, {"test": 1}, 4, torch.float32)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(who)])
               for who in (1, 2)]
    while not all((tmp_path / f"ready-{who}").exists() for who in (1, 2)):
        assert all(w.poll() is None for w in writers)
        time.sleep(0.05)
    (tmp_path / "go").touch()
    reads, problems = [], []
    while any(w.poll() is None for w in writers):  # a reader takes no lock: whole files only
        if file.path.exists():
            loaded = file.read()
            if loaded is None:
                problems.append("unreadable")
            else:
                keys, values = loaded
                reads.append(len(keys))
                if not np.array_equal(values, np.array([value(k) for k in keys],
                                                       dtype=np.float32)):
                    problems.append("a row with another row's value")
        time.sleep(0.01)
    assert [w.wait() for w in writers] == [0, 0]
    assert problems == [] and reads == sorted(reads)  # files only grow
    check_file(file, [key(who, i, j) for who in (1, 2) for i in range(25) for j in range(3)]
               + [key(99, i) for i in range(25)])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [file.path.name]


def count_pooled(monkeypatch) -> list[int]:
    """Captions the frozen encoder computes, in any model built from now on."""
    counted, pooled = [], TransformerTextEncoder.pooled

    def counting(self, tokens, lengths):
        counted.append(tokens.shape[0])
        return pooled(self, tokens, lengths)

    monkeypatch.setattr(TransformerTextEncoder, "pooled", counting)
    return counted


def test_train_eval_embed_and_a_second_run_reuse_the_first_runs_outputs(tiny_root, bert,
                                                                         tmp_path, monkeypatch):
    config = text_tower_config(tiny_root, bert, "model.text_freeze_layers=-1")
    tokenizer = PretrainedTokenizer.from_pretrained(str(bert), 64)
    ids = {name: {tuple(t) for t in tokenizer.encode_many(
        open_split(tiny_root / "tiny", name).captions)} for name in ("train", "dev", "test")}
    counted = count_pooled(monkeypatch)
    ckpt = train(config, tmp_path / "first")
    assert sum(counted) == len(ids["train"] | ids["dev"])  # each distinct caption once
    folder = tiny_root / "tiny" / "cache"  # data.text_cache's default: the dataset's
    [name] = cache_files(folder)

    counted.clear()
    train(config, tmp_path / "second")
    evaluate([ckpt], overrides=["data.eval_split=dev"], show=False)
    embed(ckpt)
    assert counted == []
    evaluate([ckpt], show=False)  # the test split: computed once, then kept
    evaluate([ckpt], show=False)
    assert sum(counted) == len(ids["test"] - ids["train"] - ids["dev"])
    assert cache_files(folder) == [name]


@pytest.mark.parametrize("setting", ["off", "elsewhere", "partly frozen"])
def test_the_setting_moves_or_stops_the_file(tiny_root, bert, tmp_path, setting):
    overrides = {"off": ["model.text_freeze_layers=-1", "data.text_cache=off"],
                 "elsewhere": ["model.text_freeze_layers=-1",
                               f"data.text_cache_dir={tmp_path / 'kept'}"],
                 "partly frozen": ["model.text_freeze_layers=1"]}[setting]
    config = text_tower_config(tiny_root, bert, *overrides)
    train(config, tmp_path / "run")
    assert not (tiny_root / "tiny" / "cache").exists()
    assert len(cache_files(tmp_path / "kept")) == (setting == "elsewhere")
    # where outputs are kept changes no result: no stage reruns for it
    plain = text_tower_config(tiny_root, bert, *overrides[:1])
    assert settings_text(config, "train") == settings_text(plain, "train")


def test_the_folder_is_the_dataset_s_unless_set(tiny_root):
    base = [f"data.path={tiny_root}", "data.name=tiny"]
    assert load_config(overrides=base).text_cache_folder() == tiny_root / "tiny" / "cache"
    elsewhere = load_config(overrides=[*base, "data.text_cache_dir=kept"])
    assert elsewhere.text_cache_folder() == Path("kept")
    for off in ("off", "false", "no"):  # YAML's false
        assert load_config(overrides=[*base, f"data.text_cache={off}"]).text_cache_folder() is None
