"""GRUs over padded batches of variable-length sequences, in a form that can be exported.

:func:`run_gru` is what models call: in eager mode it packs the batch
(``pack_padded_sequence``, the fast cuDNN path, what VSE++ does); while a model is traced or
exported (:func:`stages.models.tracing.is_exporting`) packed sequences cannot be used, and
:func:`padded_gru` computes the same result on the padded batch:

* a forward direction reads positions 0..t, so its outputs at the valid positions
  (t < length) do not depend on the padding after them, and its final state is its output
  at position length - 1;
* a backward direction must start at each sequence's last valid position: the sequence is
  reversed within its length (position t <-> length - 1 - t, padding left in place), run
  forwards with the backward weights, and its outputs reversed back; its final state is
  its output at reversed position length - 1;
* layers run one at a time, each on the previous layer's outputs, whose padding positions
  (garbage here) again never reach a valid position.
"""

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from stages.models.tracing import is_exporting


def reverse_within(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of ``x`` (B, L, D) within its length (B,): position t of row b
    becomes ``lengths[b] - 1 - t`` for t < lengths[b]; padding positions stay in place."""
    pos = torch.arange(x.shape[1], device=x.device)[None, :].expand(x.shape[0], -1)
    index = torch.where(pos < lengths[:, None], lengths[:, None] - 1 - pos, pos)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[2]))


def _direction_weights(rnn: nn.GRU, layer: int, reverse: bool) -> list[torch.Tensor]:
    suffix = f"l{layer}{'_reverse' if reverse else ''}"
    names = ("weight_ih", "weight_hh", *(("bias_ih", "bias_hh") if rnn.bias else ()))
    return [getattr(rnn, f"{name}_{suffix}") for name in names]


def padded_gru(rnn: nn.GRU, x: torch.Tensor,
               lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``rnn`` (batch_first) gives on the packed batch, computed on the padded one.

    ``x`` (B, L, input), ``lengths`` (B,) in [1, L] -> (outputs (B, L, directions * H),
    zero at padding positions as ``pad_packed_sequence`` gives them; final states
    (layers * directions, B, H), ordered as ``nn.GRU``'s). Dropout between layers is not
    applied (for evaluation and export).
    """
    if not rnn.batch_first:
        raise ValueError("padded_gru needs a batch_first GRU")
    batch = torch.arange(x.shape[0], device=x.device)
    last = lengths - 1
    h0 = x.new_zeros(1, x.shape[0], rnn.hidden_size)
    finals, layer_input = [], x
    for layer in range(rnn.num_layers):
        outputs = []
        for reverse in ((False, True) if rnn.bidirectional else (False,)):
            seq = reverse_within(layer_input, lengths) if reverse else layer_input
            out, _ = torch.gru(seq, h0, _direction_weights(rnn, layer, reverse), rnn.bias, 1,
                               0.0, False, False, True)
            finals.append(out[batch, last])
            outputs.append(reverse_within(out, lengths) if reverse else out)
        layer_input = torch.cat(outputs, dim=-1)
    valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    return layer_input * valid[..., None].to(layer_input.dtype), torch.stack(finals)


def run_gru(rnn: nn.GRU, x: torch.Tensor, lengths: torch.Tensor,
            outputs: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``rnn`` (batch_first) over a padded batch of variable-length sequences.

    ``x`` (B, L, input), ``lengths`` (B,) -> (outputs (B, L, directions * H), zero at
    padding positions, or None unless ``outputs``; final states (layers * directions, B,
    H)). Packed in eager mode, :func:`padded_gru` while exporting (the same values).
    """
    if is_exporting():
        out, hidden = padded_gru(rnn, x, lengths)
        return (out if outputs else None), hidden
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, hidden = rnn(packed)
    if not outputs:
        return None, hidden
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out, hidden
