"""What makes a model's encoders exportable (TorchScript tracing, ONNX), and the modules that
are exported.

Tracing records the tensor operations of one call and replays them on any later input, so
an encoder must compute the same way on every input while it is traced: no Python branch
on tensor *values* (``if bool((regions == R).all())``: the branch taken on the example
would be baked in) and no packed sequences (``pack_padded_sequence`` sorts by the example's
lengths). Models keep their fast eager code and take the general path when
:func:`is_exporting` is true (see :func:`stages.models.rnn.run_gru`); the export stage turns
the tracer's warnings about data-dependent Python values into errors, so a model that is not
traceable fails to export instead of exporting a graph that is wrong on other inputs.

:meth:`stages.models.base.EmbeddingModel.export_encoders` returns the two modules below by
default; a model whose encoders cannot be made traceable returns its own.
"""

import torch
from torch import nn


def is_exporting() -> bool:
    """Whether the code runs under TorchScript tracing, ONNX export or ``torch.export``."""
    return (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_exporting())


class ImageEncoderExport(nn.Module):
    """``model.encode_images`` as an exported module.

    With regions: ``forward(images (B, R, D) float32, regions (B,) int64) -> (B, E)``;
    ``global_features``: ``forward(images (B, D) | (B, 3, S, S) float32) -> (B, E)`` (every
    image one valid "region").
    """

    def __init__(self, model: nn.Module, global_features: bool = False):
        super().__init__()
        self.model = model
        self.global_features = global_features

    def forward(self, images: torch.Tensor, regions: torch.Tensor | None = None) -> torch.Tensor:
        if self.global_features:  # (B, D) features or (B, 3, S, S) pixels
            regions = torch.ones_like(images.flatten(1)[:, 0], dtype=torch.long)
        return self.model.encode_images(images, regions)


class CaptionEncoderExport(nn.Module):
    """``model.encode_captions`` as an exported module: ``forward(tokens (B, L) int64,
    lengths (B,) int64) -> (B, E)``; positions at or beyond ``lengths[b]`` are padding."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model.encode_captions(tokens, lengths)
