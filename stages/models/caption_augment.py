"""VSE-infinity's caption augmentation (woodfrog/vse_infty, BiGRU branch,
``lib/datasets/image_caption.py``, ``process_caption`` with ``drop=True``): in training,
each token of a caption, ``<start>`` and ``<end>`` included, is altered with probability
``rate`` (the reference's 0.2) and then, by the same uniform draw u (u / rate in [0, 1)):

* below 0.5: replaced by ``<mask>`` (half of the altered tokens);
* from 0.5 to 0.6: replaced by a token drawn uniformly from the whole vocabulary,
  ``<mask>`` and the special tokens included (the reference's ``random.randrange(len(vocab))``);
* from 0.6: deleted (the caption closes up).

The reference appends ``<mask>`` to its vocabulary (``train.py``: ``vocab.add_word``), so its
id is the vocabulary size and the word embedding has one more row; the same here.

Differences, deliberate: the draws come from torch's global RNG on the CPU (so a resumed run
draws the same, whatever the device), not Python's ``random``; a caption that would lose
every token keeps them all (the reference's empty caption would fail to pack).
"""

import torch


def augment_captions(tokens: torch.Tensor, lengths: torch.Tensor, rate: float,
                     mask_id: int, num_ids: int, pad: int = 0,
                     draws: tuple[torch.Tensor, torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a padded batch: token ids (B, L) long, lengths (B,) -> (B, L) ids (padded
    with ``pad`` after each new length), new lengths (B,) (on ``lengths``' device).

    ``mask_id``: the ``<mask>`` token; ``num_ids``: the number of ids a random replacement
    is drawn from, [0, num_ids). ``draws``: the two uniform [0, 1) draws per position, (B, L)
    each (which alteration; which random token), for tests; by default drawn here.
    """
    if draws is None:
        draws = (torch.rand(tokens.shape), torch.rand(tokens.shape))
    which, pick = (d.to(tokens.device) for d in draws)
    valid = (torch.arange(tokens.shape[1], device=tokens.device)[None, :]
             < lengths.to(tokens.device)[:, None])
    altered = valid & (which < rate)
    share = which / rate
    masked = altered & (share < 0.5)
    replaced = altered & (share >= 0.5) & (share < 0.6)
    deleted = altered & (share >= 0.6)
    random_ids = (pick * num_ids).long().clamp(max=num_ids - 1)
    out = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
    out = torch.where(replaced, random_ids, out)
    keep = valid & ~deleted
    emptied = ~keep.any(dim=1)
    keep = torch.where(emptied[:, None], valid, keep)
    out = torch.where(emptied[:, None], tokens, out)
    # close up: kept tokens move to positions 0.. in their order
    new_lengths = keep.sum(dim=1)
    position = torch.where(keep, keep.long().cumsum(dim=1) - 1, tokens.shape[1])
    closed = torch.full((tokens.shape[0], tokens.shape[1] + 1), pad, dtype=tokens.dtype,
                        device=tokens.device)
    closed.scatter_(1, position, out)
    return closed[:, :-1], new_lengths.to(lengths.device)
