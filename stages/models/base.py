"""What every embedding model is: two encoders into one joint space, and a forward pass over
a training batch that returns a :class:`ModelOutput`.

A model's constructor takes the data-derived arguments without defaults (``img_dim``,
``vocab_size``) and its options with defaults: those are its config block (``model.*``),
checked by the registry. ``param_groups`` gives the optimiser its parameter groups (a
learning-rate scale per part, frozen parts left out); auxiliary losses a model owns (VSRN's
caption generation) come back in ``ModelOutput.aux_losses``, never computed by the trainer.

The text side reads token ids of a caption tokenizer the model class names
(:meth:`EmbeddingModel.caption_tokenizer`: our vocabulary by default, whose size is then the
``vocab_size`` argument; a pretrained model's tokenizer gives its own arguments). Parts that
start from pretrained weights load them in :meth:`EmbeddingModel.load_pretrained`, which
the train stage calls for a fresh run only, so a model rebuilt from a checkpoint never
needs the weights' original files.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from stages.core.registry import Registry
from stages.data.images import ImagePreprocessing
from stages.models.tracing import CaptionEncoderExport, ImageEncoderExport

# Every model class registers itself here by name; the package imports them all.
MODELS = Registry("model")


@dataclass
class ModelOutput:
    """A training forward pass: ``img_emb`` (B, E), ``cap_emb`` (B, E) (row k of each from
    batch row k) and the model's own losses, ``{name: scalar}``, already weighted."""

    img_emb: torch.Tensor
    cap_emb: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    def float(self) -> "ModelOutput":
        """The same output in float32 (from a forward pass under autocast)."""
        return ModelOutput(self.img_emb.float(), self.cap_emb.float(),
                           {name: value.float() for name, value in self.aux_losses.items()})


class EmbeddingModel(nn.Module):
    """Base of registered models: ``encode_images``, ``encode_captions`` and ``forward``.

    ``image_input`` says what ``encode_images`` reads, and so how the runners open a split:
    ``"features"`` (precomputed, the dataset folder's features) or ``"pixels"`` (raw images
    decoded and normalised to (B, 3, S, S) as :meth:`image_preprocessing` says).
    """

    image_input = "features"

    # True for models that read region features (B, R, D) only: training refuses (N, D)
    # global features before it starts.
    needs_regions: bool = False

    # Options added after checkpoints of the model were first written, each with the value
    # that gives the behaviour those checkpoints were trained with: a checkpoint whose model
    # arguments (or stored config) lack one is rebuilt (or compared on resume) with that
    # value, never with a newer default (see stages.io.checkpoint.with_legacy_options).
    legacy_options: dict = {}

    @classmethod
    def caption_tokenizer(cls, options: dict):
        """The :class:`~stages.data.tokenizers.CaptionTokenizer` this model reads, given its
        resolved ``options``; None: our vocabulary (``aoq vocab``), passed as
        ``vocab_size``. The tokenizer's ``model_args()`` are constructor arguments."""
        return None

    @classmethod
    def image_preprocessing(cls, args: dict) -> ImagePreprocessing:
        """How raw images become a pixel model's input, given its ``args`` (a run's resolved
        options, or a checkpoint's model arguments): by default ImageNet's mean/std and
        resize at the ``image_size`` option."""
        return ImagePreprocessing(args["image_size"])

    def bind_loss(self, loss: nn.Module) -> str | None:
        """Called once by the train stage with the run's loss, before the optimiser is made:
        a model that shares a parameter with its loss (CLIP's ``logit_scale`` as InfoNCE's
        learnable temperature) hands it over here, and returns a line for the run's log
        saying what it did. Nothing by default."""
        return None

    def encode_images(self, images: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """(B, R, D) | (B, D) features, (B,) valid regions -> (B, E) embeddings."""
        raise NotImplementedError

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids, (B,) lengths -> (B, E) embeddings."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        """Encode a batch's ``images``/``regions`` and ``tokens``/``lengths`` (each side in
        one call); tensors already on the model's device."""
        return ModelOutput(self.encode_images(batch["images"], batch["regions"]),
                           self.encode_captions(batch["tokens"], batch["lengths"]))

    def load_pretrained(self) -> None:
        """Load pretrained parts named by the options (an ImageNet backbone, a transformer
        text tower's folder); called for a fresh run only, never when the weights come from
        a checkpoint."""

    def init_word_vectors(self, vocab) -> dict | None:
        """Initialise the word embedding from the pretrained vectors file the model's options
        name (``word_vectors``), for the words of ``vocab`` (a :class:`stages.data.vocab.Vocab`
        of ``vocab_size`` words). Called by the train stage once, on a model trained from
        scratch (never on resume or on a model rebuilt from a checkpoint). Returns the record
        of the file (path, sha256, words found / missing) for the checkpoint, or None when
        the model has no file to read."""
        return None

    def use_cache_folder(self, folder: Path | None) -> None:
        """Keep the outputs of frozen pretrained parts (a whole frozen text tower's) in files
        under ``folder`` too, where later processes with the same parts read them (None: in
        memory only); the stages call it with ``data.text_cache_dir`` (or None). Nothing by
        default: a model without such parts has nothing to keep."""

    def save_cache(self) -> None:
        """Add the frozen parts' outputs computed since the last save to their files (the
        trainer at each epoch's end, the stages when they finish). Nothing by default."""

    def param_groups(self) -> list[dict]:
        """Optimiser parameter groups, each with an ``lr_scale`` (x the scheduled rate);
        parameters with ``requires_grad=False`` are left out."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def export_encoders(self, global_features: bool = False) -> tuple[nn.Module, nn.Module]:
        """The (image, caption) encoders as modules to trace or export (``aoq export``).

        Image: ``(images (B, R, D) float32, regions (B,) int64) -> (B, E)``, or with
        ``global_features`` ``(images (B, D)) -> (B, E)``; caption: ``(tokens (B, L) int64,
        lengths (B,) int64) -> (B, E)``. The default wraps :meth:`encode_images` and
        :meth:`encode_captions`, which must then be traceable (see
        :mod:`stages.models.tracing`); the export checks the result against them.
        """
        return ImageEncoderExport(self, global_features), CaptionEncoderExport(self)
