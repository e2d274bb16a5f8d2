import hashlib

import torch

from stages.io.checkpoint import weights_hash


def test_weights_hash_covers_scalar_tensors():
    """Batch norm's num_batches_tracked is a 0-d int64 tensor: hashed, and told apart."""
    bn = torch.nn.BatchNorm1d(3).state_dict()
    before = weights_hash(bn)
    bn["num_batches_tracked"] += 1
    assert weights_hash(bn) != before


def test_weights_hash_is_names_shapes_and_bytes():
    state = {"b": torch.arange(6, dtype=torch.float32).view(2, 3), "a": torch.zeros(0)}
    digest = hashlib.sha256()
    for name in ("a", "b"):
        digest.update(name.encode())
        digest.update(str(tuple(state[name].shape)).encode())
        digest.update(state[name].numpy().tobytes())
    assert weights_hash(state) == digest.hexdigest()[:16]
