import torch

from stages.models import build_model
from stages.models.vsepp import masked_mean


def test_masked_mean_ignores_padding():
    images = torch.randn(3, 5, 4)
    regions = torch.tensor([5, 2, 1])
    pooled = masked_mean(images, regions)
    for b in range(3):
        torch.testing.assert_close(pooled[b], images[b, : regions[b]].mean(0))


def test_embeddings_are_unit_norm_and_padding_free():
    torch.manual_seed(0)
    model = build_model("vsepp", {"embed_size": 8, "word_dim": 5}, img_dim=6, vocab_size=20)
    img = model.encode_images(torch.randn(4, 3, 6), torch.tensor([3, 3, 2, 1]))
    tokens = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    cap = model.encode_captions(tokens, torch.tensor([4, 3]))
    assert img.shape == (4, 8) and cap.shape == (2, 8)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(cap.norm(dim=1), torch.ones(2))
    # Padding after a caption does not change its embedding.
    alone = model.encode_captions(torch.tensor([[1, 7, 2]]), torch.tensor([3]))
    torch.testing.assert_close(alone[0], cap[1])


def test_final_state_equals_output_at_last_word():
    """The GRU's final hidden state is VSE++'s gather of the output at length - 1."""
    torch.manual_seed(0)
    model = build_model("vsepp", {"embed_size": 8, "word_dim": 5}, img_dim=6, vocab_size=20)
    tokens, lengths = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]]), torch.tensor([4, 3])
    out, _ = model.text_encoder.rnn(model.text_encoder.embed(tokens))
    gathered = torch.nn.functional.normalize(out[torch.arange(2), lengths - 1], dim=1)
    torch.testing.assert_close(model.encode_captions(tokens, lengths), gathered)


def test_bidirectional_and_unnormalised_images():
    model = build_model("vsepp", {"embed_size": 8, "word_dim": 5, "bidirectional": True,
                                 "img_norm": False}, img_dim=6, vocab_size=20)
    cap = model.encode_captions(torch.tensor([[1, 5, 2]]), torch.tensor([3]))
    assert cap.shape == (1, 8)
    img = model.encode_images(torch.randn(2, 6) * 100, torch.ones(2, dtype=torch.long))
    assert img.norm(dim=1).min() > 1.5
