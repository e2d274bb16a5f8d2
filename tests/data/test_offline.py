import numpy as np
import pytest

from stages.core.layout import CaptionLayout
from stages.data.dataset import open_split
from stages.data.vocab import Vocab
from stages.mining.mine import drop_positives
from stages.mining.sampler import OfflineNegativeSampler, OfflinePairDataset, collate_offline
from stages.mining.selection import Selection


def sampler_of(i2t, t2i, hardest, seed, **kwargs):
    return OfflineNegativeSampler(Selection.unfiltered(i2t), Selection.unfiltered(t2i),
                                  hardest, seed, layout=CaptionLayout.uniform(len(i2t)),
                                  **kwargs)


def mined_candidates(n, k_i2t, k_t2i, seed=0):
    """Candidates as offcandi makes them: ranked, positives dropped."""
    rng = np.random.default_rng(seed)
    i2t_ranked = np.argsort(rng.random((n, 5 * n)), axis=1)
    t2i_ranked = np.argsort(rng.random((5 * n, n)), axis=1)
    zeros = np.zeros_like
    layout = CaptionLayout.uniform(n)
    i2t, _ = drop_positives("i2t", 0, i2t_ranked, zeros(i2t_ranked, dtype=float), k_i2t,
                            layout)
    t2i, _ = drop_positives("t2i", 0, t2i_ranked, zeros(t2i_ranked, dtype=float), k_t2i,
                            layout)
    return i2t, t2i


def test_sampler_invariants():
    n = 30
    i2t, t2i = mined_candidates(n, 20, 4)
    sampler = sampler_of(i2t, t2i, hardest=20, seed=1)
    captions = np.arange(5 * n)
    for epoch in range(3):
        sampler.epoch = epoch
        d = sampler.draw(captions.tolist())
        images = captions // 5
        assert (d["captions"] // 5 != images).all()  # T' never a caption of I
        assert (d["images"] != images).all()  # I' never the image of c
        assert (d["captions2"] // 5 == d["images"]).all()  # T'' belongs to I'
        assert (d["images2"] == d["captions"] // 5).all()  # I'' owns T'
        # T' and I' come from the top h (and h / 5) of the anchor's candidates.
        assert all(t in i2t[i, :20] for t, i in zip(d["captions"], images, strict=True))
        assert all(im in t2i[c, :4] for im, c in zip(d["images"], captions, strict=True))


def test_draws_are_a_function_of_seed_epoch_and_caption():
    i2t, t2i = mined_candidates(80, 300, 60)
    a = sampler_of(i2t, t2i, hardest=300, seed=0)
    b = sampler_of(i2t, t2i, hardest=300, seed=0)
    first = a.draw([5, 17, 200])
    reordered = b.draw([200, 5, 17])
    assert first["captions"].tolist() == reordered["captions"][[1, 2, 0]].tolist()
    a.epoch = 1
    many = a.draw(list(range(250)))
    a.epoch = 2
    assert (a.draw(list(range(250)))["captions"] != many["captions"]).any()
    # Ranks are spread over the whole top h: T' is i2t[i, n] with n uniform in [0, 300).
    ranks = [list(i2t[c // 5]).index(t) for c, t in enumerate(many["captions"])]
    assert min(ranks) < 30 and max(ranks) > 270


def test_k_smaller_than_h_is_refused():
    i2t, t2i = mined_candidates(10, 20, 3)
    with pytest.raises(ValueError, match="need K >= 20 .* and >= 4"):
        sampler_of(i2t, t2i, hardest=20, seed=0)


def test_dataset_items_and_collate(tiny_root):
    split = open_split(tiny_root / "tiny", "train")
    vocab = Vocab.load(tiny_root / "tiny" / "vocab.json")
    i2t, t2i = mined_candidates(40, 10, 2)
    data = OfflinePairDataset(split, vocab, sampler_of(i2t, t2i, 10, 0))
    items = data.__getitems__([0, 7, 199])
    batch = collate_offline(items)
    assert batch["images"].shape == (9, 12, 32) and batch["tokens"].shape[0] == 9
    # Rows: anchors [0, 3), first negatives [3, 6), second negatives [6, 9).
    assert batch["caption_ids"][:3].tolist() == [0, 7, 199]
    assert batch["image_ids"][:3].tolist() == [0, 1, 39]
    for row in range(9):
        image = int(batch["image_ids"][row])
        np.testing.assert_array_equal(batch["images"][row].numpy(), split.features[image])
    assert (batch["caption_ids"][6:] // 5 == batch["image_ids"][3:6]).all()  # T'' of I'
    assert (batch["image_ids"][6:] == batch["caption_ids"][3:6] // 5).all()  # I'' of T'
