"""VSRN's caption generation: an attention decoder that generates an image's matching caption
from its reasoned regions (the reference's S2VT-with-attention model: ``models/EncoderRNN.py``,
``DecoderRNN.py``, ``Attention.py`` of KunpengLi1994/VSRN), trained with teacher forcing.

Encoder: regions (B, N, F) -> linear to the hidden size H, dropout, a GRU over the regions
-> outputs (B, N, H) and final state (B, H). Decoder: a GRU cell started at the encoder's
final state; at step t its input is [embedding of token t ; attention context], the context
being the encoder outputs weighted by softmax_n(w2 . tanh(W1 [out_n ; h])) over the valid
regions; token t + 1 is predicted from the new state by a linear layer and a log-softmax.
Dropout (``dropout``, the reference's ``input_dropout_p`` 0.2) applies to the encoder's
projected regions and to each decoder input; the reference's ``rnn_dropout_p`` acts between
GRU layers and so does nothing with its single layer (left out).

The loss is the reference's ``LanguageModelCriterion``: the negative log-likelihood summed
over the target tokens and divided by the batch size, on captions capped at ``max_len``
tokens (see :func:`caption_targets`).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from stages.data.vocab import SPECIALS

END = SPECIALS.index("<end>")


def caption_targets(tokens: torch.Tensor, lengths: torch.Tensor,
                    max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher-forcing inputs, targets and target mask, each (B, T), of captions
    (B, L) ``<start> ... <end>`` padded with 0, lengths (B,).

    As the reference's data loader: a caption longer than ``max_len`` keeps its first
    ``max_len - 1`` tokens and ``<end>``; the decoder runs at most ``max_len - 1`` steps,
    step t reading token t and predicting token t + 1; targets are every token after
    ``<start>`` and, as the reference's mask reaches one position past ``<end>``, the
    padding token after ``<end>`` when it falls within those steps.
    """
    capped = torch.minimum(lengths, torch.tensor(max_len)).to(tokens.device)
    labels = tokens[:, :max_len].clone()
    long = lengths.to(tokens.device) > max_len
    if bool(long.any()):
        labels[long, max_len - 1] = END
    labels = F.pad(labels, (0, 1))  # one padding column: the target after <end>
    scored = torch.clamp(capped, max=max_len - 1)  # targets per caption
    steps = int(scored.max())
    mask = torch.arange(1, steps + 1, device=tokens.device)[None, :] <= scored[:, None]
    return labels[:, :steps], labels[:, 1:steps + 1], mask


class CaptionDecoder(nn.Module):
    """Caption loss of regions: features (B, N, F), mask (B, N) | None, regions (B,),
    tokens (B, L), lengths (B,) -> scalar."""

    def __init__(self, vocab_size: int, feature_dim: int, hidden: int = 512,
                 word_dim: int = 300, dropout: float = 0.2, max_len: int = 60):
        super().__init__()
        self.max_len = max_len
        self.proj = nn.Linear(feature_dim, hidden)
        self.encoder = nn.GRU(hidden, hidden, batch_first=True)
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.attn = nn.Linear(2 * hidden, hidden)  # W1 on [encoder output ; state]
        self.attn_score = nn.Linear(hidden, 1, bias=False)
        self.cell = nn.GRUCell(word_dim + hidden, hidden)
        self.out = nn.Linear(hidden, vocab_size)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_normal_(self.proj.weight)  # the reference's initialisation
        nn.init.xavier_normal_(self.out.weight)

    def encode(self, features: torch.Tensor, mask: torch.Tensor | None,
               regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, F) -> encoder outputs (B, N, H) (zero at padded regions), final state
        (B, H) (after each image's last valid region)."""
        x = self.dropout(self.proj(features))
        if mask is None:
            out, state = self.encoder(x)
        else:
            packed = pack_padded_sequence(x, regions.cpu(), batch_first=True,
                                          enforce_sorted=False)
            out, state = self.encoder(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out, state[-1]

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None,
                regions: torch.Tensor, tokens: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        inputs, targets, target_mask = caption_targets(tokens, lengths, self.max_len)
        enc, h = self.encode(features, mask, regions)
        hidden = enc.shape[-1]
        # W1 [out_n ; h] = W1_out out_n + W1_h h: the outputs' part is the same every step.
        enc_part = F.linear(enc, self.attn.weight[:, :hidden], self.attn.bias)  # (B, N, H)
        state_weight = self.attn.weight[:, hidden:]
        words = self.embed(inputs)  # (B, T, word_dim)
        states = []
        for t in range(inputs.shape[1]):
            scores = self.attn_score(torch.tanh(enc_part + F.linear(h, state_weight)[:, None]))
            scores = scores.squeeze(-1)  # (B, N)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            context = torch.bmm(scores.softmax(dim=1)[:, None], enc).squeeze(1)  # (B, H)
            h = self.cell(self.dropout(torch.cat([words[:, t], context], dim=1)), h)
            states.append(h)
        logprobs = F.log_softmax(self.out(torch.stack(states, dim=1)), dim=-1)  # (B, T, V)
        nll = -logprobs.gather(2, targets[..., None]).squeeze(-1)
        return (nll * target_mask).sum() / tokens.shape[0]
