"""What mined a candidate folder, as ``offcandi.base_ckpt`` (and ``mix_base_ckpt``, ``aoq
table --mined-by``) names it: a checkpoint of this project, ``text:<model folder>`` (a
pretrained sentence encoder, :mod:`stages.pipeline.embed_text`) or ``clip:<arch>:<weights file>`` (a
pretrained open_clip model, :mod:`stages.pipeline.embed_clip`). Its candidate files must record the
weights hash :func:`miner_weights` gives, or retraining refuses them."""

from stages.io.checkpoint import load_checkpoint, weights_hash
from stages.pipeline.embed_clip import CLIP_PREFIX, clip_miner_weights, parse_clip_miner
from stages.pipeline.embed_text import TEXT_PREFIX, load_text_model


def miner_weights(base_ckpt: str) -> str:
    """The weights hash candidate files must record for ``base_ckpt``: a checkpoint's, the
    text model's for ``text:<model>``, the open_clip model's for ``clip:<arch>:<file>``."""
    if base_ckpt.startswith(TEXT_PREFIX):
        return weights_hash(load_text_model(base_ckpt[len(TEXT_PREFIX):])[1].state_dict())
    if base_ckpt.startswith(CLIP_PREFIX):
        return clip_miner_weights(*parse_clip_miner(base_ckpt))
    return weights_hash(load_checkpoint(base_ckpt)["state_dict"])
