"""vse_transformer on a tiny random-weight BERT: pooling against the bare Hugging Face model,
freezing, the text learning-rate scale, the frozen-encoder cache."""

import pytest
import torch

from stages.config.sections import MemoryConfig, TrainConfig
from stages.data.dataset import open_split
from stages.losses import build_loss
from stages.models.encode import encode_split
from stages.training.loop import Trainer, build_optimizer
from stages.training.tasks import PairTask
from tests.models.text_tower import batch_of, build, count_encoder_calls, tiny_bert_for

CAPTIONS = ["a red cube left of a blue ball .", "the dog", "a photo of a black horse near a "
            "tree at the field , the horse is black .", "two cats on a mat"]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooling_equals_the_bare_model_caption_by_caption(tiny_root, pooling):
    from transformers import BertModel

    bert = tiny_bert_for(tiny_root)
    model, tokenizer = build(bert, text_pooling=pooling)
    model.eval()
    tokens, lengths = batch_of(tokenizer, CAPTIONS)
    assert tokenizer.pad_id == 0 and tokens.shape[0] == 4 and len(set(lengths.tolist())) == 4
    with torch.no_grad():
        pooled = model.text_encoder.pooled(tokens, lengths)
        emb = model.encode_captions(tokens, lengths)
    bare = BertModel.from_pretrained(bert).eval()
    for row, n in enumerate(lengths.tolist()):  # each caption alone, unpadded
        with torch.no_grad():
            hidden = bare(input_ids=tokens[row:row + 1, :n]).last_hidden_state[0]
        expected = hidden[0] if pooling == "cls" else hidden.mean(0)
        torch.testing.assert_close(pooled[row], expected, atol=1e-5, rtol=1e-4)
    assert emb.shape == (4, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    images = model.encode_images(torch.randn(4, 3, 32), torch.tensor([3, 1, 2, 3]))
    assert images.shape == (4, 16)


def test_a_model_without_its_pretrained_weights_differs(tiny_root):
    bert = tiny_bert_for(tiny_root)
    loaded, tokenizer = build(bert)
    fresh, _ = build(bert, tokenizer, load=False)
    tokens, lengths = batch_of(tokenizer, CAPTIONS)
    with torch.no_grad():
        assert not torch.allclose(loaded.eval().text_encoder.pooled(tokens, lengths),
                                  fresh.eval().text_encoder.pooled(tokens, lengths))


def trainer_step(tiny_root, model, tokenizer, tmp_path):
    """One Trainer step on a batch of 16 tiny training pairs; returns the weights before."""
    task = PairTask(open_split(tiny_root / "tiny", "train"), tokenizer)
    batch = task.collate([task.dataset[c] for c in range(16)])
    trainer = Trainer(model, build_loss("vse_max", {}), task, TrainConfig(lr=1e-2),
                      MemoryConfig(), torch.device("cpu"), tmp_path, validate=None,
                      checkpoint_info={})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    trainer.step(batch)
    return before, trainer


def test_freezing_the_first_layers_fixes_them_and_only_them(tiny_root, tmp_path):
    bert = tiny_bert_for(tiny_root)
    model, tokenizer = build(bert, text_freeze_layers=1)
    before, trainer = trainer_step(tiny_root, model, tokenizer, tmp_path)
    encoder = model.text_encoder.encoder
    assert not encoder.embeddings.training and not encoder.encoder.layer[0].training
    assert encoder.encoder.layer[1].training  # trainable layers keep their dropout
    for name, param in model.named_parameters():
        frozen = name.startswith(("text_encoder.encoder.embeddings.",
                                  "text_encoder.encoder.encoder.layer.0."))
        assert param.requires_grad is not frozen, name
        if frozen:
            assert param.grad is None, name
            assert torch.equal(param, before[name]), name
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("text_encoder.encoder.encoder.layer.1.") for n in changed)
    assert "text_encoder.proj.weight" in changed and "image_encoder.fc.weight" in changed
    assert model.text_encoder.cache is None  # a partly trained encoder is never cached


def test_freezing_everything_fixes_the_encoder_and_caches_its_outputs(tiny_root, tmp_path):
    bert = tiny_bert_for(tiny_root)
    model, tokenizer = build(bert, text_freeze_layers=-1)
    before, trainer = trainer_step(tiny_root, model, tokenizer, tmp_path)
    encoder = model.text_encoder.encoder
    assert not encoder.training and not any(m.training for m in encoder.modules())
    for name, param in encoder.named_parameters():
        assert not param.requires_grad and param.grad is None, name
        assert torch.equal(param, before[f"text_encoder.encoder.{name}"]), name
    assert not torch.equal(model.text_encoder.proj.weight, before["text_encoder.proj.weight"])
    assert len(model.text_encoder.cache) == 16
    assert len(trainer.optimizer.param_groups) == 1  # no encoder group: nothing to train


def test_freezing_more_layers_than_the_model_has_is_refused(tiny_root):
    bert = tiny_bert_for(tiny_root)
    from stages.core.errors import UserError
    with pytest.raises(UserError, match="text_freeze_layers=3, but the text model .* has 2 "
                                        "layers; give 0 to 2, or -1"):
        build(bert, text_freeze_layers=3)
    with pytest.raises(UserError, match="max_length=65, but .* at most 64 tokens"):
        build(bert, max_length=65)


def test_the_encoder_gets_its_own_learning_rate(tiny_root):
    bert = tiny_bert_for(tiny_root)
    model, _ = build(bert, text_lr_scale=0.1)
    optimizer = build_optimizer(model, build_loss("infonce", {"learnable_temperature": True}),
                                lr=1e-3)
    by_lr: dict[float, set] = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(round(group["lr"], 12), set()).update(map(id, group["params"]))
    encoder = {id(p) for p in model.text_encoder.encoder.parameters()}
    rest = {id(p) for n, p in model.named_parameters()
            if not n.startswith("text_encoder.encoder.")}
    assert by_lr.keys() == {1e-3, 1e-4}
    assert by_lr[1e-4] == encoder
    assert rest < by_lr[1e-3] and len(by_lr[1e-3] - rest) == 1  # + the temperature
    assert {id(p) for p in model.text_encoder.proj.parameters()} <= by_lr[1e-3]


def test_the_cached_frozen_encoder_gives_the_uncached_embeddings(tiny_root):
    bert = tiny_bert_for(tiny_root)
    cached, tokenizer = build(bert, text_freeze_layers=-1)
    uncached, _ = build(bert, tokenizer, text_freeze_layers=-1)
    uncached.load_state_dict(cached.state_dict())
    uncached.text_encoder.cache = None
    split = open_split(tiny_root / "tiny", "train")
    cpu = torch.device("cpu")
    calls = count_encoder_calls(cached)
    expected = encode_split(uncached, split, tokenizer, cpu, batch_size=7)
    first = encode_split(cached, split, tokenizer, cpu, batch_size=7)
    computed = len(calls)
    second = encode_split(cached, split, tokenizer, cpu, batch_size=32)
    assert computed == -(-len(split.captions) // 7) and len(calls) == computed  # all hits
    assert len(cached.text_encoder.cache) == len(set(split.captions))
    for got in (first, second):
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), atol=1e-6,
                                       rtol=1e-5)


def test_new_weights_clear_the_cache(tiny_root):
    bert = tiny_bert_for(tiny_root)
    model, tokenizer = build(bert, text_freeze_layers=-1)
    other, _ = build(tiny_bert_for(tiny_root, "other", seed=1), text_freeze_layers=-1)
    assert model.training and not model.text_encoder.encoder.training  # frozen: no dropout
    tokens, lengths = batch_of(tokenizer, CAPTIONS)
    with torch.no_grad():
        model.encode_captions(tokens, lengths)
        assert len(model.text_encoder.cache) == 4
        model.load_state_dict(other.state_dict())
        assert len(model.text_encoder.cache) == 0
        torch.testing.assert_close(model.encode_captions(tokens, lengths),
                                   other.encode_captions(tokens, lengths))
        model.text_encoder.load_pretrained(str(bert))  # the encoder's own load_state_dict
        assert len(model.text_encoder.cache) == 0
        model.encode_captions(tokens, lengths)
        model.to(torch.float64)
        assert len(model.text_encoder.cache) == 0


class RefBertEncoderText(torch.nn.Module):
    """VSE-infinity's BERT text encoder (woodfrog/vse_infty, master at commit
    29df9d65f0e0b5bac3b6f6e6697a285ff89f52dc, lib/encoders.py, EncoderText), its
    BertModel.from_pretrained given as ``bert`` and its hidden size 768 as ``hidden``; GPO
    and l2norm the ports of tests/models/test_vse_inf_reference.py."""

    def __init__(self, bert, hidden, embed_size):
        super().__init__()
        from tests.models.test_vse_inf_reference import RefGPO

        self.bert = bert
        self.linear = torch.nn.Linear(hidden, embed_size)
        self.gpool = RefGPO(32, 32)

    def forward(self, x, lengths):
        from tests.models.test_vse_inf_reference import ref_l2norm

        bert_attention_mask = (x != 0).float()
        bert_emb = self.bert(x, bert_attention_mask)[0]  # B x N x D
        cap_len = lengths
        cap_emb = self.linear(bert_emb)
        pooled_features, pool_weights = self.gpool(cap_emb, cap_len.to(cap_emb.device))
        pooled_features = ref_l2norm(pooled_features, dim=-1)
        return pooled_features


def test_gpo_pooling_equals_the_reference_bert_encoder(tiny_root):
    """text_pooling=gpo: every token's output projected, pooled by GPO ([CLS] and [SEP]
    included), L2-normalised, as VSE-infinity's BERT encoder; values and gradients in eval
    mode (no dropout), float32, tests/models/closeness.py's tolerance."""
    from transformers import BertModel

    from tests.models.closeness import assert_near, assert_same_grads

    bert = tiny_bert_for(tiny_root)
    model, tokenizer = build(bert, text_pooling="gpo")
    model.eval()
    ours = model.text_encoder
    assert ours.cache is None
    ref = RefBertEncoderText(BertModel.from_pretrained(bert, add_pooling_layer=False), 32, 16)
    ref.linear.load_state_dict(ours.proj.state_dict())
    ref.gpool.load_state_dict(ours.gpo.state_dict())
    ref.bert.load_state_dict(ours.encoder.state_dict())
    ref.eval()
    tokens, lengths = batch_of(tokenizer, CAPTIONS)
    emb = model.encode_captions(tokens, lengths)
    ref_emb = ref(tokens, lengths)
    assert_near(emb, ref_emb, "embedding")
    w = torch.randn(emb.shape)
    (emb * w).sum().backward()
    (ref_emb * w).sum().backward()
    names = {"proj.": "linear.", "gpo.": "gpool.", "encoder.": "bert."}
    assert_same_grads(ours, lambda n: next(names[p] + n[len(p):] for p in names
                                           if n.startswith(p)), ref)
    mean, _ = build(bert, tokenizer, text_pooling="mean")
    mean.load_state_dict(model.state_dict(), strict=False)
    assert not torch.allclose(mean.eval().encode_captions(tokens, lengths), emb, atol=1e-3)


def test_gpo_pooling_with_a_frozen_encoder_trains_without_the_cache(tiny_root, tmp_path):
    bert = tiny_bert_for(tiny_root)
    model, tokenizer = build(bert, text_pooling="gpo", text_freeze_layers=-1)
    assert model.text_encoder.cache is None
    before, _ = trainer_step(tiny_root, model, tokenizer, tmp_path)
    for name in ("text_encoder.proj.weight", "text_encoder.gpo.linear.weight"):
        assert not torch.equal(model.state_dict()[name], before[name]), name
    encoder = model.text_encoder.encoder
    for name, param in encoder.named_parameters():
        assert param.grad is None and torch.equal(param, before[f"text_encoder.encoder.{name}"])
