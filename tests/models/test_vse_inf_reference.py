"""VSE-infinity against a port of its reference code: GPO, the image encoder (unpadded, and
padded with batch-norm statistics over the padding as the reference, ``bn_padding``), the
BiGRU text encoder, the caption augmentation, region dropping, the last batch dropped, the
hinge loss and its warm-up, and the shipped schedule; the same weights in both, random
inputs, values and gradients compared.

The ports below are woodfrog/vse_infty, branch ``bigru`` at commit
8600f891e143bda1a33d2228999d0d4c63acd4fd (``lib/encoders.py``, ``lib/modules/aggr/gpo.py``,
``lib/modules/mlp.py``, ``lib/datasets/image_caption.py``, ``lib/loss.py``, ``lib/vocab.py``,
``train.py``, ``arguments.py``, ``train_region.sh``) brought to current torch (no
``Variable``, no ``.cuda()``), otherwise line for line. Tolerance: :mod:`tests.models.closeness`
(float64: rtol and atol 1e-7; float32: a relative error of 1e-4 in the Frobenius norm).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from stages.data.vocab import Vocab
from stages.losses import build_loss
from stages.models import build_model
from stages.models.caption_augment import augment_captions
from stages.models.encode import encode_split
from stages.models.gpo import GPO
from stages.models.vse_inf import drop_regions, prefix_mask
from stages.training.batches import epoch_batches
from tests.models.closeness import DTYPES, assert_near, assert_same_grads, randomise_norms


# --- the reference, ported -----------------------------------------------------------------
def ref_l2norm(X, dim, eps=1e-8):
    """lib/encoders.py, l2norm."""
    norm = torch.pow(X, 2).sum(dim=dim, keepdim=True).sqrt() + eps
    X = torch.div(X, norm)
    return X


def ref_positional_encoding_1d(d_model, length):
    """lib/modules/aggr/gpo.py, positional_encoding_1d."""
    pe = torch.zeros(length, d_model)
    position = torch.arange(0, length).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float) *
                          -(math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position.float() * div_term)
    pe[:, 1::2] = torch.cos(position.float() * div_term)
    return pe


class RefGPO(nn.Module):
    """lib/modules/aggr/gpo.py, GPO."""

    def __init__(self, d_pe, d_hidden):
        super().__init__()
        self.d_pe = d_pe
        self.d_hidden = d_hidden
        self.gru = nn.GRU(self.d_pe, d_hidden, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(self.d_hidden, 1, bias=False)

    def compute_pool_weights(self, lengths, features):
        max_len = int(lengths.max())
        pe_max_len = ref_positional_encoding_1d(self.d_pe, max_len).to(features.dtype)
        pes = pe_max_len.unsqueeze(0).repeat(lengths.size(0), 1, 1)
        mask = torch.arange(max_len).expand(lengths.size(0), max_len)
        mask = (mask < lengths.long().unsqueeze(1)).unsqueeze(-1)
        pes = pes.masked_fill(mask == 0, 0)
        packed = pack_padded_sequence(pes, lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.gru(packed)
        padded = pad_packed_sequence(out, batch_first=True)
        out_emb, out_len = padded
        out_emb = (out_emb[:, :, :out_emb.size(2) // 2] + out_emb[:, :, out_emb.size(2) // 2:]) / 2
        scores = self.linear(out_emb)
        scores[torch.where(mask == 0)] = -10000
        weights = torch.softmax(scores / 0.1, 1)
        return weights, mask

    def forward(self, features, lengths):
        pool_weights, mask = self.compute_pool_weights(lengths, features)
        features = features[:, :int(lengths.max()), :]
        sorted_features = features.masked_fill(mask == 0, -10000)
        sorted_features = sorted_features.sort(dim=1, descending=True)[0]
        sorted_features = sorted_features.masked_fill(mask == 0, 0)
        pooled_features = (sorted_features * pool_weights).sum(1)
        return pooled_features, pool_weights


class RefMLP(nn.Module):
    """lib/modules/mlp.py, MLP (its second batch norm is built and never used)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        self.output_dim = output_dim
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h,
                                                                    h + [output_dim],
                                                                    strict=True))
        self.bns = nn.ModuleList(nn.BatchNorm1d(k) for k in h + [output_dim])

    def forward(self, x):
        B, N, D = x.size()
        x = x.reshape(B * N, D)
        for i, (bn, layer) in enumerate(zip(self.bns, self.layers, strict=True)):
            x = F.relu(bn(layer(x))) if i < self.num_layers - 1 else layer(x)
        x = x.view(B, N, self.output_dim)
        return x


class RefEncoderImageAggr(nn.Module):
    """lib/encoders.py, EncoderImageAggr (precomp_enc_type 'basic')."""

    def __init__(self, img_dim, embed_size):
        super().__init__()
        self.fc = nn.Linear(img_dim, embed_size)
        self.mlp = RefMLP(img_dim, embed_size // 2, embed_size, 2)
        self.gpool = RefGPO(32, 32)

    def forward(self, images, image_lengths):
        features = self.fc(images)
        features = self.mlp(images) + features
        features, pool_weights = self.gpool(features, image_lengths)
        features = ref_l2norm(features, dim=-1)
        return features


class RefEncoderText(nn.Module):
    """lib/encoders.py, EncoderText (BiGRU); captions sorted by decreasing length, as the
    reference's collate_fn gives them."""

    def __init__(self, vocab_size, embed_size, word_dim, num_layers):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.gpool = RefGPO(32, 32)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True,
                          bidirectional=True)

    def forward(self, x, lengths):
        x_emb = self.embed(x)
        packed = pack_padded_sequence(x_emb, lengths.cpu(), batch_first=True)
        out, _ = self.rnn(packed)
        padded = pad_packed_sequence(out, batch_first=True)
        cap_emb, cap_len = padded
        cap_emb = (cap_emb[:, :, :cap_emb.size(2) // 2] + cap_emb[:, :, cap_emb.size(2) // 2:]) / 2
        pooled_features, pool_weights = self.gpool(cap_emb, cap_len.to(cap_emb.device))
        pooled_features = ref_l2norm(pooled_features, dim=-1)
        return pooled_features


class RefVocabulary:
    """lib/vocab.py, Vocabulary, as train.py loads it: SCAN's words, then ``<mask>`` added."""

    def __init__(self, words):
        self.word2idx = {}
        for word in [*words, "<mask>"]:
            self.word2idx.setdefault(word, len(self.word2idx))

    def __call__(self, word):
        if word not in self.word2idx:
            return self.word2idx['<unk>']
        return self.word2idx[word]

    def __len__(self):
        return len(self.word2idx)


def ref_process_caption(vocab, tokens, random, drop=True):
    """lib/datasets/image_caption.py, process_caption, on the caption's word tokens (its
    nltk.word_tokenize(caption.lower()) done) and with ``random`` the module it draws from."""
    if not drop:
        caption = [vocab('<start>'), *[vocab(token) for token in tokens], vocab('<end>')]
        return torch.Tensor(caption)
    tokens = ['<start>', *tokens, '<end>']
    deleted_idx = []
    for i, token in enumerate(tokens):
        prob = random.random()
        if prob < 0.20:
            prob /= 0.20
            if prob < 0.5:
                tokens[i] = vocab.word2idx['<mask>']
            elif prob < 0.6:
                tokens[i] = random.randrange(len(vocab))
            else:
                tokens[i] = vocab(token)
                deleted_idx.append(i)
        else:
            tokens[i] = vocab(token)
    if len(deleted_idx) != 0:
        tokens = [tokens[i] for i in range(len(tokens)) if i not in deleted_idx]
    return torch.Tensor(tokens)


def ref_collate_regions(images):
    """lib/datasets/image_caption.py, collate_fn's region branch: sets of (n_b, D) padded
    with zeros to the largest -> (B, K, D), lengths (B,)."""
    img_lengths = [len(image) for image in images]
    all_images = torch.zeros(len(images), max(img_lengths), images[0].size(-1),
                             dtype=images[0].dtype)
    for i, image in enumerate(images):
        end = img_lengths[i]
        all_images[i, :end] = image[:end]
    return all_images, torch.tensor(img_lengths)


def ref_drop_regions(image, rand_list):
    """PrecompRegionDataset.__getitem__'s size augmentation, given its draws."""
    return image[np.where(rand_list > 0.20)]


class RefContrastiveLoss(nn.Module):
    """lib/loss.py, ContrastiveLoss (max_violation switched on by train.py once the epoch
    reaches vse_mean_warmup_epochs)."""

    def __init__(self, margin=0, max_violation=False):
        super().__init__()
        self.margin = margin
        self.max_violation = max_violation

    def forward(self, im, s):
        scores = im.mm(s.t())
        diagonal = scores.diag().view(im.size(0), 1)
        d1 = diagonal.expand_as(scores)
        d2 = diagonal.t().expand_as(scores)
        cost_s = (self.margin + scores - d1).clamp(min=0)
        cost_im = (self.margin + scores - d2).clamp(min=0)
        mask = torch.eye(scores.size(0)) > .5
        cost_s = cost_s.masked_fill_(mask, 0)
        cost_im = cost_im.masked_fill_(mask, 0)
        if self.max_violation:
            cost_s = cost_s.max(1)[0]
            cost_im = cost_im.max(0)[0]
        return cost_s.sum() + cost_im.sum()


# train_region.sh and arguments.py (the values the script does not set)
REFERENCE_SCHEDULE = {"num_epochs": 25, "lr_update": 15, "learning_rate": 5e-4,
                      "embed_size": 1024, "vse_mean_warmup_epochs": 1, "margin": 0.2,
                      "batch_size": 128, "word_dim": 300, "num_layers": 1, "grad_clip": 2.0}


# --- weights ------------------------------------------------------------------------------------
def image_ref_name(name: str) -> str:
    """Our RegionEncoder's names -> EncoderImageAggr's (mlp: Linear, BatchNorm, ReLU, Linear
    -> layers.0, bns.0, layers.1)."""
    fixed = {"mlp.0": "mlp.layers.0", "mlp.1": "mlp.bns.0", "mlp.3": "mlp.layers.1"}
    for ours, theirs in fixed.items():
        if name.startswith(ours + "."):
            return theirs + name[len(ours):]
    return name.replace("gpo.", "gpool.")


def text_ref_name(name: str) -> str:
    return name.replace("gpo.", "gpool.")


def load_into_reference(ours: nn.Module, reference: nn.Module, rename) -> None:
    """The reference gets our weights (its unused second MLP batch norm keeps its own)."""
    missing = reference.load_state_dict({rename(k): v for k, v in ours.state_dict().items()},
                                        strict=False).missing_keys
    assert all(k.startswith("mlp.bns.1.") for k in missing), missing


def _model(**options):
    torch.manual_seed(0)
    return build_model("vse_inf", {"embed_size": 16, "word_dim": 8, "region_drop": 0.0,
                                   **options}, img_dim=12, vocab_size=30)


# --- GPO -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpo_equals_the_reference(dtype):
    torch.manual_seed(0)
    ours = GPO().to(dtype)
    ref = RefGPO(32, 32).to(dtype)
    ref.load_state_dict(ours.state_dict())
    lengths = torch.tensor([7, 3, 1, 5, 3, 2])
    features = torch.randn(6, 7, 5, dtype=dtype, requires_grad=True)
    ref_features = features.detach().clone().requires_grad_(True)
    pooled = ours(features, prefix_mask(lengths, 7))
    ref_pooled, _ = ref(ref_features, lengths)
    assert_near(pooled, ref_pooled, "pooled")
    w = torch.randn(pooled.shape, dtype=dtype)
    (pooled * w).sum().backward()
    (ref_pooled * w).sum().backward()
    assert_near(features.grad, ref_features.grad, "features")
    assert_same_grads(ours, str, ref)


# --- the image encoder ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bn_padding", [False, True])
def test_image_encoder_without_padding_equals_the_reference(bn_padding, dtype):
    """Every set full (no padding): both batch-norm choices are the reference, in train mode
    (batch statistics; running statistics updated alike) and in eval mode."""
    model = _model(bn_padding=bn_padding)
    ours = model.image_encoder
    randomise_norms(ours)
    ref = RefEncoderImageAggr(12, 16)
    load_into_reference(ours, ref, image_ref_name)
    model.to(dtype)
    ref.to(dtype)
    for mode in (True, False):
        model.train(mode)
        ref.train(mode)
        images = torch.randn(5, 9, 12, dtype=dtype, requires_grad=True)
        ref_images = images.detach().clone().requires_grad_(True)
        emb = model.encode_images(images, torch.full((5,), 9))
        ref_emb = ref(ref_images, torch.full((5,), 9))
        assert_near(emb, ref_emb, "embedding")
        w = torch.randn(emb.shape, dtype=dtype)
        ours.zero_grad()
        ref.zero_grad()
        (emb * w).sum().backward()
        (ref_emb * w).sum().backward()
        assert_near(images.grad, ref_images.grad, "images")
        assert_same_grads(ours, image_ref_name, ref)
        theirs = ref.state_dict()
        for name, value in ours.state_dict().items():
            assert_near(value, theirs[image_ref_name(name)], name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_image_encoder_with_padding_counts_it_in_batch_norm_as_the_reference(dtype):
    """Sets of different sizes (the reference pads them with zeros to the largest): with
    ``bn_padding`` the batch statistics include the padding rows, as the reference's, in
    values, gradients and running statistics; our default leaves them out (another
    embedding in training, the same with the running statistics in eval mode)."""
    model = _model(bn_padding=True)
    default = _model(bn_padding=False)
    randomise_norms(model.image_encoder)
    default.load_state_dict(model.state_dict())
    ref = RefEncoderImageAggr(12, 16)
    load_into_reference(model.image_encoder, ref, image_ref_name)
    for m in (model, default, ref):
        m.to(dtype)
    lengths = [9, 4, 7, 2, 9]
    sets = [torch.randn(n, 12, dtype=dtype) for n in lengths]
    ref_images, ref_lengths = ref_collate_regions(sets)
    ours_images = torch.full((5, 11, 12), float("nan"), dtype=dtype)  # stored width 11
    for b, s in enumerate(sets):
        ours_images[b, :len(s)] = s
    ours_images.requires_grad_(True)
    ref_images.requires_grad_(True)
    regions = torch.tensor(lengths)
    for mode in (True, False):
        for m in (model, default, ref):
            m.train(mode)
        emb = model.encode_images(ours_images, regions)
        ref_emb = ref(ref_images, ref_lengths)
        assert_near(emb, ref_emb, "embedding")
        if mode:
            w = torch.randn(emb.shape, dtype=dtype)
            (emb * w).sum().backward()
            (ref_emb * w).sum().backward()
            valid = prefix_mask(regions, 11)
            assert_near(ours_images.grad[valid], ref_images.grad[prefix_mask(regions, 9)],
                        "images")
            assert not torch.isnan(ours_images.grad).any()
            assert_same_grads(model.image_encoder, image_ref_name, ref)
            other = default.encode_images(ours_images, regions)
            assert (other - ref_emb).norm() > 1e-3  # the default's choice differs here
        else:  # the same running statistics: the same embedding
            default.load_state_dict(model.state_dict())
            assert_near(default.encode_images(ours_images, regions), ref_emb, "eval")
    theirs = ref.state_dict()
    for name, value in model.image_encoder.state_dict().items():  # running statistics
        assert_near(value, theirs[image_ref_name(name)], name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropped_regions_are_the_references_packed_sets(dtype):
    """With regions dropped (a mask with holes), the reference's batch: each set's kept
    regions in their order, zero-padded to the largest; batch statistics over it all."""
    model = _model(bn_padding=True).to(dtype).train()
    ref = RefEncoderImageAggr(12, 16)
    load_into_reference(model.image_encoder, ref, image_ref_name)
    ref.to(dtype).train()
    images = torch.randn(4, 10, 12, dtype=dtype)
    draws = np.random.default_rng(0).random((4, 10))
    kept = [ref_drop_regions(images[b], draws[b]) for b in range(4)]
    mask = torch.from_numpy(draws > 0.2)
    emb = model.image_encoder(images, mask)
    ref_emb = ref(*ref_collate_regions(kept))
    assert_near(emb, ref_emb, "embedding")


def test_region_dropping_keeps_what_the_reference_keeps():
    """The same uniform draws keep the same regions (the reference keeps a region whose
    draw exceeds 0.2; an exact 0.2 is the only difference)."""
    mask = torch.ones(50, 36, dtype=torch.bool)
    torch.manual_seed(3)
    draws = torch.rand(mask.shape)
    torch.manual_seed(3)
    kept = drop_regions(mask, 0.2)
    images = torch.arange(36.0)[:, None]
    for b in range(50):
        expected = ref_drop_regions(images, draws[b].numpy())
        assert torch.equal(images[kept[b]], expected)


# --- the text encoder ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_text_encoder_equals_the_reference(dtype):
    """In eval mode (no caption augmentation); the word embedding's extra row is <mask>."""
    model = _model().eval()
    ours = model.text_encoder
    ref = RefEncoderText(31, 16, 8, 1)
    load_into_reference(ours, ref, text_ref_name)
    model.to(dtype)
    ref.to(dtype)
    lengths = torch.tensor([9, 7, 7, 4, 2])  # sorted: the reference packs them so
    tokens = torch.zeros(5, 9, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        tokens[b, :n] = torch.randint(1, 31, (n,))
    emb = model.encode_captions(tokens, lengths)
    ref_emb = ref(tokens, lengths)
    assert_near(emb, ref_emb, "embedding")
    w = torch.randn(emb.shape, dtype=dtype)
    (emb * w).sum().backward()
    (ref_emb * w).sum().backward()
    assert_same_grads(ours, text_ref_name, ref)


# --- the caption augmentation --------------------------------------------------------------------
class ScriptedRandom:
    """Stands in for Python's ``random`` in the reference: ``random()`` returns the next of
    ``which``, ``randrange(n)`` the current token's ``floor(pick * n)``."""

    def __init__(self, which, pick):
        self.which, self.pick, self.i = list(which), list(pick), -1

    def random(self):
        self.i += 1
        return self.which[self.i]

    def randrange(self, n):
        return int(self.pick[self.i] * n)


WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "runs", "on", "the", "grass",
         "red", "ball", "man"]


def test_caption_augmentation_equals_process_caption_given_the_same_draws():
    """Captions as token lists (unknown words included), each with its own draws: masks,
    random tokens (<mask> and the specials among them), deletions, <start> and <end>
    altered too; our batch and the reference caption by caption give the same ids."""
    vocab = Vocab(WORDS)
    ref_vocab = RefVocabulary(WORDS)
    assert len(ref_vocab) == len(vocab) + 1 and ref_vocab.word2idx["<mask>"] == len(vocab)
    captions = ["a dog runs on the grass", "the man", "a red ball on the grass near a dog",
                "zebra", "a a a a a a a a a a"]
    gen = np.random.default_rng(0)
    encoded = [torch.tensor(vocab.encode(c)) for c in captions]
    lengths = torch.tensor([len(e) for e in encoded])
    tokens = torch.zeros(len(captions), int(lengths.max()), dtype=torch.long)
    for b, e in enumerate(encoded):
        tokens[b, :len(e)] = e
    seen = set()
    for _ in range(40):
        which = torch.from_numpy(gen.random(tokens.shape) ** 3)  # alterations common
        pick = torch.from_numpy(gen.random(tokens.shape))
        out, out_lengths = augment_captions(tokens, lengths, 0.2, len(vocab), len(vocab) + 1,
                                            draws=(which, pick))
        for b, caption in enumerate(captions):
            n = int(lengths[b])
            expected = ref_process_caption(ref_vocab, caption.split(),
                                           ScriptedRandom(which[b, :n], pick[b, :n])).long()
            if len(expected) == 0:  # the reference would fail; ours keeps the caption
                assert torch.equal(out[b, :out_lengths[b]], tokens[b, :n])
                continue
            assert torch.equal(out[b, :out_lengths[b]], expected), (caption, b)
            assert bool((out[b, out_lengths[b]:] == 0).all())
            seen.update(("mask" if t == len(vocab) else "special" if t < 4 else "word")
                        for t in expected.tolist())
            seen.add("shorter" if len(expected) < n else "same length")
    assert seen >= {"mask", "special", "word", "shorter", "same length"}


def test_caption_augmentation_rates_match_the_reference():
    """Over 200,000 tokens (seeded): 10% masked, 2% replaced at random, 8% deleted, as the
    reference's draws give (its port run with Python's random, seeded)."""
    import random

    vocab = Vocab(WORDS)
    tokens = torch.randint(4, len(WORDS), (20000, 10))
    lengths = torch.full((20000,), 10)
    torch.manual_seed(0)
    which = torch.rand(tokens.shape)
    torch.manual_seed(0)
    out, new_lengths = augment_captions(tokens, lengths, 0.2, len(vocab), len(vocab) + 1)
    total = tokens.numel()
    deleted = 1 - float(new_lengths.sum()) / total
    masked = float((out == len(vocab)).sum()) / total
    assert deleted == pytest.approx(float(((which < 0.2) & (which >= 0.12)).float().mean()))
    random.seed(0)
    ref_vocab = RefVocabulary(WORDS)
    ref_ids = [ref_process_caption(ref_vocab, ["dog"] * 8, random) for _ in range(20000)]
    ref_deleted = 1 - sum(len(r) for r in ref_ids) / total
    ref_masked = sum(int((r == len(vocab)).sum()) for r in ref_ids) / total
    for ours, theirs, rate in ((deleted, ref_deleted, 0.08), (masked, ref_masked, 0.10)):
        assert ours == pytest.approx(rate, abs=0.003)
        assert theirs == pytest.approx(rate, abs=0.003)


def test_caption_augmentation_only_in_training(tiny_root):
    """Eval mode (validation, evaluation, the embedding that mines candidates: every
    encode_split call) reads captions as they are; training mode alters them, fresh draws
    each call."""
    from stages.data.dataset import open_split
    from stages.models.restore import model_from_checkpoint

    vocab = Vocab.load(tiny_root / "tiny" / "vocab.json")
    model = build_model("vse_inf", {"embed_size": 16, "word_dim": 8}, img_dim=32,
                        vocab_size=len(vocab))
    plain = build_model("vse_inf", {"embed_size": 16, "word_dim": 8, "caption_aug": 0.0},
                        img_dim=32, vocab_size=len(vocab))
    state = {k: v for k, v in model.state_dict().items() if k != "text_encoder.embed.weight"}
    plain.load_state_dict({**state, "text_encoder.embed.weight":
                           model.state_dict()["text_encoder.embed.weight"][:len(vocab)]})
    assert model.text_encoder.embed.num_embeddings == len(vocab) + 1
    tokens = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 2], [1, 5, 6, 2, 0, 0, 0, 0]])
    lengths = torch.tensor([8, 4])
    model.eval()
    torch.testing.assert_close(model.encode_captions(tokens, lengths),
                               plain.eval().encode_captions(tokens, lengths))
    model.train()
    torch.manual_seed(1)
    first = model.encode_captions(tokens.repeat(20, 1), lengths.repeat(20))
    assert not torch.allclose(first, plain.eval().encode_captions(tokens.repeat(20, 1),
                                                                   lengths.repeat(20)))
    split = open_split(tiny_root / "tiny", "dev")
    _, caps = encode_split(model, split, vocab, torch.device("cpu"))
    _, expected = encode_split(plain, split, vocab, torch.device("cpu"))
    np.testing.assert_allclose(caps, expected, rtol=1e-5, atol=1e-6)
    assert model.training  # encode_split gives the model back in its mode
    # A checkpoint from before caption_aug (no such argument) is rebuilt without it.
    spec = {"name": "vse_inf", "args": {k: v for k, v in {
        "img_dim": 32, "vocab_size": len(vocab), "embed_size": 16, "word_dim": 8,
        "num_layers": 1, "region_drop": 0.2, "word_vectors": ""}.items()}}
    old, _ = model_from_checkpoint({"model": spec, "state_dict": plain.state_dict(),
                                    "vocab": vocab.to_json()})
    assert old.caption_aug == 0.0 and old.text_encoder.embed.num_embeddings == len(vocab)


# --- the loader: the last batch ------------------------------------------------------------------
def test_drop_last_gives_the_reference_loaders_batches():
    """get_loader(train=True): torch's DataLoader with drop_last=True; ours the same batch
    sizes (the order is ours), every item once at most."""
    for num, batch in ((200, 16), (256, 16), (15, 16), (1000, 128)):
        loader = torch.utils.data.DataLoader(range(num), batch_size=batch, shuffle=True,
                                             drop_last=True)
        ours = epoch_batches(num, batch, seed=0, epoch=0, drop_last=True)
        assert [len(b) for b in ours] == [len(b) for b in loader]
        flat = [i for b in ours for i in b]
        assert len(set(flat)) == len(flat)
        assert len(epoch_batches(num, batch, 0, 0)) == -(-num // batch)  # the default keeps it


# --- the hinge loss and its warm-up ------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_hinge_loss_and_warmup_equal_the_reference(dtype):
    """vse_max with warmup_epochs=1: epoch 0 the sum of violations, from epoch 1 the
    hardest negative (train.py: max_violation once epoch >= vse_mean_warmup_epochs)."""
    ours = build_loss("vse_max", {"margin": 0.2, "warmup_epochs": 1})
    gen = torch.Generator().manual_seed(0)
    for epoch in range(3):
        ref = RefContrastiveLoss(margin=0.2, max_violation=epoch >= 1)
        ours.set_epoch(epoch)
        img = F.normalize(torch.randn(8, 6, generator=gen, dtype=dtype), dim=1)
        cap = F.normalize(torch.randn(8, 6, generator=gen, dtype=dtype), dim=1)
        img.requires_grad_(True)
        cap.requires_grad_(True)
        ref_img, ref_cap = (x.detach().clone().requires_grad_(True) for x in (img, cap))
        loss = sum(ours(img, cap, torch.arange(8)).values())
        ref_loss = ref(ref_img, ref_cap)
        assert_near(loss, ref_loss, f"epoch {epoch}")
        loss.backward()
        ref_loss.backward()
        assert_near(img.grad, ref_img.grad, "images")
        assert_near(cap.grad, ref_cap.grad, "captions")


# --- the schedule -------------------------------------------------------------------------------
def test_shipped_config_is_the_reference_recipe():
    from stages.config.sections import load_config

    c = load_config(["configs/model/vse_inf.yaml"])
    m, t, loss = c.model.options(), c.train, c.loss.options()
    ref = REFERENCE_SCHEDULE
    assert (t.epochs, t.lr_update, t.lr, t.batch_size, t.grad_clip, t.lr_decay) == (
        ref["num_epochs"], ref["lr_update"], ref["learning_rate"], ref["batch_size"],
        ref["grad_clip"], 0.1)
    assert (m["embed_size"], m["word_dim"], m["num_layers"]) == (
        ref["embed_size"], ref["word_dim"], ref["num_layers"])
    assert (c.loss.name, loss["margin"], loss["warmup_epochs"]) == (
        "vse_max", ref["margin"], ref["vse_mean_warmup_epochs"])
    # vse.py: AdamW(params, lr) with torch's default weight decay; the training loader
    # (drop_last, 20% of regions dropped, 20% of tokens altered, padding in batch norm);
    # train.py keeps the best rsum (R@1+5+10 both ways).
    assert (t.optimizer, t.weight_decay) == ("adamw", 0.01)
    assert torch.optim.AdamW([nn.Parameter(torch.ones(1))]).defaults["weight_decay"] == 0.01
    assert (t.drop_last, m["region_drop"], m["caption_aug"], m["bn_padding"], t.select) == (
        True, 0.2, 0.2, True, "rsum")
