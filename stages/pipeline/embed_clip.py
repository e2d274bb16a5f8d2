"""A miner that needs no trained model of this project: a pretrained open_clip model over
the split's images and captions (``aoq embed-clip --arch ViT-B-32 --weights FILE``).

``arch`` is what ``model.arch`` of the ``clip`` model takes (an open_clip architecture
name, a config this package ships (TinyCLIP's), or a model-config JSON file; see
:mod:`stages.data.clip_tokenizer`), ``FILE`` an open_clip checkpoint of it
(``.bin``/``.pt``/``.safetensors``). The model is the one
``open_clip.create_model_and_transforms(arch, pretrained=FILE)`` builds and is fed as its
``preprocess_val`` and ``open_clip.get_tokenizer(arch)`` feed it: each image (the split's
``{split}_images.txt`` under ``data.images``) resized on its shorter side to the tower's
image size S (bicubic), center-cropped to S, normalised with OpenAI's mean/std (open_clip's
defaults for a weights file: a pretrained tag's own mean/std cannot be told from a file);
each caption as CLIP's BPE tokens padded to the context length. Both go through the
``clip`` model's pipeline (:class:`~stages.models.clip.CLIPModel`,
:func:`~stages.models.encode.encode_split`): images (B, 3, S, S), decoded a batch at a time in
``data.workers`` DataLoader workers (an unreadable image is an error naming the file) ->
``encode_image`` -> (N, E); captions (B, L) -> ``encode_text`` -> (C, E); both
L2-normalised, E the architecture's ``embed_dim``.

Written as an ordinary embeddings file (:mod:`stages.mining.embedding_files`), so ``aoq offcandi``
mines it like any other. Its ``checkpoint`` attribute is ``clip:<arch>:<weights file>`` and
its ``weights`` :func:`clip_miner_weights` (the architecture's config and the weights
file's SHA-256, hashed together: the same file read as ViT-B-32 or ViT-B-32-quickgelu
embeds differently); retraining with ``offcandi.base_ckpt=clip:<arch>:<weights file>``
checks that its candidates were mined by that model (:func:`stages.pipeline.miners.miner_weights`).
"""

import hashlib
import json
import logging
from pathlib import Path

from stages.config.sections import Config
from stages.core.device import resolve_device
from stages.core.errors import UserError
from stages.data.clip_tokenizer import ClipTokenizer, arch_config
from stages.data.vocab import file_sha256
from stages.io.lock import folder_lock
from stages.mining.embedding_files import made_with, write_embeddings
from stages.models import build_model
from stages.models.encode import encode_split
from stages.pipeline.inputs import open_model_split

log = logging.getLogger(__name__)

CLIP_PREFIX = "clip:"


def clip_miner_spec(arch: str, weights: str) -> str:
    """``clip:<arch>:<weights>``: how ``offcandi.base_ckpt`` and the files name this miner."""
    return f"{CLIP_PREFIX}{arch}:{weights}"


def parse_clip_miner(spec: str) -> tuple[str, str]:
    """(arch, weights file) of ``clip:<arch>:<weights file>`` (the arch holds no ``:``)."""
    arch, _, weights = spec.removeprefix(CLIP_PREFIX).partition(":")
    if not arch or not weights:
        raise UserError(f"{spec!r}: name an open_clip miner clip:<arch>:<weights file>, "
                        "e.g. clip:ViT-B-32:/models/open_clip_model.safetensors")
    return arch, weights


def _weights_digest(arch: str, weights: str) -> str:
    """Hex SHA-256 of the weights file (a missing one is a :class:`UserError`)."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"open_clip miner weights {weights}: no such file; give an open_clip "
                        f"checkpoint file of {arch} (.bin/.pt/.safetensors: pretrained tags "
                        "cannot be downloaded here)")
    return file_sha256(path)


def _weights_id(clip_config: dict, digest: str) -> str:
    """16 hex digits: SHA-256 of the architecture's config and the weights file's digest."""
    text = json.dumps({"clip_config": clip_config, "weights_sha256": digest}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def clip_miner_weights(arch: str, weights: str) -> str:
    """The ``weights`` hash embeddings and candidates of the miner ``(arch, weights)``
    record (without building the model)."""
    return _weights_id(arch_config(arch), _weights_digest(arch, weights))


def embed_clip(arch: str, weights: str, config: Config, split_name: str,
               out: str | Path) -> Path:
    """Encode the images and captions of ``config``'s split ``split_name`` with the open_clip
    model ``arch`` of the weights file ``weights`` into the embeddings file ``out`` (see the
    module docstring), on ``train.device``. An ``out`` made by the same architecture and
    weights file from the same captions (and caption layout) and images is left as it is
    (so make, which runs this every time, mines again only when one of them changed)."""
    out = Path(out)
    dataset_dir = config.dataset_dir()
    if not dataset_dir.is_dir():
        raise UserError(f"dataset folder {dataset_dir} not found; set data.path / data.name")
    clip_config = arch_config(arch)
    digest = _weights_digest(arch, weights)
    split = open_model_split(config, split_name,
                             {"name": "clip", "args": {"arch": arch, "clip_config": clip_config}})
    images = split.features.fingerprint()
    identity = {"checkpoint": clip_miner_spec(arch, weights),
                "weights": _weights_id(clip_config, digest), "weights_sha256": digest,
                "dataset": config.data.name, "split": split_name,
                "train_captions_sha256": file_sha256(dataset_dir / f"{split_name}_caps.txt"),
                "caption_layout": split.layout.identity(),
                "images_sha256": images["list_sha256"],
                "images_sample_sha256": images["sample_sha256"]}
    with folder_lock(out.parent, "aoq embed-clip"):
        if made_with(out, identity):
            log.info("%s is up to date (the same open_clip model, captions and images): "
                     "nothing to do", out)
            return out
        log.info("open_clip miner %s (%s) over %d images and %d captions of %s %s", arch,
                 weights, split.num_images, len(split.captions), config.data.name, split_name)
        model = build_model("clip", {"arch": arch, "weights": weights}, img_dim=3,
                            clip_config=clip_config)
        model.load_pretrained()
        device = resolve_device(config.train.device)
        model.to(device)
        img, cap = encode_split(model, split, ClipTokenizer(arch, clip_config), device,
                                workers=config.data.workers, desc="open_clip miner")
        write_embeddings(out, img, cap,
                         {**identity, "num_images": split.num_images, "miner": "clip",
                          "dataset_dir": str(dataset_dir.resolve())}, split.layout)
    log.info("%d images and %d captions (%d-d) -> %s", img.shape[0], cap.shape[0],
             img.shape[1], out)
    return out
