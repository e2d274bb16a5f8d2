import json

import pytest

from stages.core.errors import UserError
from stages.data.vocab import END, PAD, SPECIALS, START, UNK, Vocab, build_vocab_file, tokenize


def test_tokenize_lowercases_and_splits_punctuation_without_data_files():
    assert tokenize("A Dog's ball, on the GRASS.") == ["a", "dog", "'s", "ball", ",", "on",
                                                      "the", "grass", "."]


def test_build_threshold_specials_and_encode():
    caps = ["a dog runs", "a dog sits", "a cat"] * 2
    v = Vocab.build(caps, threshold=5)  # "a" is seen 6 times, "dog" 4, the rest 2
    assert v.idx2word[:4] == list(SPECIALS)
    assert (PAD, START, END, UNK) == (0, 1, 2, 3)
    assert v.idx2word[4:] == ["a"]
    v = Vocab.build(caps, threshold=4)
    assert v.idx2word[4:] == ["a", "dog"]
    assert v.encode("A dog flies") == [START, v.word2idx["a"], v.word2idx["dog"], UNK, END]


def test_save_load_round_trip(tmp_path):
    caps_file = tmp_path / "train_caps.txt"
    caps_file.write_text("a red dog .\na blue dog .\n")
    v = build_vocab_file(caps_file, tmp_path / "vocab.json", threshold=1)
    loaded = Vocab.load(tmp_path / "vocab.json")
    assert loaded.idx2word == v.idx2word
    assert loaded.decode(loaded.encode("a red dog .")) == ["<start>", "a", "red", "dog", ".",
                                                            "<end>"]
    loaded.check_built_from(caps_file, "vocab.json")  # same captions: fine


def test_vocab_from_other_captions_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("a red dog .\n")
    (tmp_path / "b.txt").write_text("a blue cat .\n")
    build_vocab_file(tmp_path / "a.txt", tmp_path / "vocab.json", threshold=1)
    with pytest.raises(UserError, match="built from other captions.*aoq vocab --out FILE"):
        Vocab.load(tmp_path / "vocab.json").check_built_from(tmp_path / "b.txt", "vocab.json")


def test_scan_vocab_json_is_accepted(tmp_path):
    scan = {"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "dog": 4},
            "idx2word": {"0": "<pad>", "1": "<start>", "2": "<end>", "3": "<unk>", "4": "dog"},
            "idx": 5}
    path = tmp_path / "f30k_precomp_vocab.json"
    path.write_text(json.dumps(scan))
    v = Vocab.load(path)
    assert len(v) == 5 and v.word2idx["dog"] == 4


def test_bad_vocab_files(tmp_path):
    with pytest.raises(UserError, match="not found.*aoq vocab"):
        Vocab.load(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(UserError, match="x.json: not a JSON vocabulary"):
        Vocab.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"word2idx": {"dog": 0, "<pad>": 1, "<start>": 2,
                                                               "<end>": 3}}))
    with pytest.raises(UserError, match="expected .* at indices 0-3"):
        Vocab.load(tmp_path / "y.json")
