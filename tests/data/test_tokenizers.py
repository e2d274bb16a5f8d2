"""Caption tokenizers: the vocabulary unchanged, a Hugging Face tokenizer stored and
rebuilt without its folder, padding with the tokenizer's own id, clear errors."""

import io
import json
import shutil

import pytest
import torch

from stages.core.errors import UserError
from stages.data.dataset import TokenizedCaptions, open_split
from stages.data.tokenizers import (
    PretrainedTokenizer,
    downloads_allowed,
    from_folder_or_hub,
    resolve_text_model,
    tokenizer_from_json,
)
from stages.data.vocab import Vocab
from stages.training.tasks import PairTask
from tests.models.text_tower import tiny_bert_for, write_tiny_bert


def test_the_vocabulary_is_a_caption_tokenizer_as_before(tiny_root):
    vocab = Vocab.load(tiny_root / "tiny" / "vocab.json")
    captions = open_split(tiny_root / "tiny", "train").captions
    tokenized = TokenizedCaptions(captions, vocab)
    assert [tokenized[c].tolist() for c in range(len(captions))] == [vocab.encode(c)
                                                                     for c in captions]
    assert vocab.pad_id == 0 and vocab.model_args() == {"vocab_size": len(vocab)}
    again = tokenizer_from_json(json.loads(json.dumps(vocab.to_json())))
    assert isinstance(again, Vocab) and again.idx2word == vocab.idx2word


def test_a_pretrained_tokenizer_is_rebuilt_from_its_description_alone(tiny_root, tmp_path):
    bert = tiny_bert_for(tiny_root)
    captions = open_split(tiny_root / "tiny", "train").captions
    tokenizer = PretrainedTokenizer.from_pretrained(str(bert), max_length=12)
    ids = tokenizer.encode_many(captions)
    assert max(map(len, ids)) == 12 and all(t[0] == 2 and t[-1] == 3 for t in ids)
    assert 1 not in {i for t in ids for i in t}  # every word known: no [UNK]
    assert tokenizer.model_args()["text_config"]["hidden_size"] == 32
    assert not any(k.startswith("_") for k in tokenizer.text_config)  # no folder path
    copy = shutil.copytree(bert, tmp_path / "copy")  # the same tokenizer elsewhere
    assert PretrainedTokenizer.from_pretrained(str(copy), 12).sha256() == tokenizer.sha256()
    assert PretrainedTokenizer.from_pretrained(str(copy), 13).sha256() != tokenizer.sha256()
    buffer = io.BytesIO()  # as in a checkpoint: torch.save, loaded with weights_only
    torch.save({"vocab": tokenizer.to_json()}, buffer)
    shutil.rmtree(bert)
    buffer.seek(0)
    stored = torch.load(buffer, weights_only=True)["vocab"]
    rebuilt = tokenizer_from_json(stored)
    assert isinstance(rebuilt, PretrainedTokenizer)
    assert rebuilt.encode_many(captions) == ids
    assert (rebuilt.pad_id, rebuilt.max_length) == (0, 12)
    assert rebuilt.sha256() == tokenizer.sha256()
    assert rebuilt.model_args() == tokenizer.model_args()


def test_batches_are_padded_with_the_tokenizers_pad_id(tiny_root, tmp_path):
    captions = open_split(tiny_root / "tiny", "train").captions
    bert = write_tiny_bert(tmp_path / "bert", captions)
    vocab = (bert / "vocab.txt").read_text().splitlines()
    vocab.remove("[PAD]")
    vocab.insert(7, "[PAD]")  # pad id 7, not 0
    padded = write_tiny_bert(tmp_path / "pad7", [])
    (padded / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (padded / "tokenizer.json").unlink()  # rebuilt from vocab.txt
    tokenizer = PretrainedTokenizer.from_pretrained(str(padded), max_length=64)
    assert tokenizer.pad_id == 7
    task = PairTask(open_split(tiny_root / "tiny", "train"), tokenizer)
    batch = task.collate([task.dataset[c] for c in range(8)])
    tokens, lengths = batch["tokens"], batch["lengths"]
    assert len(set(lengths.tolist())) > 1
    for row, n in enumerate(lengths.tolist()):
        assert (tokens[row, n:] == 7).all() and 7 not in tokens[row, :n].tolist()


def test_a_text_model_that_is_not_there_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for name, message in [(str(tmp_path / "nope"), "no such folder"),
                          ("./models/bert-base-uncased", "no such folder"),
                          (str(tmp_path / "empty"), "has no config.json"),
                          ("", "model.text_model is empty")]:
        with pytest.raises(UserError, match=message) as caught:
            resolve_text_model(name)
        assert "\n" not in str(caught.value)
    assert resolve_text_model("bert-base-uncased") == "bert-base-uncased"  # a hub name
    with pytest.raises(UserError, match="checkpoint: its stored tokenizer cannot be rebuilt"):
        tokenizer_from_json({"format": "aoq-hf-tokenizer", "files": {}})


@pytest.fixture
def hub_loads(monkeypatch):
    """Every ``from_pretrained`` call of the Auto classes that may go to the network (no
    ``local_files_only``), recorded and refused at once (no retries)."""
    import transformers

    calls = []
    for name in ("AutoConfig", "AutoModel", "AutoTokenizer"):
        cls = getattr(transformers, name)
        real = cls.from_pretrained.__func__

        def load(cls, where, *args, _real=real, **kwargs):
            if not kwargs.get("local_files_only"):
                calls.append((cls.__name__, where))
                raise OSError(f"network reached for {where}")
            return _real(cls, where, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(load))
    return calls


def test_an_uncached_hub_name_fails_at_once_when_offline(hub_loads, monkeypatch):
    from transformers import AutoModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "aoq-tests/no-such-text-model"
    with pytest.raises(UserError, match=f"text model {name}: not in the Hugging Face cache, "
                       "and HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE say offline") as caught:
        PretrainedTokenizer.from_pretrained(name, 16)
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="say offline"):  # the weights, as training
        from_folder_or_hub(AutoModel, name)
    assert hub_loads == []
    # Online (the default), a name missing from the cache goes to the network (refused
    # here, so still an error).
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(UserError, match=f"text model {name}: cannot be loaded"):
        PretrainedTokenizer.from_pretrained(name, 16)
    assert hub_loads == [("AutoTokenizer", name)]


@pytest.mark.parametrize("hub, transformers, allowed", [
    (None, None, True), ("0", None, True), ("1", None, False), ("true", None, False),
    ("0", "1", False), (None, "yes", False)])
def test_hugging_face_offline_switches_stop_downloads(monkeypatch, hub, transformers,
                                                      allowed):
    for variable, value in [("HF_HUB_OFFLINE", hub), ("TRANSFORMERS_OFFLINE", transformers)]:
        if value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, value)
    assert downloads_allowed() is allowed
