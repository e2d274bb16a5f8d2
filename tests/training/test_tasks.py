"""Tasks: how a batch goes through the model (one pass, or one pass per offline group)."""

import torch
import torch.nn.functional as F
from torch import nn

from stages.models.base import EmbeddingModel, ModelOutput
from stages.training.tasks import OfflineTask, PairTask


class BatchNormModel(EmbeddingModel):
    """Image side: linear + batch norm (batch statistics in training mode); text side: mean
    of word vectors. Adds an auxiliary loss computed from its own batch."""

    def __init__(self, dim: int = 6, vocab: int = 20):
        super().__init__()
        self.fc = nn.Linear(dim, 4)
        self.bn = nn.BatchNorm1d(4)
        self.words = nn.Embedding(vocab, 4)

    def encode_images(self, images, regions):
        return F.normalize(self.bn(self.fc(images)), dim=-1)

    def encode_captions(self, tokens, lengths):
        return F.normalize(self.words(tokens).mean(1), dim=-1)

    def forward(self, batch):
        out = super().forward(batch)
        out.aux_losses["batch_mean"] = batch["images"].mean()
        return out


def _offline_batch(b: int = 5, dim: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    rows = 3 * b
    return {"images": torch.randn(rows, dim, generator=gen) * torch.arange(1, rows + 1)[:, None],
            "regions": torch.ones(rows, dtype=torch.long),
            "tokens": torch.randint(0, 20, (rows, 7), generator=gen),
            "lengths": torch.full((rows,), 7),
            "image_ids": torch.arange(rows), "caption_ids": torch.arange(rows) * 5}


def test_offline_task_encodes_each_group_with_its_own_batch_statistics():
    torch.manual_seed(0)
    model = BatchNormModel().train()
    batch = _offline_batch()
    task = OfflineTask.__new__(OfflineTask)  # forward needs no dataset
    out = task.forward(model, batch)
    b = 5
    for g in range(3):
        alone = model({k: v[g * b:(g + 1) * b] for k, v in batch.items()})
        assert torch.equal(out.img_emb[g * b:(g + 1) * b], alone.img_emb)
        assert torch.equal(out.cap_emb[g * b:(g + 1) * b], alone.cap_emb)
    assert out.aux_losses["batch_mean"] == batch["images"][:b].mean()
    # The choice matters for batch norm: one pass over all 3B rows normalises differently.
    together = model(batch)
    assert not torch.allclose(together.img_emb[:b], out.img_emb[:b], atol=1e-3)


def test_pair_task_is_one_forward_pass():
    torch.manual_seed(0)
    model = BatchNormModel().train()
    batch = _offline_batch()
    out = PairTask.forward(PairTask.__new__(PairTask), model, batch)
    assert isinstance(out, ModelOutput)
    assert torch.equal(out.img_emb, model(batch).img_emb)
