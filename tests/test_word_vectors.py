"""Pretrained word vectors: rows copied from GloVe / fastText text files, the rest left at
their random init, the file recorded in the checkpoint and never read again."""

import gzip
import hashlib
import re

import numpy as np
import pytest
import torch

import stages.training.loop as loop_module
from stages.config.sections import load_config
from stages.core.errors import UserError
from stages.data.vocab import SPECIALS, Vocab
from stages.io.checkpoint import load_checkpoint
from stages.models import build_model
from stages.models.restore import model_from_checkpoint
from stages.models.word_vectors import load_word_vectors
from stages.pipeline.train import train

VOCAB = Vocab([*SPECIALS, "a", "dog", "runs", "cat", "über"])


def _line(word: str, values) -> str:
    return word + " " + " ".join(f"{v:.6g}" for v in values) + "\n"


def _glove(path, rows: dict, dim: int = 4, header: bool = False, trailing: str = ""):
    """A GloVe (or, with ``header``, fastText) text file of ``rows``."""
    lines = [f"{len(rows)} {dim}\n"] if header else []
    lines += [_line(w, v).replace("\n", trailing + "\n") for w, v in rows.items()]
    path.write_text("".join(lines), encoding="utf-8")
    return path


ROWS = {"the": [0.5, 1, 2, 3], "dog": [1.5, -2, 3e-3, 4], "a": [0, 0.25, 0, -1],
        "über": [9, 8, 7, 6], "cat": [2, 2, 2, 2]}


def _model(name="vse_inf", **options):
    torch.manual_seed(0)
    return build_model(name, {"embed_size": 8, "word_dim": 4, **options}, img_dim=6,
                       vocab_size=len(VOCAB))


@pytest.mark.parametrize("name", ["vse_inf", "vsepp"])
def test_found_rows_are_the_files_vectors_and_the_rest_keep_their_init(tmp_path, name):
    path = _glove(tmp_path / "glove.txt", ROWS)
    model, plain = _model(name, word_vectors=str(path)), _model(name)
    record = model.init_word_vectors(VOCAB)
    weight, init = model.text_encoder.embed.weight, plain.text_encoder.embed.weight
    for word in ("a", "dog", "cat", "über"):
        torch.testing.assert_close(weight[VOCAB.word2idx[word]],
                                   torch.tensor(ROWS[word], dtype=torch.float32))
    for word in (*SPECIALS, "runs"):  # specials are never looked up; runs is not in the file
        row = VOCAB.word2idx[word]
        assert torch.equal(weight[row], init[row]), word
    if name == "vse_inf":  # VSE-infinity's <mask>, after the vocabulary, keeps its init
        assert weight.shape[0] == len(VOCAB) + 1 and torch.equal(weight[-1], init[-1])
    assert record == {"path": str(path.resolve()),
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                      "dim": 4, "found": 4, "missing": 1}
    assert plain.init_word_vectors(VOCAB) is None  # no file set: nothing read


def test_fasttext_header_trailing_spaces_and_words_with_spaces(tmp_path):
    path = _glove(tmp_path / "cc.vec", ROWS, header=True, trailing=" ")
    with open(path, "a", encoding="utf-8") as f:
        f.write(_line("runs fast", [1, 2, 3, 4]))  # a word holding a space (GloVe 840B has some)
        f.write(_line("runs", [4, 3, 2, 1]) + "\n")  # then a blank line
        f.write(_line("dog", [7, 7, 7, 7]))  # a repeated word: the first one wins
    loaded = load_word_vectors(path, VOCAB, 4)
    assert loaded.record["found"] == 5 and loaded.record["missing"] == 0
    assert loaded.vectors[VOCAB.word2idx["runs"]].tolist() == [4, 3, 2, 1]
    assert loaded.vectors[VOCAB.word2idx["dog"]].tolist() == pytest.approx(ROWS["dog"])
    assert not bool(loaded.found[:4].any())


@pytest.mark.parametrize("content, message", [
    ("the 1 2 3\n", "line 1 has a 3-d vector but model.word_dim is 4; set model.word_dim=3"),
    ("2 3\nthe 1 2 3\n", "line 1 (header) says 3-d vectors but model.word_dim is 4"),
    ("the 1 2 3 4\ndog 1 2 3\n", "line 2 has 3 values after its first field, expected"),
    ("the 1 2 3 4\ndog 1 2 x 4\n", "line 2 (word 'dog') does not hold 4 finite numbers"),
    ("the 1 2 3 4\ncat 1 nan 3 4\n", "line 2 (word 'cat') does not hold 4 finite numbers"),
    ("", "holds no word vectors"),
])
def test_bad_files_are_one_line_errors_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "vectors.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(message)) as info:
        load_word_vectors(path, VOCAB, 4)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_and_compressed_files_are_refused(tmp_path):
    with pytest.raises(UserError, match="word vector file .*nope.txt not found"):
        load_word_vectors(tmp_path / "nope.txt", VOCAB, 4)
    packed = tmp_path / "glove.txt.gz"
    packed.write_bytes(gzip.compress(_line("dog", [1, 2, 3, 4]).encode()))
    with pytest.raises(UserError, match="is gzip-compressed; unpack it"):
        load_word_vectors(packed, VOCAB, 4)


def _file_for(tiny_root, tmp_path, dim=16):
    """A GloVe file holding every other word of the tiny dataset's vocabulary."""
    vocab = Vocab.load(tiny_root / "tiny" / "vocab.json")
    rng = np.random.default_rng(0)
    rows = {w: rng.normal(size=dim) for w in vocab.idx2word[4::2]}
    return _glove(tmp_path / "glove.txt", rows, dim=dim), vocab, rows


def test_training_records_the_file_and_resume_never_reads_it(tiny_root, tiny_config, tmp_path,
                                                             monkeypatch):
    path, vocab, rows = _file_for(tiny_root, tmp_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    config = load_config(base=tiny_config, overrides=["model.name=vse_inf",
                                                      f"model.word_vectors={path}",
                                                      "train.ckpt_every=5", "train.lr=1e-9"])
    real_save = loop_module.save_checkpoint
    saves = []

    def save_then_die(target, state):
        real_save(target, state)
        saves.append(target.name)
        if len(saves) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "run")
    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["word_vectors"]["sha256"] == digest
    assert state["word_vectors"]["found"] == len(rows)
    assert state["word_vectors"]["missing"] == len(vocab) - 4 - len(rows)
    assert f"{len(rows)} vocabulary words from {path.resolve()}" in \
        (tmp_path / "run" / "train.log").read_text()
    # At a tiny learning rate the rows are still (nearly) the file's after 5 steps.
    weight = state["state_dict"]["text_encoder.embed.weight"]
    for word, vector in rows.items():
        torch.testing.assert_close(weight[vocab.word2idx[word]],
                                   torch.tensor(vector, dtype=torch.float32), atol=1e-4, rtol=0)

    path.unlink()  # resume and later stages take the words from the checkpoint
    train(config, tmp_path / "run", resume=True)
    final = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert final["word_vectors"]["sha256"] == digest
    model, _ = model_from_checkpoint(final)
    assert model.word_vectors == str(path)


def test_a_bad_file_fails_before_the_run_folder_is_made(tiny_root, tiny_config, tmp_path):
    path, _, _ = _file_for(tiny_root, tmp_path, dim=8)  # the model's words are 16-d
    config = load_config(base=tiny_config, overrides=["model.name=vse_inf",
                                                      f"model.word_vectors={path}"])
    with pytest.raises(UserError, match="8-d vector but model.word_dim is 16"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_init_from_keeps_the_source_record(tiny_root, tiny_config, tmp_path):
    path, _, _ = _file_for(tiny_root, tmp_path)
    config = load_config(base=tiny_config, overrides=[f"model.word_vectors={path}",
                                                      "train.epochs=1"])
    train(config, tmp_path / "base")
    record = load_checkpoint(tmp_path / "base" / "checkpoint.pt")["word_vectors"]
    path.unlink()  # the continued run takes its words from the base model
    more = load_config(base=config, overrides=[
        f"train.init_from={tmp_path / 'base' / 'checkpoint.pt'}"])
    train(more, tmp_path / "more")
    assert load_checkpoint(tmp_path / "more" / "checkpoint.pt")["word_vectors"] == record
