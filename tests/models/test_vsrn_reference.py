"""VSRN against a port of its reference code: the image encoder (both dataset variants, both
L2-norm axes, train and eval mode), one Rs-GCN layer, the text encoder, the caption loss, the
optimiser's double update of the caption branch and the model selection rule, each with the
same weights loaded into both and random inputs, values and gradients compared.

The ports below are KunpengLi1994/VSRN at commit 777ae74326fdb6abe69dbd3911d0e545322520d1
(``model.py``, ``GCN_lib/Rs_GCN.py``, ``models/EncoderRNN.py``, ``models/DecoderRNN.py``,
``models/Attention.py``, ``models/S2VTAttModel.py``, ``misc/utils.py``, ``data.py``,
``train.py``) brought to current torch (no ``Variable``, no ``.cuda()``, ``nn.init.*_``,
``F.tanh`` -> ``torch.tanh``), otherwise line for line.

Tolerance: :mod:`tests.models.closeness` (float64: rtol and atol 1e-7; float32: a relative
error of 1e-4 in the Frobenius norm), values and gradients alike. In float32 the summation
orders differ (a linear layer against a 1x1 convolution, a GRU cell against a GRU), and
batch norm with trained-like weights amplifies the rounding of four stacked Rs-GCN layers to
about 1e-5.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from stages.models import build_model
from stages.models.caption_decoder import CaptionDecoder
from stages.models.rs_gcn import RsGCN
from stages.training.loop import build_optimizer, selection_score
from stages.training.repeated_updates import clip_gradients, optimizer_step
from tests.models.closeness import DTYPES, assert_near, assert_same_grads, randomise_norms


# --- the reference, ported -----------------------------------------------------------------
def ref_l2norm(X, dim=1):
    """model.py's l2norm (dim 1 always there; ``dim`` lets a test substitute -1)."""
    norm = torch.pow(X, 2).sum(dim=dim, keepdim=True).sqrt()
    X = torch.div(X, norm)
    return X


class RefRsGCN(nn.Module):
    """GCN_lib/Rs_GCN.py, Rs_GCN (bn_layer=True)."""

    def __init__(self, in_channels, inter_channels, bn_layer=True):
        super().__init__()
        self.in_channels = in_channels
        self.inter_channels = inter_channels
        conv_nd = nn.Conv1d
        bn = nn.BatchNorm1d
        self.g = conv_nd(in_channels=self.in_channels, out_channels=self.inter_channels,
                         kernel_size=1, stride=1, padding=0)
        self.W = nn.Sequential(
            conv_nd(in_channels=self.inter_channels, out_channels=self.in_channels,
                    kernel_size=1, stride=1, padding=0),
            bn(self.in_channels))
        nn.init.constant_(self.W[1].weight, 0)
        nn.init.constant_(self.W[1].bias, 0)
        self.theta = conv_nd(in_channels=self.in_channels, out_channels=self.inter_channels,
                             kernel_size=1, stride=1, padding=0)
        self.phi = conv_nd(in_channels=self.in_channels, out_channels=self.inter_channels,
                           kernel_size=1, stride=1, padding=0)

    def forward(self, v):
        """v: (B, D, N)"""
        batch_size = v.size(0)
        g_v = self.g(v).view(batch_size, self.inter_channels, -1)
        g_v = g_v.permute(0, 2, 1)
        theta_v = self.theta(v).view(batch_size, self.inter_channels, -1)
        theta_v = theta_v.permute(0, 2, 1)
        phi_v = self.phi(v).view(batch_size, self.inter_channels, -1)
        R = torch.matmul(theta_v, phi_v)
        N = R.size(-1)
        R_div_C = R / N
        y = torch.matmul(R_div_C, g_v)
        y = y.permute(0, 2, 1).contiguous()
        y = y.view(batch_size, self.inter_channels, *v.size()[2:])
        W_y = self.W(y)
        v_star = W_y + v
        return v_star


class RefEncoderImagePrecompAttn(nn.Module):
    """model.py, EncoderImagePrecompAttn (use_abs and no_imgnorm False); ``norm_dim``
    substitutes the dim of its two region l2norms (the reference's is 1)."""

    def __init__(self, img_dim, embed_size, data_name, norm_dim=1):
        super().__init__()
        self.data_name = data_name
        self.norm_dim = norm_dim
        self.fc = nn.Linear(img_dim, embed_size)
        self.img_rnn = nn.GRU(embed_size, embed_size, 1, batch_first=True)
        self.Rs_GCN_1 = RefRsGCN(in_channels=embed_size, inter_channels=embed_size)
        self.Rs_GCN_2 = RefRsGCN(in_channels=embed_size, inter_channels=embed_size)
        self.Rs_GCN_3 = RefRsGCN(in_channels=embed_size, inter_channels=embed_size)
        self.Rs_GCN_4 = RefRsGCN(in_channels=embed_size, inter_channels=embed_size)
        if self.data_name == 'f30k_precomp':
            self.bn = nn.BatchNorm1d(embed_size)

    def forward(self, images):
        fc_img_emd = self.fc(images)
        if self.data_name != 'f30k_precomp':
            fc_img_emd = ref_l2norm(fc_img_emd, self.norm_dim)
        GCN_img_emd = fc_img_emd.permute(0, 2, 1)
        GCN_img_emd = self.Rs_GCN_1(GCN_img_emd)
        GCN_img_emd = self.Rs_GCN_2(GCN_img_emd)
        GCN_img_emd = self.Rs_GCN_3(GCN_img_emd)
        GCN_img_emd = self.Rs_GCN_4(GCN_img_emd)
        GCN_img_emd = GCN_img_emd.permute(0, 2, 1)
        GCN_img_emd = ref_l2norm(GCN_img_emd, self.norm_dim)
        rnn_img, hidden_state = self.img_rnn(GCN_img_emd)
        features = hidden_state[0]
        if self.data_name == 'f30k_precomp':
            features = self.bn(features)
        features = ref_l2norm(features)
        return features, GCN_img_emd


class RefEncoderText(nn.Module):
    """model.py, EncoderText (VSE++'s; captions sorted by decreasing length, as the
    reference's collate_fn gives them)."""

    def __init__(self, vocab_size, word_dim, embed_size, num_layers):
        super().__init__()
        self.embed_size = embed_size
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True)

    def forward(self, x, lengths):
        x = self.embed(x)
        packed = pack_padded_sequence(x, lengths, batch_first=True)
        out, _ = self.rnn(packed)
        padded = pad_packed_sequence(out, batch_first=True)
        I = torch.LongTensor(lengths).view(-1, 1, 1)  # noqa: E741 (the reference's name)
        I = I.expand(x.size(0), 1, self.embed_size) - 1  # noqa: E741
        out = torch.gather(padded[0], 1, I).squeeze(1)
        out = ref_l2norm(out)
        return out


class RefEncoderRNN(nn.Module):
    """models/EncoderRNN.py (GRU, one layer, not bidirectional)."""

    def __init__(self, dim_vid, dim_hidden, input_dropout_p=0.2, rnn_dropout_p=0.5,
                 n_layers=1):
        super().__init__()
        self.dim_hidden = dim_hidden
        self.vid2hid = nn.Linear(dim_vid, dim_hidden)
        self.input_dropout = nn.Dropout(input_dropout_p)
        with warnings.catch_warnings():  # torch: dropout between layers of a 1-layer GRU
            warnings.simplefilter("ignore", UserWarning)
            self.rnn = nn.GRU(dim_hidden, dim_hidden, n_layers, batch_first=True,
                              dropout=rnn_dropout_p)
        nn.init.xavier_normal_(self.vid2hid.weight)

    def forward(self, vid_feats):
        batch_size, seq_len, dim_vid = vid_feats.size()
        vid_feats = self.vid2hid(vid_feats.view(-1, dim_vid))
        vid_feats = self.input_dropout(vid_feats)
        vid_feats = vid_feats.view(batch_size, seq_len, self.dim_hidden)
        output, hidden = self.rnn(vid_feats)
        return output, hidden


class RefAttention(nn.Module):
    """models/Attention.py."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.linear1 = nn.Linear(dim * 2, dim)
        self.linear2 = nn.Linear(dim, 1, bias=False)

    def forward(self, hidden_state, encoder_outputs):
        batch_size, seq_len, _ = encoder_outputs.size()
        hidden_state = hidden_state.unsqueeze(1).repeat(1, seq_len, 1)
        inputs = torch.cat((encoder_outputs, hidden_state), 2).view(-1, self.dim * 2)
        o = self.linear2(torch.tanh(self.linear1(inputs)))
        e = o.view(batch_size, seq_len)
        alpha = F.softmax(e, dim=1)
        context = torch.bmm(alpha.unsqueeze(1), encoder_outputs).squeeze(1)
        return context


class RefDecoderRNN(nn.Module):
    """models/DecoderRNN.py, train mode (teacher forcing), GRU, not bidirectional."""

    def __init__(self, vocab_size, max_len, dim_hidden, dim_word, input_dropout_p=0.1,
                 rnn_dropout_p=0.1):
        super().__init__()
        self.dim_output = vocab_size
        self.dim_hidden = dim_hidden
        self.max_length = max_len
        self.input_dropout = nn.Dropout(input_dropout_p)
        self.embedding = nn.Embedding(self.dim_output, dim_word)
        self.attention = RefAttention(self.dim_hidden)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.rnn = nn.GRU(self.dim_hidden + dim_word, self.dim_hidden, 1,
                              batch_first=True, dropout=rnn_dropout_p)
        self.out = nn.Linear(self.dim_hidden, self.dim_output)

    def forward(self, encoder_outputs, encoder_hidden, targets):
        decoder_hidden = encoder_hidden
        seq_logprobs = []
        targets_emb = self.embedding(targets)
        for i in range(self.max_length - 1):
            current_words = targets_emb[:, i, :]
            context = self.attention(decoder_hidden.squeeze(0), encoder_outputs)
            decoder_input = torch.cat([current_words, context], dim=1)
            decoder_input = self.input_dropout(decoder_input).unsqueeze(1)
            decoder_output, decoder_hidden = self.rnn(decoder_input, decoder_hidden)
            logprobs = F.log_softmax(self.out(decoder_output.squeeze(1)), dim=1)
            seq_logprobs.append(logprobs.unsqueeze(1))
        return torch.cat(seq_logprobs, 1)


class RefS2VTAttModel(nn.Module):
    """models/S2VTAttModel.py."""

    def __init__(self, encoder, decoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, vid_feats, target_variable):
        encoder_outputs, encoder_hidden = self.encoder(vid_feats)
        return self.decoder(encoder_outputs, encoder_hidden, target_variable)


def ref_language_model_criterion(logits, target, mask):
    """misc/utils.py, LanguageModelCriterion."""
    batch_size = logits.shape[0]
    target = target[:, :logits.shape[1]]
    mask = mask[:, :logits.shape[1]]
    logits = logits.contiguous().view(-1, logits.shape[2])
    target = target.contiguous().view(-1)
    mask = mask.contiguous().view(-1)
    loss = F.nll_loss(logits, target, reduction="none")
    return torch.sum(loss * mask) / batch_size


def ref_caption_label(ids, max_len):
    """data.py, PrecompDataset.__getitem__'s caption model data, on token ids
    (``<start>`` 1 ... ``<end>`` 2; vocab(w) done): gts and mask, (max_len + 1,) each."""
    mask = np.zeros(max_len + 1)
    gts = np.zeros(max_len + 1)
    cap_caption = list(ids)
    if len(cap_caption) > max_len - 1:
        cap_caption = cap_caption[:max_len]
        cap_caption[-1] = 2
    for j, w in enumerate(cap_caption):
        gts[j] = w
    non_zero = (gts == 0).nonzero()
    mask[:int(non_zero[0][0]) + 1] = 1
    return (torch.from_numpy(gts).type(torch.LongTensor),
            torch.from_numpy(mask).type(torch.FloatTensor))


def ref_clip_grad_norm(parameters, max_norm):
    """torch 0.4's clip_grad_norm (what model.py imports), over the list as given."""
    parameters = list(filter(lambda p: p.grad is not None, parameters))
    total_norm = 0
    for p in parameters:
        param_norm = p.grad.data.norm(2)
        total_norm += param_norm ** 2
    total_norm = total_norm ** (1. / 2)
    clip_coef = max_norm / (total_norm + 1e-6)
    if clip_coef < 1:
        for p in parameters:
            p.grad.data.mul_(clip_coef)
    return total_norm


def ref_currscore(r1, r5, r10, r1i, r5i, r10i):
    """train.py, validate: the score the best checkpoint is kept by."""
    return r1 + r5 + r1i + r5i


# --- weights: ours -> the reference's names ------------------------------------------------
GCN_PARTS = {"g": "g", "theta": "theta", "phi": "phi", "w": "W.0", "bn": "W.1"}


def gcn_ref_name(name: str) -> str:
    """An RsGCN layer's parameter name -> Rs_GCN's (``w`` and ``bn`` are its ``W``)."""
    part, rest = name.split(".", 1)
    return f"{GCN_PARTS[part]}.{rest}"


def image_ref_name(name: str) -> str:
    """Our RegionReasoning's state name -> EncoderImagePrecompAttn's."""
    parts = name.split(".")
    if parts[0] == "gcn":
        return f"Rs_GCN_{int(parts[1]) + 1}.{gcn_ref_name('.'.join(parts[2:]))}"
    return f"img_rnn.{parts[1]}" if parts[0] == "rnn" else name


def caption_ref_name(name: str) -> str:
    """Our CaptionDecoder's state name -> RefS2VTAttModel's."""
    fixed = {"proj.weight": "encoder.vid2hid.weight", "proj.bias": "encoder.vid2hid.bias",
             "embed.weight": "decoder.embedding.weight",
             "attn.weight": "decoder.attention.linear1.weight",
             "attn.bias": "decoder.attention.linear1.bias",
             "attn_score.weight": "decoder.attention.linear2.weight",
             "out.weight": "decoder.out.weight", "out.bias": "decoder.out.bias"}
    if name in fixed:
        return fixed[name]
    part, kind = name.split(".")
    return f"encoder.rnn.{kind}" if part == "encoder" else f"decoder.rnn.{kind}_l0"


def state_for_reference(module: nn.Module, rename, reference: nn.Module) -> dict:
    """``module``'s state under the reference's names, shaped as the reference's tensors
    (linear weights as 1x1 convolutions)."""
    theirs = reference.state_dict()
    return {rename(k): v.reshape(theirs[rename(k)].shape)
            for k, v in module.state_dict().items()}


# --- the image encoder -----------------------------------------------------------------------
REGIONS, IMG_DIM, EMBED = 36, 20, 16


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("data_name", ["coco_precomp", "f30k_precomp"])
@pytest.mark.parametrize("axis, ref_dim", [("regions", 1), ("features", -1)])
def test_image_encoder_equals_the_reference(data_name, axis, ref_dim, dtype):
    """Both dataset variants (COCO: L2 norm after the FC; Flickr30K: none there, a batch norm
    on the GRU's state), the reference's norm across regions (dim 1) and the named option
    across features (the reference with dim -1 substituted); train mode (batch statistics,
    running statistics updated) and eval mode; the image embedding and the reasoned regions
    the caption decoder reads, and every gradient."""
    f30k = data_name == "f30k_precomp"
    torch.manual_seed(0)
    model = build_model("vsrn", {"embed_size": EMBED, "word_dim": 6, "caption_hidden": 8,
                                 "caption_word_dim": 5, "region_norm": not f30k,
                                 "img_bn": f30k, "norm_axis": axis},
                        img_dim=IMG_DIM, vocab_size=20)
    ours = model.image_encoder
    randomise_norms(ours)
    ref = RefEncoderImagePrecompAttn(IMG_DIM, EMBED, data_name, norm_dim=ref_dim)
    ref.load_state_dict(state_for_reference(ours, image_ref_name, ref))
    model.to(dtype)
    ref.to(dtype)
    gen = torch.Generator().manual_seed(2)
    for mode in ("train", "eval"):
        model.train(mode == "train")
        ref.train(mode == "train")
        images = torch.randn(5, REGIONS, IMG_DIM, generator=gen, dtype=dtype,
                             requires_grad=True)
        ref_images = images.detach().clone().requires_grad_(True)
        reasoned = ours.reason(images, None)
        emb = ours.pool(reasoned, None, torch.full((5,), REGIONS))
        ref_emb, ref_reasoned = ref(ref_images)
        assert_near(emb, ref_emb)
        assert_near(reasoned, ref_reasoned)
        w_emb = torch.randn(emb.shape, generator=gen, dtype=dtype)
        w_reg = torch.randn(reasoned.shape, generator=gen, dtype=dtype)
        model.zero_grad()
        ((emb * w_emb).sum() + (reasoned * w_reg).sum()).backward()
        ((ref_emb * w_emb).sum() + (ref_reasoned * w_reg).sum()).backward()
        assert_near(images.grad, ref_images.grad)
        assert_same_grads(ours, image_ref_name, ref)
        ref.zero_grad()
        for name, value in state_for_reference(ours, image_ref_name, ref).items():
            assert_near(value, ref.state_dict()[name], name)  # running statistics
    # The axis matters: the other one gives another embedding (30-60% apart on real sizes).
    model.eval()
    other = copy.deepcopy(model)
    other.image_encoder.norm_axis = "features" if axis == "regions" else "regions"
    x = torch.randn(4, REGIONS, IMG_DIM, generator=gen, dtype=dtype)
    n = torch.full((4,), REGIONS)
    assert (model.encode_images(x, n) - other.encode_images(x, n)).norm() > 0.1


def test_norm_across_regions_ignores_padded_regions():
    """Padded regions (beyond regions[b]) take no part in the channel norms: an image
    padded with garbage embeds as the reference embeds it alone, unpadded."""
    torch.manual_seed(0)
    model = build_model("vsrn", {"embed_size": EMBED, "word_dim": 6, "caption_hidden": 8,
                                 "caption_word_dim": 5}, img_dim=IMG_DIM, vocab_size=20).eval()
    randomise_norms(model.image_encoder)
    ref = RefEncoderImagePrecompAttn(IMG_DIM, EMBED, "coco_precomp").eval()
    ref.load_state_dict(state_for_reference(model.image_encoder, image_ref_name, ref))
    images = torch.randn(3, 10, IMG_DIM)
    regions = torch.tensor([10, 4, 7])
    padded = images.clone()
    for b, n in enumerate(regions.tolist()):
        padded[b, n:] = 1e3
    emb = model.encode_images(padded, regions)
    for b, n in enumerate(regions.tolist()):
        assert_near(emb[b], ref(images[b:b + 1, :n])[0][0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_rs_gcn_layer_equals_the_reference(dtype):
    """Train mode (batch statistics) and eval mode, values and gradients."""
    torch.manual_seed(0)
    ours = RsGCN(12)
    randomise_norms(ours)
    ref = RefRsGCN(12, 12)
    ref.load_state_dict(state_for_reference(ours, gcn_ref_name, ref))
    ours.to(dtype)
    ref.to(dtype)
    for mode in (True, False):
        ours.train(mode)
        ref.train(mode)
        v = torch.randn(3, 9, 12, dtype=dtype, requires_grad=True)
        v_ref = v.detach().transpose(1, 2).clone().requires_grad_(True)
        out, ref_out = ours(v), ref(v_ref).transpose(1, 2)
        assert_near(out, ref_out)
        w = torch.randn(out.shape, dtype=dtype)
        ours.zero_grad()
        ref.zero_grad()
        (out * w).sum().backward()
        (ref_out * w).sum().backward()
        assert_near(v.grad, v_ref.grad.transpose(1, 2))
        assert_same_grads(ours, gcn_ref_name, ref)


# --- the text encoder --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_text_encoder_equals_the_reference(dtype):
    torch.manual_seed(0)
    model = build_model("vsrn", {"embed_size": EMBED, "word_dim": 6, "caption_hidden": 8,
                                 "caption_word_dim": 5}, img_dim=IMG_DIM, vocab_size=30)
    ours = model.text_encoder
    ref = RefEncoderText(30, 6, EMBED, 1)
    ref.load_state_dict(ours.state_dict())
    model.to(dtype)
    ref.to(dtype)
    lengths = [9, 7, 7, 4, 2]  # sorted, as the reference's collate_fn gives them
    tokens = torch.zeros(5, 9, dtype=torch.long)
    for b, n in enumerate(lengths):
        tokens[b, :n] = torch.randint(1, 30, (n,))
    emb = model.encode_captions(tokens, torch.tensor(lengths))
    ref_emb = ref(tokens, lengths)
    assert_near(emb, ref_emb)
    w = torch.randn(emb.shape, dtype=dtype)
    (emb * w).sum().backward()
    (ref_emb * w).sum().backward()
    assert_same_grads(ours, str, ref)


# --- the caption loss --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [True, False])
def test_caption_loss_equals_the_reference(train, dtype):
    """The S2VT attention model and its criterion on the reference's labels and masks, with
    dropout on (train: the same seed draws the same dropout masks in both, in the same
    order) and off; captions short, at the cap and over it."""
    max_len, vocab, feat, hidden, word = 7, 15, 8, 6, 5
    torch.manual_seed(0)
    dec = CaptionDecoder(vocab, feat, hidden, word, dropout=0.2, max_len=max_len)
    ref = RefS2VTAttModel(RefEncoderRNN(feat, hidden, input_dropout_p=0.2),
                          RefDecoderRNN(vocab, max_len, hidden, word, input_dropout_p=0.2))
    ref.load_state_dict(state_for_reference(dec, caption_ref_name, ref))
    dec.to(dtype)
    ref.to(dtype)
    dec.train(train)
    ref.train(train)
    lengths = [11, 7, 6, 3]  # over the cap, at it (max_len), one under, short
    tokens = torch.zeros(4, 11, dtype=torch.long)
    for b, n in enumerate(lengths):
        tokens[b, :n] = torch.randint(4, vocab, (n,))
        tokens[b, 0], tokens[b, n - 1] = 1, 2
    labels, masks = zip(*(ref_caption_label(tokens[b, :n].tolist(), max_len)
                          for b, n in enumerate(lengths)), strict=True)
    labels, masks = torch.stack(labels), torch.stack(masks).to(dtype)
    features = torch.randn(4, 5, feat, dtype=dtype, requires_grad=True)
    ref_features = features.detach().clone().requires_grad_(True)
    torch.manual_seed(7)
    loss = dec(features, None, torch.full((4,), 5), tokens, torch.tensor(lengths))
    torch.manual_seed(7)
    ref_loss = ref_language_model_criterion(ref(ref_features, labels), labels[:, 1:],
                                            masks[:, 1:])
    assert_near(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    assert_near(features.grad, ref_features.grad)
    assert_same_grads(dec, caption_ref_name, ref)


# --- the optimiser: the caption branch listed twice ----------------------------------------------
def _reference_optimiser(model, lr):
    """model.py, VSRN.__init__: Adam over txt_enc, img_enc, decoder, encoder and
    caption_model's parameters, the last holding the encoder's and decoder's again (ours: the
    caption decoder module holds both). Current torch's single-tensor Adam steps a listed
    parameter once per listing, in order, as torch 0.4's loop did (it warns about the
    duplicates)."""
    caption = list(model.decoder.parameters())
    params = [*model.text_encoder.parameters(), *model.image_encoder.parameters(),
              *caption, *caption]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return params, torch.optim.Adam(params, lr=lr, foreach=False)


def _training_loss(model, batch, seed):
    """The reference's train_emb loss on ``batch``: VSE++'s max-violation hinge (margin 0.2)
    plus the caption loss; dropout draws from ``seed``."""
    torch.manual_seed(seed)
    out = model(batch)
    scores = out.img_emb @ out.cap_emb.t()
    diagonal = scores.diag().view(-1, 1)
    eye = torch.eye(scores.shape[0], dtype=torch.bool)
    cost_s = (0.2 + scores - diagonal).clamp(min=0).masked_fill(eye, 0).max(1)[0]
    cost_im = (0.2 + scores - diagonal.t()).clamp(min=0).masked_fill(eye, 0).max(0)[0]
    return cost_s.sum() + cost_im.sum() + out.aux_losses["caption"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_caption_double_step_equals_the_reference_optimiser(dtype):
    """Three steps with the gradients clipped (a small grad_clip, so the clip factor is
    below 1 and the caption branch's gradients are scaled by it twice, as torch 0.4's
    clip_grad_norm over the reference's list does): every weight as the reference's
    optimiser leaves it. After the first step the caption branch has moved about twice as
    far as with one update a step (Adam's first two updates are lr each, less where a
    gradient, scaled down twice by the clip, is not large against Adam's eps)."""
    torch.manual_seed(0)
    options = {"embed_size": EMBED, "word_dim": 6, "caption_hidden": 8, "caption_word_dim": 5}
    model = build_model("vsrn", options, img_dim=IMG_DIM, vocab_size=20).to(dtype).train()
    reference = copy.deepcopy(model)
    single = build_model("vsrn", {**options, "caption_double_step": False}, img_dim=IMG_DIM,
                         vocab_size=20).to(dtype).train()
    single.load_state_dict(model.state_dict())
    start = copy.deepcopy(model.state_dict())
    gen = torch.Generator().manual_seed(3)
    lengths = torch.tensor([6, 5, 5, 4])
    tokens = torch.randint(4, 20, (4, 6), generator=gen)
    tokens[:, 0] = 1
    tokens[torch.arange(4), lengths - 1] = 2
    batch = {"images": torch.randn(4, 7, IMG_DIM, generator=gen, dtype=dtype),
             "regions": torch.full((4,), 7), "tokens": tokens, "lengths": lengths}
    lr, clip = 1e-3, 0.05
    ours = build_optimizer(model, nn.Module(), lr)
    plain = build_optimizer(single, nn.Module(), lr)
    assert [g.get("repeats", 1) for g in ours.param_groups] == [1, 2]
    assert [g.get("repeats", 1) for g in plain.param_groups] == [1]
    ref_params, ref_optimiser = _reference_optimiser(reference, lr)
    for step in range(3):
        for net, optimiser in ((model, ours), (single, plain)):
            optimiser.zero_grad(set_to_none=True)
            _training_loss(net, batch, seed=step).backward()
            total = clip_gradients(optimiser.param_groups, clip)
            assert total > clip  # the clip acts
            optimizer_step(optimiser)
        ref_optimiser.zero_grad()
        _training_loss(reference, batch, seed=step).backward()
        ref_clip_grad_norm(ref_params, clip)
        ref_optimiser.step()
        for name, value in model.state_dict().items():
            assert_near(value, reference.state_dict()[name], f"step {step + 1}: {name}")
        if step == 0:
            caption = [n for n in start if n.startswith("decoder.")]
            twice, once = (float(torch.cat([(net.state_dict()[n] - start[n]).flatten()
                                            for n in caption]).norm())
                           for net in (model, single))
            assert 1.8 < twice / once <= 2 + 1e-6
            text = "text_encoder.embed.weight"
            torch.testing.assert_close(model.state_dict()[text], single.state_dict()[text])


# --- model selection ---------------------------------------------------------------------------
def test_selection_r1r5_is_the_reference_currscore():
    gen = np.random.default_rng(0)
    for _ in range(20):
        r = gen.uniform(0, 100, 6)
        metrics = {"r1_i2t": r[0], "r5_i2t": r[1], "r10_i2t": r[2], "r1_t2i": r[3],
                   "r5_t2i": r[4], "r10_t2i": r[5], "rsum": float(r.sum())}
        assert selection_score(metrics, "r1r5") == pytest.approx(ref_currscore(*r))
        assert selection_score(metrics, "rsum") == pytest.approx(r.sum())
    assert selection_score({}, "r1r5") == -np.inf


# --- the schedule --------------------------------------------------------------------------------
# train.py's argparse defaults and its README's commands (COCO: --max_violation; Flickr30K:
# --max_violation --lr_update 10 --max_len 60), and what model.py / train.py hard-code.
REFERENCE_SCHEDULE = {"margin": 0.2, "num_epochs": 30, "batch_size": 128, "word_dim": 300,
                      "embed_size": 2048, "grad_clip": 2.0, "learning_rate": 2e-4,
                      "lr_update": 15, "max_len": 60, "dim_hidden": 512, "dim_word": 300,
                      "input_dropout_p": 0.2}


def test_shipped_configs_are_the_reference_schedule():
    from stages.config.sections import load_config

    for files, lr_update, region_norm, img_bn in (
            (["configs/model/vsrn.yaml"], 15, True, False),
            (["configs/model/vsrn.yaml", "configs/model/vsrn_f30k_precomp.yaml"], 10, False,
             True)):
        c = load_config(files)
        m, t, loss = c.model.options(), c.train, c.loss.options()
        ref = {**REFERENCE_SCHEDULE, "lr_update": lr_update}
        assert (loss["margin"], c.loss.name) == (ref["margin"], "vse_max")  # --max_violation
        assert (t.epochs, t.batch_size, t.grad_clip, t.lr, t.lr_update, t.lr_decay) == (
            ref["num_epochs"], ref["batch_size"], ref["grad_clip"], ref["learning_rate"],
            ref["lr_update"], 0.1)  # adjust_learning_rate: x0.1 every lr_update epochs
        assert (t.optimizer, t.weight_decay, t.drop_last, t.select) == ("adam", 0.0, False,
                                                                        "r1r5")
        assert (m["word_dim"], m["embed_size"], m["max_len"], m["caption_hidden"],
                m["caption_word_dim"], m["caption_dropout"]) == (
            ref["word_dim"], ref["embed_size"], ref["max_len"], ref["dim_hidden"],
            ref["dim_word"], ref["input_dropout_p"])
        assert (m["gcn_layers"], m["affinity"], m["caption_weight"]) == (4, "dot", 1.0)
        assert (m["region_norm"], m["img_bn"]) == (region_norm, img_bn)  # data_name branches
        assert (m["norm_axis"], m["caption_double_step"]) == ("regions", True)
